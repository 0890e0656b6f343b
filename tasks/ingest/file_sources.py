"""Documents from files: WARC/ARC/WET archives, plain text, HTML, JSON Lines and Parquet.

A file seed is read, never crawled: the reader is chosen by the file's suffix, and every file is
opened through fsspec, so ``memory://`` and ``s3://`` roots behave like local paths.

Archives come from many crawlers and many years, and some are damaged. A bad record, a truncated
file or a corrupt gzip member is never fatal: it becomes one rejected document with reason
``malformed_record`` and the reader goes on with the next record it can find. What warcio does on
the quirky files this was tested against:

- **Truncated file** (cut inside a record): warcio yields the cut record as if it were complete,
  with a short payload, and then stops cleanly. The record's ``Content-Length`` tells how many
  bytes should have come, so the cut record is rejected here instead of turned into half a page.
- **Garbage between records, a record whose first line is not a WARC version**: warcio raises
  ``ArchiveLoadFailed`` and its iterator is finished. For member-wise gzipped files (the norm:
  one gzip member per record) the reader looks for the next gzip member that decompresses to a
  record header and starts a new iterator there; for uncompressed WARC files it looks for the
  next ``WARC/`` line. Only the damaged records are lost.
- **A corrupt gzip member**: depending on where the damage is, warcio raises (as above), or
  prints the zlib error to stderr and returns the record short (caught by its Content-Length, as
  for a cut file), or stops without a word as if the file had ended (caught because the file
  goes on after the last record read). Each case becomes one rejection and a resynchronisation.
- **A whole file gzipped as one member** (``gzip file.warc``): warcio refuses it after the first
  record ("non-chunked gzip file"); the reader then reads it again as one decompressed stream.
- **ClueWeb09** (``WARC/0.18``): warcio reads it, but its ``WARC-Date`` values are not dates
  ("2008-10-294T05:21:46-0700"); the HTTP ``Date`` header is used then. Its responses also say
  ``Content-Encoding: gzip`` over bodies that are not compressed: warcio notices that on the first
  block and passes the bytes through unchanged.
- **Chunked transfer encoding**: warcio de-chunks the payload (``content_stream``).
- **ARC files**: read through warcio's ARC-to-WARC header conversion.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import os
import re
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import PurePosixPath
from typing import IO, Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from warcio.archiveiterator import ArchiveIterator
from warcio.recordloader import ArcWarcRecord

from llmflow.tasks.core.documents import Document, FetchFailure, utc_now
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.html_text import ExtractionError
from llmflow.tasks.ingest.page_decoding import DecodeError, decode_body

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz", ".wet", ".wet.gz", ".warc.wet.gz")
TEXT_SUFFIXES = (".txt",)
HTML_SUFFIXES = (".html", ".htm")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES: tuple[str, ...] = (
    ARCHIVE_SUFFIXES + TEXT_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
)

# Media types a WARC response may have to become a document (CrawlConfig.content_types' default).
DEFAULT_CONTENT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")

GZIP_MAGIC = b"\x1f\x8b"
_GLOB_CHARS = re.compile(r"[*?\[]")
_PARQUET_BATCH_ROWS = 1024
_SCAN_BLOCK = 1 << 20
# A JSON string can be up to 6 bytes per UTF-8 byte of text (\uXXXX escapes), so a line is read up
# to this multiple of max_page_bytes before it is called oversize without parsing it.
_JSON_ESCAPE_FACTOR = 6


def is_file_seed(seed: str) -> bool:
    """Whether a seed names files to read rather than a site to crawl (http(s) URLs, 'pydoc:')."""
    s = seed.strip()
    if not s:
        return False
    lowered = s.lower()
    return not lowered.startswith(("http://", "https://", "pydoc:"))


def supported_suffix(path: str) -> str | None:
    """The longest supported suffix of a path, or None (so .warc.wet.gz is not read as .gz)."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    matches = [s for s in FILE_SUFFIXES if name.endswith(s)]
    return max(matches, key=len) if matches else None


def expand_file_seed(seed: str) -> list[str]:
    """Every file a seed names, sorted, as paths or URLs that :func:`iter_file_documents` opens.

    A directory is walked recursively; its unsupported files are skipped, and so are names
    starting with '.' or '_' (hidden or bookkeeping files, as pyarrow.dataset skips them). A glob
    keeps its supported matches. A seed naming nothing raises FileNotFoundError; a seed naming only
    files of other types raises ValueError, since silently reading nothing hides a typo.
    """
    fs, root = url_to_fs(seed.strip())
    if fs.exists(root) and not fs.isdir(root):
        if supported_suffix(root) is None:
            raise ValueError(
                f"file seed {seed!r}: {root!r} is not a supported file type;"
                f" supported suffixes: {', '.join(FILE_SUFFIXES)}"
            )
        if supported_suffix(root) in PARQUET_SUFFIXES:
            _check_parquet_schema(fs, root)
        return [_as_url(fs, root)]

    if fs.exists(root):
        found = sorted(_walk(fs, root))
        base = root
    elif _GLOB_CHARS.search(root):
        found = []
        for match in sorted(fs.glob(root)):
            found.extend(sorted(_walk(fs, match)) if fs.isdir(match) else [match])
        base = _GLOB_CHARS.split(root, maxsplit=1)[0].rsplit("/", 1)[0] or "/"
    else:
        raise FileNotFoundError(f"file seed {seed!r} matches no file or directory")

    supported = sorted({p for p in found if supported_suffix(p) is not None})
    if supported:
        for path in supported:
            _check_inside(fs, seed, base, path)
            if supported_suffix(path) in PARQUET_SUFFIXES:
                _check_parquet_schema(fs, path)
        return [_as_url(fs, p) for p in supported]
    if not found:
        raise FileNotFoundError(f"file seed {seed!r} matches no file")
    shown = ", ".join(repr(p) for p in found[:5]) + (" ..." if len(found) > 5 else "")
    raise ValueError(
        f"file seed {seed!r} matches no supported file (found {shown});"
        f" supported suffixes: {', '.join(FILE_SUFFIXES)}"
    )


def _check_inside(fs: fsspec.AbstractFileSystem, seed: str, base: str, path: str) -> None:
    """Refuse a file a seed directory reaches through a symbolic link that leads out of it.

    A link in a shared or downloaded folder (``notes -> ~/.ssh/id_rsa``) would otherwise put a
    file the user never named into the shards and MLflow. A file named as a seed of its own is
    the user's explicit choice and is not checked.
    """
    if not isinstance(fs, LocalFileSystem):
        return  # object stores have no symbolic links
    real_base = os.path.realpath(base)
    target = os.path.realpath(path)
    if os.path.commonpath([real_base, target]) != real_base:
        raise ValueError(
            f"file seed {seed!r}: {path} is a symbolic link to {target}, outside {base};"
            " llmflow does not follow links out of a seed directory (copy the file in, or name"
            " it as a seed of its own)"
        )


def _check_parquet_schema(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """A Parquet seed needs a string ``text`` column: checked from its footer when the crawl is
    planned, so a wrong file is refused before any unit runs rather than failing mid-run."""
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"Parquet seed {path}: not a readable Parquet file ({error})") from error
    text_field = schema.field("text") if "text" in schema.names else None
    if text_field is None or not _is_string_type(text_field.type):
        found = ", ".join(f"{field.name}: {field.type}" for field in schema)
        raise ValueError(f"Parquet seed {path}: needs a string column 'text'; its columns: {found}")


def _walk(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    base = directory.rstrip("/")
    files = []
    for path in fs.find(base, withdirs=False):
        relative = path[len(base) :].strip("/")
        if not any(part.startswith((".", "_")) for part in relative.split("/")):
            files.append(path)
    return files


def _as_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Local files stay plain paths (readable in logs); other filesystems keep their protocol."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _document_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The url of a document that is a whole file: file:///abs/path, or the fsspec URL."""
    if isinstance(fs, LocalFileSystem):
        return PurePosixPath(path).as_uri()
    return fs.unstrip_protocol(path)


def iter_file_documents(
    path: str,
    extractor: BoundedExtractor,
    max_page_bytes: int,
    content_types: Sequence[str] = DEFAULT_CONTENT_TYPES,
) -> Iterator[Document | FetchFailure]:
    """Every document (kept or rejected) and fetch failure in one file, in file order.

    Damaged input yields ``malformed_record`` rejections, never an exception. A file that cannot
    be opened, or a Parquet file without a ``text`` column (a configuration error), does raise.
    """
    fs, p = url_to_fs(path)
    suffix = supported_suffix(p)
    if suffix is None:
        raise ValueError(
            f"{path!r} is not a supported file type; supported suffixes: {', '.join(FILE_SUFFIXES)}"
        )
    name = p.rsplit("/", 1)[-1]
    if suffix in ARCHIVE_SUFFIXES:
        reader = _ArchiveReader(fs, p, name, extractor, max_page_bytes, content_types)
        yield from reader.documents()
    elif suffix in TEXT_SUFFIXES + HTML_SUFFIXES:
        yield _whole_file_document(fs, p, suffix, extractor, max_page_bytes)
    elif suffix in JSONL_SUFFIXES:
        yield from _jsonl_documents(fs, p, name, max_page_bytes)
    else:
        yield from _parquet_documents(fs, p, name, max_page_bytes)


# ---------------------------------------------------------------------------------------------
# Shared pieces


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _rejected(
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


def _document_from_body(
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
            return _rejected(url, source, fetched_at, e.reason, getattr(e, "detail", "") or str(e))
        text = decoded
    text = text.removeprefix("\ufeff")
    if _media_type(content_type) == "text/plain":
        text = _normalize_newlines(text)
    else:
        try:
            text = extractor.extract(text, url=url)
        except ExtractionError as e:
            return _rejected(url, source, fetched_at, e.reason, e.detail)
    if not text.strip():
        return _rejected(url, source, fetched_at, "empty")
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


def _parse_datetime(value: Any) -> datetime | None:
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


def _parse_http_date(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


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
        parsed = _parse_datetime(value)
        if parsed is not None:
            return parsed
    return utc_now()


@contextlib.contextmanager
def _open_decompressed(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[IO[bytes]]:
    """A buffered binary stream of the file, gunzipped when its first bytes say gzip.

    The magic bytes decide, not the suffix: '.jsonl.gz' files that are not compressed and
    compressed files without '.gz' both occur.
    """
    with fs.open(path, "rb") as raw:
        buffered = io.BufferedReader(raw, buffer_size=_SCAN_BLOCK)
        if buffered.peek(2)[:2] == GZIP_MAGIC:
            with gzip.GzipFile(fileobj=buffered, mode="rb") as unzipped:
                yield unzipped  # type: ignore[misc]
        else:
            yield buffered


# ---------------------------------------------------------------------------------------------
# Plain text and HTML files: one document per file


def _whole_file_document(
    fs: fsspec.AbstractFileSystem,
    path: str,
    suffix: str,
    extractor: BoundedExtractor,
    max_page_bytes: int,
) -> Document:
    url = _document_url(fs, path)
    fetched_at = _modified_time(fs, path)
    try:
        with _open_decompressed(fs, path) as f:
            body = f.read(max_page_bytes + 1)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        return _rejected(url, "file", fetched_at, "malformed_record", f"{path}: {e}")
    if len(body) > max_page_bytes:
        return _rejected(url, "file", fetched_at, "oversize", f"over {max_page_bytes} bytes")
    content_type = "text/plain" if suffix in TEXT_SUFFIXES else "text/html"
    return _document_from_body(body, content_type, url, "file", fetched_at, extractor)


# ---------------------------------------------------------------------------------------------
# JSON Lines: one document per line with a "text" field


def _jsonl_documents(
    fs: fsspec.AbstractFileSystem, path: str, name: str, max_page_bytes: int
) -> Iterator[Document]:
    source = f"jsonl:{name}"
    line_limit = max_page_bytes * _JSON_ESCAPE_FACTOR + 1024
    lineno = 0
    try:
        with _open_decompressed(fs, path) as f:
            for lineno, line in _bounded_lines(f, line_limit):
                if line is None:
                    yield _rejected(
                        None, source, None, "oversize", f"line {lineno}: over {line_limit} bytes"
                    )
                elif line.strip():
                    yield _jsonl_document(line, lineno, source, max_page_bytes)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # A truncated or corrupt gzip stream: what came before is kept, the rest is lost.
        yield _rejected(None, source, None, "malformed_record", f"{path}: after line {lineno}: {e}")


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
                rest = stream.readline(_SCAN_BLOCK)
                if not rest or rest.endswith(b"\n"):
                    break
            yield lineno, None
        else:
            yield lineno, line


def _jsonl_document(line: bytes, lineno: int, source: str, max_page_bytes: int) -> Document:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        return _rejected(None, source, None, "malformed_record", f"line {lineno}: not JSON: {e}")
    if not isinstance(record, dict):
        return _rejected(
            None, source, None, "malformed_record", f"line {lineno}: not a JSON object"
        )
    url = _record_url(record)
    fetched_at = _record_time(record)
    text = record.get("text")
    if not isinstance(text, str):
        return _rejected(
            url,
            source,
            fetched_at,
            "malformed_record",
            f"line {lineno}: no string 'text' field (got {type(text).__name__})",
        )
    return _text_document(text, url, source, fetched_at, max_page_bytes, f"line {lineno}")


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
        parsed = _parse_datetime(value)
        if parsed is not None:
            return parsed
    return utc_now()


def _text_document(
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
        return _rejected(url, source, fetched_at, "oversize", f"{where}: {size} bytes")
    if not text.strip():
        return _rejected(url, source, fetched_at, "empty", where)
    return Document(url=url, text=text, source=source, fetched_at=fetched_at)


# ---------------------------------------------------------------------------------------------
# Parquet: one document per row of a "text" column, read batch by batch


def _parquet_documents(
    fs: fsspec.AbstractFileSystem, path: str, name: str, max_page_bytes: int
) -> Iterator[Document]:
    source = f"parquet:{name}"
    with fs.open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            yield _rejected(None, source, None, "malformed_record", f"{path}: {e}")
            return
        schema = parquet.schema_arrow
        text_field = schema.field("text") if "text" in schema.names else None
        if text_field is None or not _is_string_type(text_field.type):
            found = ", ".join(f"{field.name}: {field.type}" for field in schema)
            raise ValueError(f"{path}: needs a string column 'text'; its columns are {found}")
        columns = ["text"] + [c for c in ("url", "fetched_at") if c in schema.names and c != "text"]
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                data = {c: batch.column(c).to_pylist() for c in columns}
                for i in range(batch.num_rows):
                    row += 1
                    yield _parquet_row(data, i, row, source, max_page_bytes)
        except (pa.ArrowException, OSError) as e:
            yield _rejected(None, source, None, "malformed_record", f"{path}: after row {row}: {e}")


def _is_string_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _parquet_row(
    data: dict[str, list[Any]], i: int, row: int, source: str, max_page_bytes: int
) -> Document:
    url = data["url"][i] if "url" in data and isinstance(data["url"][i], str) else None
    fetched_at = _parse_datetime(data["fetched_at"][i]) if "fetched_at" in data else None
    text = data["text"][i]
    if text is None:
        return _rejected(url, source, fetched_at, "malformed_record", f"row {row}: text is null")
    return _text_document(text, url, source, fetched_at, max_page_bytes, f"row {row}")


# ---------------------------------------------------------------------------------------------
# WARC, ARC and WET archives


@dataclass(frozen=True, slots=True)
class _BrokenRecord:
    """A place in an archive that could not be read as a whole record."""

    offset: int
    error: str
    url: str | None = None


class _TruncationNotingStream:
    """A gzip stream that ends quietly where the file ends early, and remembers that it did.

    gzip raises EOFError on a cut file; warcio takes any EOFError while reading a record header
    for a clean end of file, so without this a cut whole-file gzip would lose its tail silently.
    """

    def __init__(self, stream: gzip.GzipFile) -> None:
        self.stream = stream
        self.truncated = False

    def read(self, size: int = -1) -> bytes:
        try:
            return self.stream.read(size)
        except EOFError:
            self.truncated = True
            return b""

    def readline(self, size: int = -1) -> bytes:
        try:
            return self.stream.readline(size)
        except EOFError:
            self.truncated = True
            return b""

    def tell(self) -> int:
        return self.stream.tell()


class _ArchiveReader:
    """One archive file's records as documents, surviving damage by resynchronising.

    warcio's iterator is a generator: once it raises, it is finished, and where a gzip member is
    corrupt it may also just stop early. To go on after a damaged record this class finds the next
    record boundary itself and starts a fresh iterator there.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        name: str,
        extractor: BoundedExtractor,
        max_page_bytes: int,
        content_types: Sequence[str],
    ) -> None:
        self.fs = fs
        self.path = path
        self.extractor = extractor
        self.max_page_bytes = max_page_bytes
        self.content_types = {t.strip().lower() for t in content_types}
        self.is_arc = name.lower().endswith((".arc", ".arc.gz"))
        self.response_source = f"{'arc' if self.is_arc else 'warc'}:{name}"
        self.conversion_source = f"wet:{name}"
        is_wet = name.lower().endswith((".wet", ".wet.gz"))
        self.file_source = self.conversion_source if is_wet else self.response_source
        # The last record whose end was checked, and what was wrong with it (None: intact).
        self._checked: tuple[ArcWarcRecord, str | None] | None = None
        # The last record the converter itself rejected as malformed (not to be reported twice).
        self._reported_record: ArcWarcRecord | None = None

    def documents(self) -> Iterator[Document | FetchFailure]:
        with self.fs.open(self.path, "rb") as f:
            for item in self._records(f):
                if isinstance(item, _BrokenRecord):
                    detail = f"{self.path} at byte {item.offset}: {item.error}"
                    yield _rejected(item.url, self.file_source, None, "malformed_record", detail)
                    continue
                result = self._convert(item)
                if result is not None:
                    yield result

    # -- iteration with resynchronisation -----------------------------------------------------

    def _records(self, f: IO[bytes]) -> Iterator[ArcWarcRecord | _BrokenRecord]:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        member_gzipped = f.read(2) == GZIP_MAGIC
        start: int | None = 0
        while start is not None:
            failed_at = yield from self._records_from(f, start, size)
            if failed_at is None:
                return
            start = self._resync(f, failed_at + 1, member_gzipped)
            if start is not None:
                log.warning(
                    "%s: damaged data at byte %d, resuming at %d", self.path, failed_at, start
                )

    def _records_from(
        self, f: IO[bytes], start: int, size: int
    ) -> Generator[ArcWarcRecord | _BrokenRecord, None, int | None]:
        """Records from start on; returns where reading broke off, or None at a clean end.

        A damaged record ends this pass even when warcio would go on: after a gzip member fails
        half way, warcio feeds the rest of the file to the broken decompressor and finds nothing.
        """
        f.seek(start)
        iterator = ArchiveIterator(f, arc2warc=True)
        yielded = 0
        try:
            for record in iterator:
                yield record
                yielded += 1
                damage = self._finish(record)
                if damage is not None:
                    if not self._reported(record):
                        yield _BrokenRecord(iterator.offset, damage, _target_uri(record))
                    return iterator.offset
        except Exception as e:  # warcio raises many types on damaged input
            if "non-chunked gzip" in str(e):
                log.info("%s is gzipped as one member; reading it as one stream", self.path)
                yield from self._whole_gzip_records(f, start, skip=yielded)
                return None
            yield _BrokenRecord(iterator.offset, f"{type(e).__name__}: {_first_line(e)}")
            return iterator.offset
        if _only_padding_after(f, iterator.offset, size):
            return None
        # warcio stopped early without an error: a gzip member it could not decompress.
        yield _BrokenRecord(iterator.offset, "unreadable data where a record should start")
        return iterator.offset

    def _whole_gzip_records(
        self, f: IO[bytes], start: int, skip: int
    ) -> Iterator[ArcWarcRecord | _BrokenRecord]:
        """Records of a gzip member holding many, through Python's gzip: no resynchronising.

        Offsets in its rejections count decompressed bytes from ``start``. The ``skip`` records
        warcio already yielded before it refused the member are not yielded again.
        """
        f.seek(start)
        stream = _TruncationNotingStream(gzip.GzipFile(fileobj=f, mode="rb"))
        iterator = ArchiveIterator(stream, arc2warc=True)
        last_damaged = False
        try:
            for index, record in enumerate(iterator):
                if index < skip:
                    continue
                yield record
                damage = self._finish(record)
                last_damaged = damage is not None
                if damage is not None and not self._reported(record):
                    yield _BrokenRecord(iterator.offset, damage, _target_uri(record))
        except Exception as e:
            yield _BrokenRecord(iterator.offset, f"{type(e).__name__}: {_first_line(e)}")
            return
        if stream.truncated and not last_damaged:
            yield _BrokenRecord(iterator.offset, "gzip stream ends early (truncated file)")

    def _finish(self, record: ArcWarcRecord) -> str | None:
        """Read a record to its end; say what is wrong if it is shorter than it declares.

        warcio returns a cut file's last record, or a record whose gzip member fails half way, as
        if it were whole, just with fewer bytes than its Content-Length: that is what is checked.
        Done once per record, by the converter (before it makes a document) or by the iterator.
        """
        if self._checked is not None and self._checked[0] is record:
            return self._checked[1]
        damage = None
        try:
            while record.raw_stream.read(_SCAN_BLOCK):
                pass
            missing = getattr(record.raw_stream, "limit", 0)
            if missing:
                declared = record.rec_headers.get_header("Content-Length")
                damage = f"truncated record: {missing} of {declared} bytes missing"
        except Exception as e:  # a corrupt gzip member surfaces here as zlib/gzip errors
            damage = f"{type(e).__name__}: {_first_line(e)}"
        self._checked = (record, damage)
        return damage

    def _reported(self, record: ArcWarcRecord) -> bool:
        """Whether the converter already turned this (damaged) record into a rejection."""
        return self._reported_record is record

    def _resync(self, f: IO[bytes], position: int, member_gzipped: bool) -> int | None:
        """The offset of the next intact record at or after position, or None (end of file)."""
        if member_gzipped:
            candidates = _find_all(f, GZIP_MAGIC + b"\x08", position)
            return next((c for c in candidates if _gzip_member_starts_record(f, c)), None)
        if self.is_arc:
            return None  # uncompressed ARC has no marker to look for
        return next((c + 1 for c in _find_all(f, b"\nWARC/", position - 1)), None)

    # -- one record to a document ------------------------------------------------------------

    def _convert(self, record: ArcWarcRecord) -> Document | FetchFailure | None:
        if record.rec_type == "conversion":
            return self._conversion(record)
        if record.rec_type in ("response", "resource"):
            return self._response(record)
        return None  # warcinfo, request, metadata, revisit: not documents

    def _record_time(self, record: ArcWarcRecord) -> datetime:
        """WARC-Date, else the HTTP Date header (ClueWeb09's WARC-Date is not a date), else now."""
        parsed = _parse_datetime(record.rec_headers.get_header("WARC-Date"))
        if parsed is None and record.http_headers is not None:
            parsed = _parse_http_date(record.http_headers.get_header("Date"))
        return parsed or utc_now()

    def _read_payload(self, record: ArcWarcRecord) -> tuple[bytes | None, str | None]:
        """(the payload, or None when oversize; what is wrong with the record, or None).

        At most max_page_bytes + 1 decoded bytes are read, so a decompression bomb stays small.
        """
        try:
            payload = record.content_stream().read(self.max_page_bytes + 1)
        except Exception as e:  # de-chunking and content decoding raise many types
            damage: str | None = f"{type(e).__name__}: {_first_line(e)}"
        else:
            damage = self._finish(record)
        if damage is not None:
            self._reported_record = record
            return None, damage
        if len(payload) > self.max_page_bytes:
            return None, None
        return payload, None

    def _conversion(self, record: ArcWarcRecord) -> Document:
        url = _target_uri(record)
        source = self.conversion_source
        fetched_at = self._record_time(record)
        payload, damage = self._read_payload(record)
        if damage:
            return _rejected(url, source, fetched_at, "malformed_record", damage)
        if payload is None:
            return _rejected(url, source, fetched_at, "oversize", f"over {self.max_page_bytes}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return _rejected(url, source, fetched_at, "undecodable", str(e))
        return _text_document(text, url, source, fetched_at, self.max_page_bytes, "record")

    def _response(self, record: ArcWarcRecord) -> Document | FetchFailure | None:
        url = _target_uri(record) or ""
        if not url.lower().startswith(("http://", "https://")):
            return None  # dns:, metadata://, filedesc://: crawler bookkeeping, not pages
        source = self.response_source
        fetched_at = self._record_time(record)
        if record.rec_type == "resource":
            status, content_type = 200, record.rec_headers.get_header("Content-Type")
        elif record.http_headers is None:
            self._reported_record = record
            return _rejected(url, source, fetched_at, "malformed_record", "no HTTP headers")
        else:
            code = record.http_headers.get_statuscode()
            try:
                status = int(code)
            except (TypeError, ValueError):
                self._reported_record = record
                detail = f"bad HTTP status line {record.http_headers.statusline!r}"
                return _rejected(url, source, fetched_at, "malformed_record", detail)
            content_type = record.http_headers.get_header("Content-Type")
            if not content_type:
                content_type = record.rec_headers.get_header("WARC-Identified-Payload-Type")

        if status != 200:
            location = record.http_headers.get_header("Location") if record.http_headers else None
            detail = f"Location: {location}" if location else ""
            return FetchFailure(url=url, reason=f"http_{status}", detail=detail, status=status)
        if _media_type(content_type) not in self.content_types:
            return FetchFailure(
                url=url,
                reason="content_type_not_allowed",
                detail=content_type or "no Content-Type",
                status=status,
            )
        payload, damage = self._read_payload(record)
        if damage:
            return _rejected(url, source, fetched_at, "malformed_record", damage)
        if payload is None:
            return _rejected(url, source, fetched_at, "oversize", f"over {self.max_page_bytes}")
        cut = bool(record.rec_headers.get_header("WARC-Truncated"))
        return _document_from_body(
            payload, content_type, url, source, fetched_at, self.extractor, cut=cut
        )


def _target_uri(record: ArcWarcRecord) -> str | None:
    return record.rec_headers.get_header("WARC-Target-URI")


def _only_padding_after(f: IO[bytes], offset: int, size: int) -> bool:
    """Whether nothing but blank or zero bytes follows offset (some writers pad their files)."""
    if offset >= size:
        return True
    if size - offset > _SCAN_BLOCK:
        return False
    f.seek(offset)
    return not f.read(size - offset).strip(b"\0\r\n\t ")


def _first_line(error: BaseException) -> str:
    """The error's first line, printable and short: warcio quotes binary junk it failed on."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return "".join(ch if ch.isprintable() else "?" for ch in line[:200])


def _find_all(f: IO[bytes], needle: bytes, position: int) -> Iterable[int]:
    """Offsets of needle in the file at or after position, read a block at a time."""
    position = max(position, 0)
    overlap = len(needle) - 1
    while True:
        f.seek(position)
        block = f.read(_SCAN_BLOCK)
        if len(block) < len(needle):
            return
        index = block.find(needle)
        while index != -1:
            yield position + index
            index = block.find(needle, index + 1)
        if len(block) < _SCAN_BLOCK:
            return
        position += len(block) - overlap


def _gzip_member_starts_record(f: IO[bytes], offset: int) -> bool:
    """Whether a gzip member starts at offset and begins with a WARC or ARC record header.

    Three bytes of gzip magic occur by chance inside compressed data; decompressing a little
    tells a real member from such an accident.
    """
    f.seek(offset)
    head = f.read(64 * 1024)
    try:
        data = zlib.decompressobj(wbits=31).decompress(head, 4096)
    except zlib.error:
        return False
    first_line = data.split(b"\n", 1)[0]
    if first_line.startswith(b"WARC/"):
        return True
    # ARC v1 header line: URL IP-address archive-date content-type length
    fields = first_line.split()
    return len(fields) >= 5 and fields[-1].isdigit() and b"://" in fields[0]
