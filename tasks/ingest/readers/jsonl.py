"""JSON Lines files: one document per line with a string ``text`` field, gzipped or not.

The url and the fetch time are read where the common corpora keep them (Dolma and RedPajama
nest them under ``metadata``/``meta``). A line that is not a JSON object, or has no string
``text``, is one ``malformed_record`` rejection; an overlong line is skipped unread (``oversize``).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from datetime import datetime
from typing import IO, Any

import fsspec

from llmflow.tasks.core.documents import Document, utc_now
from llmflow.tasks.ingest.readers.common import (
    SCAN_BLOCK,
    open_decompressed,
    parse_datetime,
    rejected,
    text_document,
)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
# A JSON string can be up to 6 bytes per UTF-8 byte of text (\uXXXX escapes), so a line is read up
# to this multiple of max_page_bytes before it is called oversize without parsing it.
_JSON_ESCAPE_FACTOR = 6


def jsonl_documents(
    fs: fsspec.AbstractFileSystem, path: str, name: str, max_page_bytes: int
) -> Iterator[Document]:
    source = f"jsonl:{name}"
    line_limit = max_page_bytes * _JSON_ESCAPE_FACTOR + 1024
    lineno = 0
    try:
        with open_decompressed(fs, path) as f:
            for lineno, line in _bounded_lines(f, line_limit):
                if line is None:
                    yield rejected(
                        None, source, None, "oversize", f"line {lineno}: over {line_limit} bytes"
                    )
                elif line.strip():
                    yield _jsonl_document(line, lineno, source, max_page_bytes)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A truncated or corrupt gzip stream: what came before is kept, the rest is lost.
        yield rejected(None, source, None, "malformed_record", f"{path}: after line {lineno}: {e}")


def _bounded_lines(stream: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """Lines with their 1-based numbers; a line over ``limit`` bytes comes as None, unread."""
    lineno = 0
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if len(line) > limit and not line.endswith(b"\n"):
            while True:  # skip the rest of the long line without holding it
                rest = stream.readline(SCAN_BLOCK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
        else:
            yield lineno, line


def _jsonl_document(line: bytes, lineno: int, source: str, max_page_bytes: int) -> Document:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        return rejected(None, source, None, "malformed_record", f"line {lineno}: not JSON: {e}")
    if not isinstance(record, dict):
        return rejected(None, source, None, "malformed_record", f"line {lineno}: not a JSON object")
    url = _record_url(record)
    fetched_at = _record_time(record)
    text = record.get("text")
    if not isinstance(text, str):
        return rejected(
            url,
            source,
            fetched_at,
            "malformed_record",
            f"line {lineno}: no string 'text' field (got {type(text).__name__})",
        )
    return text_document(text, url, source, fetched_at, max_page_bytes, f"line {lineno}")


def _record_url(record: dict[str, Any]) -> str | None:
    """``url``, else ``metadata.url`` / ``meta.url`` (Dolma and RedPajama keep it there)."""
    candidates = [record.get("url")]
    for key in ("metadata", "meta"):
        nested = record.get(key)
        if isinstance(nested, dict):
            candidates.append(nested.get("url"))
    return next((c for c in candidates if isinstance(c, str) and c), None)


def _record_time(record: dict[str, Any]) -> datetime:
    """``fetched_at``, else ``created`` (Dolma: the crawl date), else ``metadata.date_download``."""
    candidates = [record.get("fetched_at"), record.get("created"), record.get("date")]
    for key in ("metadata", "meta"):
        nested = record.get(key)
        if isinstance(nested, dict):
            candidates.append(nested.get("date_download"))
    for value in candidates:
        parsed = parse_datetime(value)
        if parsed is not None:
            return parsed
    return utc_now()
