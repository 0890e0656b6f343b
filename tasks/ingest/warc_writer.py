"""Keep every HTTP response the crawler received, raw, as a gzipped WARC file.

The WARC is the crawl's evidence: the extracted text can be recomputed from it with a better
extractor, and anyone can check what a server actually sent. Records are written as the crawler
receives responses; the file appears under its final name only when the recorder is closed, so a
reader (or a resumed stage) never mistakes a half-written archive for a finished one.
"""

from __future__ import annotations

import io
import threading
import uuid
from datetime import UTC, datetime
from importlib.metadata import version
from types import TracebackType
from urllib.parse import urlsplit

from fsspec.core import url_to_fs
from warcio.statusandheaders import StatusAndHeaders
from warcio.timeutils import datetime_to_iso_date
from warcio.warcwriter import WARCWriter

from llmflow.tasks.ingest.crawl_config import redact_url

# The body handed to record_response has had its transfer coding (chunked) removed, so keeping a
# Transfer-Encoding header would make WARC readers try to de-chunk it again.
_HOP_BY_HOP = {"transfer-encoding"}
# Request headers that carry credentials. The WARC is evidence meant to be shared and replayed;
# a password or session cookie in it would be handed to everyone who reads it.
_SECRET_REQUEST_HEADERS = {"authorization", "cookie", "proxy-authorization"}


class WarcRecorder:
    """Writes request/response record pairs for each response, plus one warcinfo record.

    Thread-safe: one lock around each pair, so concurrent callers never interleave records.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fs, self._final = url_to_fs(path)
        parent = self._final.rsplit("/", 1)[0] if "/" in self._final else ""
        if parent:
            self._fs.makedirs(parent, exist_ok=True)
        self._tmp = f"{self._final}.tmp-{uuid.uuid4().hex}"
        self._file = self._fs.open(self._tmp, "wb")
        self._writer = WARCWriter(self._file, gzip=True)
        self._lock = threading.Lock()
        self._closed = False
        self.records = 0
        info = {
            "software": f"llmflow/{version('llmflow')} warcio/{version('warcio')}",
            "format": "WARC File Format 1.0",
            "description": "HTTP responses as received by the llmflow crawler",
        }
        filename = self._final.rsplit("/", 1)[-1]
        self._writer.write_record(self._writer.create_warcinfo_record(filename, info))

    def record_response(
        self,
        url: str,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        body: bytes,
        fetched_at: datetime,
        *,
        request_headers: list[tuple[str, str]] | None = None,
        truncated: str | None = None,
    ) -> None:
        """Append a GET request record and its response record for ``url``.

        ``body`` is the payload as received (content coding such as gzip kept, so the stored
        headers still describe it). ``truncated`` is the WARC-Truncated reason ("length", "time",
        ...) when the crawler stopped reading early: the record then says it holds a prefix.
        ``request_headers`` are the headers the crawler sent; without them the request record
        holds the Host header only. Credentials never go in: userinfo is dropped from ``url`` and
        Authorization, Cookie and Proxy-Authorization from the request headers.
        """
        url = redact_url(url)
        warc_date = datetime_to_iso_date(_as_naive_utc(fetched_at))
        response_headers = StatusAndHeaders(
            f"{status} {reason}".strip(),
            [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP],
            protocol="HTTP/1.1",
        )
        response_warc = {"WARC-Date": warc_date}
        if truncated:
            response_warc["WARC-Truncated"] = truncated
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        secret = _SECRET_REQUEST_HEADERS
        sent = [(k, v) for k, v in request_headers or [] if k.lower() not in secret]
        if not any(k.lower() == "host" for k, _ in sent):
            sent.insert(0, ("Host", parts.netloc))
        # warcio's reader splits a request line into protocol="GET" and the rest: write it the same
        # way so a record read back and written again is byte-identical.
        request_http = StatusAndHeaders(
            f"{target} HTTP/1.1", sent, protocol="GET", is_http_request=True
        )
        with self._lock:
            if self._closed:
                raise ValueError(f"WarcRecorder({self.path!r}) is closed")
            response = self._writer.create_warc_record(
                url,
                "response",
                payload=io.BytesIO(body),
                length=len(body),
                http_headers=response_headers,
                warc_headers_dict=response_warc,
            )
            request = self._writer.create_warc_record(
                url,
                "request",
                payload=io.BytesIO(b""),
                length=0,
                http_headers=request_http,
                warc_headers_dict={"WARC-Date": warc_date},
            )
            self._writer.write_request_response_pair(request, response)
            self.records += 1

    def close(self) -> None:
        """Finish the file and move it to its final name; a second call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.close()
            self._fs.mv(self._tmp, self._final)

    def abort(self) -> None:
        """Drop the partial file: a failed crawl leaves no archive that looks complete."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._file.close()
            if self._fs.exists(self._tmp):
                self._fs.rm(self._tmp)

    def __enter__(self) -> WarcRecorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _as_naive_utc(moment: datetime) -> datetime:
    """warcio formats naive datetimes as UTC; an aware one must be converted first."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment
