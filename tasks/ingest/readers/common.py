"""What every file reader shares: making a document or a rejection, decoding a page's bytes,
reading timestamps, opening a possibly gzipped file.

Kept in one place so that a page read from a WARC record and the same page in an HTML file give
the same document, and a rejection has the same reason whichever format it came from.
"""

from __future__ import annotations

import contextlib
import gzip
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import IO, Any

import fsspec

from llmflow.tasks.core.documents import Document, utc_now
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.html_text import ExtractionError
from llmflow.tasks.ingest.page_decoding import DecodeError, decode_body

GZIP_MAGIC = b"\x1f\x8b"
SCAN_BLOCK = 1 << 20


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def rejected(
    url: str | None, source: str, fetched_at: datetime | None, reason: str, detail: str = ""
) -> Document:
    return Document(
        url=url,
        text="",
        source=source,
        fetched_at=fetched_at or utc_now(),
        reject_reason=reason,
        detail=detail,
    )


def document_from_body(
    body: bytes,
    content_type: str | None,
    url: str | None,
    source: str,
    fetched_at: datetime,
    extractor: BoundedExtractor,
    cut: bool = False,
) -> Document:
    """Bytes of a page to a document: decode strictly, extract text from HTML, reject empties.

    ``cut`` says the crawler stored only the start of the body (WARC-Truncated; Common Crawl cuts
    at 1 MiB): its last character may be split. A split UTF-8 sequence is dropped before decoding
    (a detector would otherwise be free to pick a charset in which the tail decodes); for other
    charsets decoding is retried without the last bytes, rather than losing the page.
    """
    if cut:
        body = _drop_split_utf8_tail(body)
    try:
        text, _charset = decode_body(body, content_type)
    except DecodeError as e:
        decoded = _decode_cut_body(body, content_type) if cut else None
        if decoded is None:
            return rejected(url, source, fetched_at, e.reason, getattr(e, "detail", "") or str(e))
        text = decoded
    text = text.removeprefix("\ufeff")
    if media_type(content_type) == "text/plain":
        text = _normalize_newlines(text)
    else:
        try:
            text = extractor.extract(text, url=url)
        except ExtractionError as e:
            return rejected(url, source, fetched_at, e.reason, e.detail)
    if not text.strip():
        return rejected(url, source, fetched_at, "empty")
    return Document(url=url, text=text, source=source, fetched_at=fetched_at)


def _drop_split_utf8_tail(body: bytes) -> bytes:
    """The body without a trailing UTF-8 sequence that lacks its continuation bytes.

    In a single-byte charset this may drop one real last character of a body that is cut anyway.
    """
    for back in range(1, min(4, len(body)) + 1):
        byte = body[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back for the lead byte
            continue
        if byte >= 0xC0:
            needed = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if needed > back:
                return body[:-back]
        return body
    return body


def _decode_cut_body(body: bytes, content_type: str | None) -> str | None:
    """A cut body decoded without its last 1-3 bytes (one split character), or None."""
    for drop in (1, 2, 3):
        try:
            return decode_body(body[:-drop], content_type)[0]
        except DecodeError:
            continue
    return None


def parse_datetime(value: Any) -> datetime | None:
    """A timestamp as UTC, from ISO 8601 text or a datetime; None when it is not one.

    Naive values are taken as UTC: WARC dates and crawl metadata are UTC by convention.
    """
    if isinstance(value, datetime):
        parsed = value
    elif isinstance(value, str) and value.strip():
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def parse_http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@contextlib.contextmanager
def open_decompressed(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A buffered binary stream of the file, gunzipped when its first bytes say gzip.

    The magic bytes decide, not the suffix: '.jsonl.gz' files that are not compressed and
    compressed files without '.gz' both occur.
    """
    with fs.open(path, "rb") as raw:
        buffered = io.BufferedReader(raw, buffer_size=SCAN_BLOCK)
        if buffered.peek(2)[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=buffered, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield buffered


def text_document(
    text: str,
    url: str | None,
    source: str,
    fetched_at: datetime | None,
    max_page_bytes: int,
    where: str,
) -> Document:
    """A document from text that is already text (JSON Lines, Parquet, WET)."""
    fetched_at = fetched_at or utc_now()
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_page_bytes:
        return rejected(url, source, fetched_at, "oversize", f"{where}: {size} bytes")
    if not text.strip():
        return rejected(url, source, fetched_at, "empty", where)
    return Document(url=url, text=text, source=source, fetched_at=fetched_at)
