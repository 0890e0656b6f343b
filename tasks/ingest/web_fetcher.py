"""Fetching for the crawler: politeness per host, robots.txt, bounded bodies, the WARC record.

Politeness is per host name: one request start per ``politeness_delay_s`` (or robots.txt's
Crawl-delay when longer), whatever the global concurrency. robots.txt follows RFC 9309. A request
is retried with exponential backoff after a 5xx, a timeout or a lost connection; its body is read
up to the byte limit, content coding undone with an output bound (a compression bomb stops at the
limit), and the raw exchange is archived without the request headers that carry credentials.

With ``allow_private_addresses`` off, every connection passes the address check at connect time
(:mod:`crawl_guards`); seed credentials (:attr:`Fetcher.credentials`) are sent to their origin
only.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urljoin, urlsplit
from urllib.robotparser import RobotFileParser

import httpx

from llmflow.tasks.core.documents import utc_now
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.ingest.crawl_guards import AddressRefused, global_only_transport
from llmflow.tasks.ingest.warc_writer import WarcRecorder
from llmflow.tasks.ingest.web_scope import normalize_url, origin_of

# RFC 9309 §2.5: crawlers must parse at least the first 500 KiB of a robots.txt.
ROBOTS_MAX_BYTES = 512 * 1024
# RFC 9309 §2.3.1.2: follow at least five redirects for robots.txt, then treat it as unavailable.
ROBOTS_MAX_REDIRECTS = 5
# A robots.txt may ask for any Crawl-delay; beyond this the crawl would look hung, so it is capped.
MAX_CRAWL_DELAY_S = 60.0
# A server that trickles one byte just inside read_timeout_s would hold a slot for
# max_page_bytes × read_timeout_s; no response may take longer than this many read timeouts.
RESPONSE_DEADLINE_READS = 3
# Request headers that carry credentials: sent, never archived (the WARC is shared evidence).
SECRET_REQUEST_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


@dataclass(slots=True)
class Robots:
    """One origin's robots.txt verdict: parsed rules, or allow/deny everything (RFC 9309 §2.3.1)."""

    parser: RobotFileParser | None
    allow_all: bool
    detail: str = ""
    crawl_delay: float = 0.0
    # Why a page it refuses fails: robots_disallowed (the file forbids it), robots_unreachable
    # (the file could not be fetched: 5xx, timeout, lost connection; RFC 9309 then says disallow
    # all, but the fix is on the server, so the reason says so), or address_refused when the
    # host itself may not be connected to (the page would be refused for that anyway; say so).
    reason: str = "robots_disallowed"

    def allows(self, url: str, user_agent: str) -> bool:
        if urlsplit(url).path == "/robots.txt":
            return True  # RFC 9309 §2.2.2: always allowed
        if self.parser is None:
            return self.allow_all
        return self.parser.can_fetch(user_agent, url)


def _parse_robots(body: bytes, truncated: bool, user_agent: str) -> Robots:
    text = body.decode("utf-8", "replace").lstrip("\ufeff")
    lines = text.splitlines()
    if truncated and lines:
        lines.pop()  # the last line was cut mid-way
    parser = RobotFileParser()
    parser.parse(lines)
    delay = parser.crawl_delay(user_agent)
    return Robots(parser, True, crawl_delay=float(delay) if delay else 0.0)


@dataclass(slots=True)
class Response:
    url: str
    status: int
    reason: str
    headers: httpx.Headers
    body: bytes  # content-decoded, at most the byte limit
    oversize: bool
    undecodable: str  # why the content coding could not be undone; "" when it could
    fetched_at: datetime


@dataclass(slots=True)
class Failed:
    reason: str
    detail: str
    status: int | None = None


class _ContentDecoder:
    """Undoes gzip/deflate with an output bound, so a compression bomb stops at the byte limit.

    httpx would decode too, but then the raw payload (what the WARC must keep, with the headers
    that describe it) would be gone.
    """

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header
        self._started = False

    def feed(self, data: bytes, max_out: int) -> tuple[bytes, bool]:
        """(output, hit_bound): stops once ``max_out`` bytes came out."""
        if not self._started and self.coding == "deflate":
            self._started = True
            try:
                probe = zlib.decompressobj(zlib.MAX_WBITS | 32)
                out = probe.decompress(data, max_out)
                self._zlib = probe
                return out, bool(probe.unconsumed_tail)
            except zlib.error:  # "deflate" sent without the zlib wrapper, as many servers do
                self._zlib = zlib.decompressobj(-zlib.MAX_WBITS)
        self._started = True
        out = self._zlib.decompress(data, max_out)
        return out, bool(self._zlib.unconsumed_tail)

    def flush(self) -> bytes:
        return self._zlib.flush()


def _content_decoder(content_encoding: str | None) -> _ContentDecoder | None:
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in ("gzip", "x-gzip", "deflate"):
        return _ContentDecoder(codings[0])
    raise ValueError(f"unsupported content-encoding {content_encoding!r}")


def _error_text(error: BaseException) -> str:
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class _HostGate:
    """Spaces request starts to one host: the lock is held while waiting, so starts queue up."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = asyncio.Lock()
        self.last_start = float("-inf")


class Fetcher:
    """The crawl's HTTP side: one client, the global request slots, each host's turn, each
    origin's robots.txt verdict, and the seeds' credentials by origin.

    ``refusal`` is the crawl's scope and exclusion check: a robots.txt redirect passes it like a
    page's redirect does.
    """

    def __init__(
        self,
        config: CrawlConfig,
        warc: WarcRecorder | None,
        refusal: Callable[[str], str | None],
    ) -> None:
        self.config = config
        self.warc = warc
        self.refusal = refusal
        self.robots: dict[str, Robots] = {}
        self.robots_locks: dict[str, asyncio.Lock] = {}
        self.gates: dict[str, _HostGate] = {}
        self.deadline_s = config.connect_timeout_s + RESPONSE_DEADLINE_READS * config.read_timeout_s
        # Basic-auth credentials of the seeds, by origin: used for requests to that origin only,
        # never kept in a URL (normalize_url drops them), so no output or log can show them.
        self.credentials: dict[tuple[str, str, int], httpx.BasicAuth] = {}
        self.slots: asyncio.Semaphore
        self.client: httpx.AsyncClient

    @asynccontextmanager
    async def session(self) -> AsyncIterator[None]:
        """The global request slots and the HTTP client, open for one crawl."""
        self.slots = asyncio.Semaphore(self.config.concurrency)
        async with self._client() as self.client:
            yield

    def _client(self) -> httpx.AsyncClient:
        c = self.config
        accept = ",".join([*c.content_types, "*/*;q=0.1"])
        # The semaphore bounds requests in flight; the pool only keeps connections alive.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=c.concurrency)
        return httpx.AsyncClient(
            headers={
                "User-Agent": c.user_agent,
                "Accept": accept,
                "Accept-Encoding": "gzip, deflate",
            },
            timeout=httpx.Timeout(
                connect=c.connect_timeout_s,
                read=c.read_timeout_s,
                write=c.read_timeout_s,
                pool=c.connect_timeout_s,
            ),
            limits=limits,
            # A transport of its own also leaves env proxies out: the address check must see
            # the address connected to, which behind a proxy would be the proxy's.
            transport=None if c.allow_private_addresses else global_only_transport(limits),
            follow_redirects=False,
        )

    async def robots_for(self, url: str) -> Robots:
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin in self.robots:
            return self.robots[origin]
        lock = self.robots_locks.setdefault(origin, asyncio.Lock())
        async with lock:
            if origin not in self.robots:
                robots = await self._load_robots(origin)
                self.robots[origin] = robots
                if robots.crawl_delay:
                    gate = self._gate(parts.hostname or "")
                    gate.delay = max(gate.delay, min(robots.crawl_delay, MAX_CRAWL_DELAY_S))
        return self.robots[origin]

    async def _load_robots(self, origin: str) -> Robots:
        """RFC 9309 §2.3.1: 2xx parsed; 4xx allow all; 5xx and unreachable disallow all."""
        target = f"{origin}/robots.txt"
        for _ in range(ROBOTS_MAX_REDIRECTS + 1):
            response = await self.fetch(target, ROBOTS_MAX_BYTES, lambda status, headers: True)
            if isinstance(response, Failed):
                if response.reason == "address_refused":
                    return Robots(None, False, response.detail, reason=response.reason)
                if response.status is not None:  # 5xx after the retries
                    detail = f"robots.txt at {target} answered {response.status} {response.detail}"
                else:
                    detail = (
                        f"robots.txt at {target} unreachable ({response.reason}: {response.detail})"
                    )
                return Robots(None, False, detail, reason="robots_unreachable")
            location = response.headers.get("location")
            if 300 <= response.status < 400 and location:
                try:
                    target = normalize_url(urljoin(target, location.strip()))
                except ValueError:
                    break
                # The same checks as a page's redirect: a robots.txt must not lead the crawler
                # to another host or port (SSRF). Its own origin stays allowed even when the
                # scope is a path prefix that /robots.txt is outside of.
                same_origin = origin_of(target) == origin_of(origin)
                if not same_origin and self.refusal(target) is not None:
                    return Robots(None, True, f"robots.txt redirects out of scope, to {target}")
                continue
            if 200 <= response.status < 300:
                return _parse_robots(response.body, response.oversize, self.config.user_agent)
            break
        return Robots(None, True, "robots.txt unavailable")

    def _gate(self, host: str) -> _HostGate:
        gate = self.gates.get(host)
        if gate is None:
            gate = self.gates[host] = _HostGate(self.config.politeness_delay_s)
        return gate

    @asynccontextmanager
    async def _slot(self, url: str) -> AsyncIterator[None]:
        """Wait for the host's turn, then for a global slot; the request starts right after.

        The global slot is taken while holding the host's lock, so the spacing is measured
        between real starts, and a task waiting on a busy host holds no slot other hosts need.
        """
        gate = self._gate(urlsplit(url).hostname or "")
        async with gate.lock:
            wait = gate.last_start + gate.delay - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.slots.acquire()
            gate.last_start = time.monotonic()
        try:
            yield
        finally:
            self.slots.release()

    async def fetch(
        self,
        url: str,
        limit: int,
        read_body: Callable[[int, httpx.Headers], bool],
        headers: dict[str, str] | None = None,
    ) -> Response | Failed:
        """One URL, retried with exponential backoff after a 5xx, a timeout or a lost connection."""
        failed = Failed("connection_error", "not attempted")
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._request(url, limit, read_body, headers)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
                return Failed("invalid_url", _error_text(e))
            except (httpx.TimeoutException, TimeoutError) as e:
                failed = Failed("timeout", _error_text(e))
                continue
            except httpx.TransportError as e:
                if isinstance(e.__cause__, AddressRefused):  # not transient: no retry
                    return Failed("address_refused", f"{url}: {e}")
                failed = Failed("connection_error", _error_text(e))
                continue
            if response.status >= 500:
                failed = Failed("http_5xx", response.reason, response.status)
                continue
            return response
        attempts = self.config.retries + 1
        return Failed(failed.reason, f"{failed.detail} ({attempts} attempts)", failed.status)

    async def _request(
        self,
        url: str,
        limit: int,
        read_body: Callable[[int, httpx.Headers], bool],
        headers: dict[str, str] | None = None,
    ) -> Response:
        async with self._slot(url):
            fetched_at = utc_now()
            async with (
                asyncio.timeout(self.deadline_s),
                self.client.stream(
                    "GET", url, headers=headers, auth=self.credentials.get(origin_of(url))
                ) as stream,
            ):
                raw = bytearray()
                body = bytearray()
                oversize = False
                undecodable = ""
                truncated: str | None = None
                if read_body(stream.status_code, stream.headers):
                    try:
                        decoder = _content_decoder(stream.headers.get("content-encoding"))
                    except ValueError as e:
                        decoder, undecodable = None, str(e)
                    async for chunk in stream.aiter_raw():
                        raw += chunk
                        if undecodable:
                            pass
                        elif decoder is None:
                            body += chunk
                        else:
                            try:
                                out, bounded = decoder.feed(chunk, limit + 1 - len(body))
                            except zlib.error as e:
                                undecodable = f"bad {decoder.coding} data: {e}"
                            else:
                                body += out
                                oversize = oversize or bounded
                        if oversize or len(body) > limit or len(raw) > limit:
                            oversize, truncated = True, "length"
                            break
                    if decoder is not None and not oversize and not undecodable:
                        try:
                            body += decoder.flush()
                        except zlib.error as e:
                            undecodable = f"bad {decoder.coding} data: {e}"
                        if len(body) > limit:
                            oversize = True
                else:
                    truncated = "unspecified"  # a refused type: headers kept, body never read
                if self.warc is not None:
                    self.warc.record_response(
                        url,
                        stream.status_code,
                        stream.reason_phrase,
                        [(k.decode("latin-1"), v.decode("latin-1")) for k, v in stream.headers.raw],
                        bytes(raw),
                        fetched_at,
                        request_headers=[
                            (k.decode("latin-1"), v.decode("latin-1"))
                            for k, v in stream.request.headers.raw
                            if k.decode("latin-1").lower() not in SECRET_REQUEST_HEADERS
                        ],
                        truncated=truncated,
                    )
                return Response(
                    url=url,
                    status=stream.status_code,
                    reason=stream.reason_phrase,
                    headers=stream.headers,
                    body=bytes(body[:limit]),
                    oversize=oversize,
                    undecodable=undecodable,
                    fetched_at=fetched_at,
                )
