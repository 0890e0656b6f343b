"""The document record every stage reads and writes, and the outcomes a reader can produce.

Documents keep one schema that stages extend and never rename: ``id``, ``text``, ``url``,
``source``, ``fetched_at``, then the columns each stage adds. Removed documents carry the same
columns plus ``reason`` (a short machine-readable label that is counted) and ``detail`` (free text
for a human). Fetch failures (no document at all: a 404, a refused robots.txt, a timeout) are not
documents; they are reported as :class:`FetchFailure` rows in the stage manifest. A refresh that
finds a page as it was (:class:`Unchanged`) counts it and adds no document.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("fetched_at", pa.timestamp("us", tz="UTC")),
    ]
)

REJECTION_FIELDS = [
    pa.field("reason", pa.string(), nullable=False),
    pa.field("detail", pa.string()),
]


def rejected_schema(schema: pa.Schema) -> pa.Schema:
    """The schema of a stage's rejected set: its document schema plus why each row was removed."""
    for rejection_field in REJECTION_FIELDS:
        if rejection_field.name not in schema.names:
            schema = schema.append(rejection_field)
    return schema


def document_id(url: str | None, text: str) -> str:
    """A stable id from url + text, so the same page fetched twice gets the same id.

    The NUL separator keeps ("ab", "c") and ("a", "bc") apart; 32 hex digits (128 bits) keep
    collisions out of reach for any corpus we will see.
    """
    digest = hashlib.sha256(f"{url or ''}\0{text}".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:32]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Document:
    """A document a reader produced. ``reject_reason`` set means it goes to the rejected set."""

    url: str | None
    text: str
    source: str
    fetched_at: datetime = field(default_factory=utc_now)
    reject_reason: str | None = None
    detail: str = ""

    def row(self) -> dict:
        return {
            "id": document_id(self.url, self.text),
            "text": self.text,
            "url": self.url,
            "source": self.source,
            "fetched_at": self.fetched_at,
        }


@dataclass(slots=True)
class FetchFailure:
    """A URL or record that produced no document at all (404, timeout, robots disallow...)."""

    url: str
    reason: str
    detail: str = ""
    status: int | None = None

    def row(self) -> dict:
        return {
            "url": self.url,
            "reason": self.reason,
            "detail": self.detail,
            "status": self.status,
        }


@dataclass(slots=True)
class Unchanged:
    """A page a refresh found as an earlier crawl left it: a 304 answer to a conditional request
    (``not_modified``) or the same extracted text (``same_content``). Its document is already in
    the dataset, so none is added; the crawl counts it."""

    url: str
    reason: str
    doc_id: str | None
