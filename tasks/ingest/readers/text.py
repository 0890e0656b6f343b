"""Plain text and HTML files: one document per file.

A ``.txt`` file is text as it stands (newlines normalized); an ``.html``/``.htm`` file goes
through the same decoding and extraction as a crawled page. The file's URL is its ``file://``
address (or its fsspec URL), and its modification time stands for when it was fetched.
"""

from __future__ import annotations

import gzip
import zlib
from datetime import UTC, datetime
from pathlib import PurePosixPath

import fsspec
from fsspec.implementations.local import LocalFileSystem

from llmflow.tasks.core.documents import Document, utc_now
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.readers.common import (
    document_from_body,
    open_decompressed,
    parse_datetime,
    rejected,
)

TEXT_SUFFIXES = (".txt",)
HTML_SUFFIXES = (".html", ".htm")


def whole_file_document(
    fs: fsspec.AbstractFileSystem,
    path: str,
    suffix: str,
    extractor: BoundedExtractor,
    max_page_bytes: int,
) -> Document:
    url = _document_url(fs, path)
    fetched_at = _modified_time(fs, path)
    try:
        with open_decompressed(fs, path) as f:
            body = f.read(max_page_bytes + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        return rejected(url, "file", fetched_at, "malformed_record", f"{path}: {e}")
    if len(body) > max_page_bytes:
        return rejected(url, "file", fetched_at, "oversize", f"over {max_page_bytes} bytes")
    content_type = "text/plain" if suffix in TEXT_SUFFIXES else "text/html"
    return document_from_body(body, content_type, url, "file", fetched_at, extractor)


def _document_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The url of a document that is a whole file: file:///abs/path, or the fsspec URL."""
    if isinstance(fs, LocalFileSystem):
        return PurePosixPath(path).as_uri()
    return fs.unstrip_protocol(path)


def _modified_time(fs: fsspec.AbstractFileSystem, path: str) -> datetime:
    """When a file was last written: the best 'fetched at' a plain file has."""
    try:
        info = fs.info(path)
    except OSError:
        return utc_now()
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        parsed = parse_datetime(value)
        if parsed is not None:
            return parsed
    return utc_now()
