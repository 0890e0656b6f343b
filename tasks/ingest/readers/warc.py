"""WARC, ARC and WET archives: one document per response, resource or conversion record.

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

import gzip
import io
import logging
import zlib
from collections.abc import Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO

import fsspec
from warcio.archiveiterator import ArchiveIterator
from warcio.recordloader import ArcWarcRecord

from llmflow.tasks.core.documents import Document, FetchFailure, utc_now
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.readers.common import (
    GZIP_MAGIC,
    SCAN_BLOCK,
    document_from_body,
    media_type,
    parse_datetime,
    parse_http_date,
    rejected,
    text_document,
)

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz", ".wet", ".wet.gz", ".warc.wet.gz")

# Media types a WARC response may have to become a document (CrawlConfig.content_types' default).
DEFAULT_CONTENT_TYPES = ("text/html", "application/xhtml+xml", "text/plain")


@dataclass(frozen=True, slots=True)
class _BrokenRecord:
    """A place in an archive that could not be read as a whole record."""

    offset: int
    error: str
    url: str | None = None


@dataclass(frozen=True, slots=True)
class _Page:
    """A response's payload, read from the archive, whose decoding and extraction are still to
    do (in the extractor's pool, beside other pages)."""

    body: bytes
    content_type: str | None
    url: str
    source: str
    fetched_at: datetime
    extractor: BoundedExtractor
    cut: bool

    def document(self) -> Document:
        return document_from_body(
            self.body,
            self.content_type,
            self.url,
            self.source,
            self.fetched_at,
            self.extractor,
            cut=self.cut,
        )


def _finished(outcome: Document | FetchFailure | _Page) -> Document | FetchFailure:
    return outcome.document() if isinstance(outcome, _Page) else outcome


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


class ArchiveReader:
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
        """Every outcome in file order. Records are read one after the other (warcio streams
        them); their pages are decoded and extracted several at a time, by the extractor's pool
        (:meth:`BoundedExtractor.imap`), which keeps a few pages in flight and their order."""
        with self.fs.open(self.path, "rb") as f:
            yield from self.extractor.imap(_finished, self._outcomes(f))

    def _outcomes(self, f: IO[bytes]) -> Iterator[Document | FetchFailure | _Page]:
        for item in self._records(f):
            if isinstance(item, _BrokenRecord):
                detail = f"{self.path} at byte {item.offset}: {item.error}"
                yield rejected(item.url, self.file_source, None, "malformed_record", detail)
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
            while record.raw_stream.read(SCAN_BLOCK):
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

    def _convert(self, record: ArcWarcRecord) -> Document | FetchFailure | _Page | None:
        if record.rec_type == "conversion":
            return self._conversion(record)
        if record.rec_type in ("response", "resource"):
            return self._response(record)
        return None  # warcinfo, request, metadata, revisit: not documents

    def _record_time(self, record: ArcWarcRecord) -> datetime:
        """WARC-Date, else the HTTP Date header (ClueWeb09's WARC-Date is not a date), else now."""
        parsed = parse_datetime(record.rec_headers.get_header("WARC-Date"))
        if parsed is None and record.http_headers is not None:
            parsed = parse_http_date(record.http_headers.get_header("Date"))
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
            return rejected(url, source, fetched_at, "malformed_record", damage)
        if payload is None:
            return rejected(url, source, fetched_at, "oversize", f"over {self.max_page_bytes}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as e:
            return rejected(url, source, fetched_at, "undecodable", str(e))
        return text_document(text, url, source, fetched_at, self.max_page_bytes, "record")

    def _response(self, record: ArcWarcRecord) -> Document | FetchFailure | _Page | None:
        url = _target_uri(record) or ""
        if not url.lower().startswith(("http://", "https://")):
            return None  # dns:, metadata://, filedesc://: crawler bookkeeping, not pages
        source = self.response_source
        fetched_at = self._record_time(record)
        if record.rec_type == "resource":
            status, content_type = 200, record.rec_headers.get_header("Content-Type")
        elif record.http_headers is None:
            self._reported_record = record
            return rejected(url, source, fetched_at, "malformed_record", "no HTTP headers")
        else:
            code = record.http_headers.get_statuscode()
            try:
                status = int(code)
            except (TypeError, ValueError):
                self._reported_record = record
                detail = f"bad HTTP status line {record.http_headers.statusline!r}"
                return rejected(url, source, fetched_at, "malformed_record", detail)
            content_type = record.http_headers.get_header("Content-Type")
            if not content_type:
                content_type = record.rec_headers.get_header("WARC-Identified-Payload-Type")

        if status != 200:
            location = record.http_headers.get_header("Location") if record.http_headers else None
            detail = f"Location: {location}" if location else ""
            return FetchFailure(url=url, reason=f"http_{status}", detail=detail, status=status)
        if media_type(content_type) not in self.content_types:
            return FetchFailure(
                url=url,
                reason="content_type_not_allowed",
                detail=content_type or "no Content-Type",
                status=status,
            )
        payload, damage = self._read_payload(record)
        if damage:
            return rejected(url, source, fetched_at, "malformed_record", damage)
        if payload is None:
            return rejected(url, source, fetched_at, "oversize", f"over {self.max_page_bytes}")
        cut = bool(record.rec_headers.get_header("WARC-Truncated"))
        return _Page(payload, content_type, url, source, fetched_at, self.extractor, cut)


def _target_uri(record: ArcWarcRecord) -> str | None:
    return record.rec_headers.get_header("WARC-Target-URI")


def _only_padding_after(f: IO[bytes], offset: int, size: int) -> bool:
    """Whether nothing but blank or zero bytes follows offset (some writers pad their files)."""
    if offset >= size:
        return True
    if size - offset > SCAN_BLOCK:
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
        block = f.read(SCAN_BLOCK)
        if len(block) < len(needle):
            return
        index = block.find(needle)
        while index != -1:
            yield position + index
            index = block.find(needle, index + 1)
        if len(block) < SCAN_BLOCK:
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
