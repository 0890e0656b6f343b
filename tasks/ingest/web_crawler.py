"""The HTTP crawler: a polite, bounded breadth-first crawl that accounts for every URL it tries.

Each URL tried ends as exactly one outcome: a :class:`Document` (kept, or rejected with a reason)
or a :class:`FetchFailure`. The crawl is level by level (BFS), and within a level the frontier
keeps the order links were found in, so the same site crawled twice tries the same URLs even when
``max_pages`` cuts it short; the result is sorted by URL for the same reason.

Politeness is per host name: one request start per ``politeness_delay_s`` (or robots.txt's
Crawl-delay when longer), whatever the global concurrency. robots.txt follows RFC 9309.
Redirects are followed by hand so that every hop passes the same scope, exclusion and robots
checks as a link would.

A refresh passes what the last crawl saw of each page (:class:`PageState`): its ETag and
Last-Modified go out as If-None-Match / If-Modified-Since, a 304 answer reuses the page's stored
links (so the crawl still reaches what it links to), and a page whose extracted text is unchanged
gives :class:`Unchanged` instead of a document. Pages the last crawl saw that no link reaches any
more are asked for after the breadth-first crawl, so a page that is gone is noticed.

Every request (robots.txt and its redirects included) passes the scope check, and with
``allow_private_addresses`` off the address check at connect time (:mod:`crawl_guards`). Seed
credentials are used for their origin's requests and stored nowhere: URLs are kept without
userinfo. Ctrl-C (or :func:`stop_crawls`) stops a crawl within a fraction of a second with
:class:`CrawlInterrupted`, in a worker thread too.
"""

from __future__ import annotations

import asyncio
import re
import string
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TypeAlias
from urllib.parse import quote, urljoin, urlsplit, urlunsplit
from urllib.robotparser import RobotFileParser

import httpx

from llmflow.tasks.core.documents import Document, FetchFailure, Unchanged, document_id, utc_now
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_config import CrawlConfig, redact_url
from llmflow.tasks.ingest.crawl_guards import (
    AddressRefused,
    CrawlInterrupted,
    global_only_transport,
    install_interrupt_handler,
    interrupt_count,
    seed_credentials,
    stop_crawls,
)
from llmflow.tasks.ingest.html_text import ExtractionError
from llmflow.tasks.ingest.page_decoding import DecodeError, decode_body
from llmflow.tasks.ingest.warc_writer import WarcRecorder

__all__ = [
    "CrawlInterrupted",
    "PageState",
    "crawl_web",
    "install_interrupt_handler",
    "normalize_url",
    "redact_url",
    "stop_crawls",
]

Outcome: TypeAlias = Document | FetchFailure | Unchanged

SOURCE = "http"

# RFC 9309 §2.5: crawlers must parse at least the first 500 KiB of a robots.txt.
ROBOTS_MAX_BYTES = 512 * 1024
# RFC 9309 §2.3.1.2: follow at least five redirects for robots.txt, then treat it as unavailable.
ROBOTS_MAX_REDIRECTS = 5
# A robots.txt may ask for any Crawl-delay; beyond this the crawl would look hung, so it is capped.
MAX_CRAWL_DELAY_S = 60.0
# A server that trickles one byte just inside read_timeout_s would hold a slot for
# max_page_bytes × read_timeout_s; no response may take longer than this many read timeouts.
RESPONSE_DEADLINE_READS = 3

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SUB_DELIMS = "!$&'()*+,;="
_PATH_SAFE = frozenset(_SUB_DELIMS + ":@/")
_QUERY_SAFE = frozenset(_SUB_DELIMS + ":@/?")
_HEX = frozenset(string.hexdigits)
_DEFAULT_PORTS = {"http": 80, "https": 443}
# Request headers that carry credentials: sent, never archived (the WARC is shared evidence).
SECRET_REQUEST_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
# How often a running crawl looks for an interrupt (Ctrl-C, stop_crawls()).
INTERRUPT_POLL_S = 0.1


# --------------------------------------------------------------------------- URL normalization


def normalize_url(url: str) -> str:
    """The one spelling of a URL used for deduplication, scope checks and output (RFC 3986 §6).

    courlan's ``normalize_url`` was considered and not used: it sorts query parameters (changing
    the resource for order-sensitive servers), strips "tracking" parameters, keeps fragments, and
    neither resolves dot-segments nor decodes percent-encoded unreserved characters.

    Lower-cases scheme and host (IDNA for non-ASCII hosts), drops userinfo (credentials belong
    to the request, never to a stored URL: see :func:`seed_credentials`), the default port, the
    fragment and an empty query, makes an empty path "/", resolves "." and ".." segments,
    upper-cases percent-escapes, decodes escaped unreserved characters, escapes characters a URL
    may not hold, and keeps the query's parameters in their order. Raises ValueError for a
    relative URL or a bad port.
    """
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if not scheme or not parts.netloc:
        raise ValueError(f"not an absolute URL with a host: {url!r}")
    hostname = (parts.hostname or "").rstrip(".")  # urllib lower-cases it and strips [ ]
    if not hostname:
        raise ValueError(f"no host in {url!r}")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"bad port in {url!r}") from e
    if ":" in hostname:
        host = f"[{hostname}]"  # IPv6 literal
    else:
        try:
            host = hostname.encode("idna").decode("ascii")
        except UnicodeError:  # an empty or over-long label: keep it as written
            host = hostname
    netloc = host
    if port is not None and port != _DEFAULT_PORTS.get(scheme):
        netloc = f"{host}:{port}"
    path = _remove_dot_segments(_normalize_escapes(parts.path, _PATH_SAFE)) or "/"
    query = _normalize_escapes(parts.query, _QUERY_SAFE)
    return urlunsplit((scheme, netloc, path, query, ""))


def _normalize_escapes(part: str, safe: frozenset[str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(part):
        char = part[i]
        if char == "%" and len(part) >= i + 3 and part[i + 1] in _HEX and part[i + 2] in _HEX:
            decoded = chr(int(part[i + 1 : i + 3], 16))
            out.append(decoded if decoded in _UNRESERVED else part[i : i + 3].upper())
            i += 3
            continue
        if char in _UNRESERVED or char in safe:
            out.append(char)
        else:
            out.append(quote(char.encode("utf-8", "surrogatepass"), safe=""))
        i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, segment by segment; a trailing "." or ".." leaves a trailing slash."""
    segments = path.split("/")
    out: list[str] = []
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            if segment == ".." and len(out) > 1:
                out.pop()
            if index == len(segments) - 1:
                out.append("")
        else:
            out.append(segment)
    joined = "/".join(out)
    if path.startswith("/") and not joined.startswith("/"):
        joined = "/" + joined
    return joined


# --------------------------------------------------------------------------- scope and robots


def _host_port(url: str) -> tuple[str, int]:
    """(host, port) of a normalized URL, the port made explicit (80/443 when the URL has none)."""
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0))


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL: what credentials and robots.txt belong to."""
    return (urlsplit(url).scheme.lower(), *_host_port(normalize_url(url)))


@dataclass(frozen=True, slots=True)
class ScopeEntry:
    """One ``allowed_prefixes`` entry read: URL prefixes, or a host (any port when port is None)."""

    prefixes: tuple[str, ...] = ()
    host: str | None = None
    port: int | None = None


def parse_scope_entry(entry: str) -> ScopeEntry:
    """Read one ``allowed_prefixes`` entry, or raise ValueError naming it and what is wrong.

    Host entries are normalized like URLs (lower case, IDNA, no trailing dot), so that
    "Example.COM" matches example.com, and "example.com:80" matches http://example.com/ even
    though normalized URLs drop the default port.
    """
    text = entry.strip()
    where = f"crawl.allowed_prefixes entry {entry!r}"
    if not text:
        raise ValueError(f"{where}: empty")
    try:
        if "://" in text:
            if urlsplit(text).scheme.lower() not in _DEFAULT_PORTS:
                raise ValueError("only http(s) URLs can be crawled")
            if "@" in urlsplit(text).netloc:
                raise ValueError("a scope entry holds no credentials")
            return ScopeEntry(prefixes=(normalize_url(text),))
        if "@" in text.partition("/")[0]:
            raise ValueError("a scope entry holds no credentials")
        if "/" in text.rstrip("/"):  # "example.com/docs/": a prefix under either scheme
            prefixes = tuple(normalize_url(f"{s}://{text}") for s in _DEFAULT_PORTS)
            return ScopeEntry(prefixes=prefixes)
        host = text.rstrip("/")
        if host.endswith(":"):
            raise ValueError("empty port")
        url = normalize_url(f"http://{host}/")  # raises for a bad port
        port = urlsplit(f"http://{host}/").port
        hostname = urlsplit(url).hostname or ""
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return ScopeEntry(host=hostname, port=port)


class _Scope:
    """Which URLs the crawl may request. allowed_prefixes: URL prefixes
    ("https://example.com/docs/", "example.com/docs/") or host names ("example.com": any port
    and either scheme; "example.com:8080": that port only). No allowed_prefixes: each seed's
    host on the seed's port, which for a seed without a port is its scheme's default port, so
    another service on the same machine (an admin port, a database's HTTP API) stays out."""

    def __init__(self, allowed_prefixes: list[str], seeds: list[str]) -> None:
        self.prefixes: list[str] = []
        self.hosts: set[str] = set()  # any port
        self.host_ports: set[tuple[str, int]] = set()
        for text in allowed_prefixes:
            entry = parse_scope_entry(text)
            self.prefixes.extend(entry.prefixes)
            if entry.host is not None and entry.port is None:
                self.hosts.add(entry.host)
            elif entry.host is not None and entry.port is not None:
                self.host_ports.add((entry.host, entry.port))
        if not allowed_prefixes:
            self.host_ports.update(_host_port(seed) for seed in seeds)

    def allows(self, url: str) -> bool:
        if urlsplit(url).scheme not in _DEFAULT_PORTS:
            return False
        host_port = _host_port(url)
        if host_port in self.host_ports or host_port[0] in self.hosts:
            return True
        return any(url.startswith(prefix) for prefix in self.prefixes)


@dataclass(slots=True)
class _Robots:
    """One origin's robots.txt verdict: parsed rules, or allow/deny everything (RFC 9309 §2.3.1)."""

    parser: RobotFileParser | None
    allow_all: bool
    detail: str = ""
    crawl_delay: float = 0.0
    # Why a page it refuses fails: robots_disallowed, or address_refused when the host itself
    # may not be connected to (the page would be refused for that anyway; say so).
    reason: str = "robots_disallowed"

    def allows(self, url: str, user_agent: str) -> bool:
        if urlsplit(url).path == "/robots.txt":
            return True  # RFC 9309 §2.2.2: always allowed
        if self.parser is None:
            return self.allow_all
        return self.parser.can_fetch(user_agent, url)


def _parse_robots(body: bytes, truncated: bool, user_agent: str) -> _Robots:
    text = body.decode("utf-8", "replace").lstrip("\ufeff")
    lines = text.splitlines()
    if truncated and lines:
        lines.pop()  # the last line was cut mid-way
    parser = RobotFileParser()
    parser.parse(lines)
    delay = parser.crawl_delay(user_agent)
    return _Robots(parser, True, crawl_delay=float(delay) if delay else 0.0)


# --------------------------------------------------------------------------- fetching


@dataclass(slots=True)
class _Response:
    url: str
    status: int
    reason: str
    headers: httpx.Headers
    body: bytes  # content-decoded, at most the byte limit
    oversize: bool
    undecodable: str  # why the content coding could not be undone; "" when it could
    fetched_at: datetime


@dataclass(frozen=True, slots=True)
class PageState:
    """What a crawl remembers of a page for the next refresh: the validators its server sent,
    the document it gave (None when it gave none that was kept) and the in-scope links on it."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    doc_id: str | None = None
    links: tuple[str, ...] = field(default=())


@dataclass(slots=True)
class _Failed:
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


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _error_text(error: BaseException) -> str:
    message = str(error)
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


class _HostGate:
    """Spaces request starts to one host: the lock is held while waiting, so starts queue up."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.lock = asyncio.Lock()
        self.last_start = float("-inf")


# --------------------------------------------------------------------------- the crawl


class _Crawler:
    def __init__(
        self,
        config: CrawlConfig,
        extractor: BoundedExtractor,
        warc: WarcRecorder | None,
        on_page: Callable[[], None] | None,
        previous: Mapping[str, PageState],
        states: dict[str, PageState],
        kept_as: Callable[[str], str],
    ) -> None:
        self.config = config
        self.kept_as = kept_as
        self.previous = previous
        self.states = states
        self.extractor = extractor
        self.warc = warc
        self.on_page = on_page
        self.exclude = [re.compile(p) for p in config.exclude_patterns]
        self.content_types = {t.strip().lower() for t in config.content_types}
        self.pages = 0
        self.seen: set[str] = set()
        self.robots: dict[str, _Robots] = {}
        self.robots_locks: dict[str, asyncio.Lock] = {}
        self.gates: dict[str, _HostGate] = {}
        self.deadline_s = config.connect_timeout_s + RESPONSE_DEADLINE_READS * config.read_timeout_s
        # Basic-auth credentials of the seeds, by origin: used for requests to that origin only,
        # never kept in a URL (normalize_url drops them), so no output or log can show them.
        self.credentials: dict[tuple[str, str, int], httpx.BasicAuth] = {}
        self.interrupted = False
        self.scope: _Scope
        self.slots: asyncio.Semaphore
        self.client: httpx.AsyncClient

    async def run_interruptible(self, seeds: list[str]) -> list[Outcome]:
        """:meth:`run`, cancelled within INTERRUPT_POLL_S of an interrupt (``self.interrupted``).

        Cancelling closes every connection in flight; an extraction already handed to the
        worker finishes first (bounded by extract_timeout_s), as asyncio waits for its thread.
        """
        start = interrupt_count()
        crawl = asyncio.create_task(self.run(seeds))
        while not crawl.done():
            await asyncio.wait([crawl], timeout=INTERRUPT_POLL_S)
            if interrupt_count() != start and not crawl.done():
                self.interrupted = True
                crawl.cancel()
                with suppress(asyncio.CancelledError):
                    await crawl
                return []
        return crawl.result()

    async def run(self, seeds: list[str]) -> list[Outcome]:
        results: list[Outcome] = []
        level: list[str] = []
        for seed in seeds:
            credentials = seed_credentials(seed)
            try:
                url = normalize_url(redact_url(seed))
            except ValueError as e:
                results.append(FetchFailure(redact_url(seed), "invalid_url", str(e)))
                continue
            if credentials is not None:
                self.credentials[origin_of(url)] = credentials
            if url not in self.seen:
                self.seen.add(url)
                level.append(url)
        self.scope = _Scope(self.config.allowed_prefixes, level)
        self.slots = asyncio.Semaphore(self.config.concurrency)
        async with self._client() as self.client:
            depth = 0
            while level and self.pages < self.config.max_pages:
                found = await self._crawl_level(level, depth, results)
                level = []
                for link in found:
                    if link not in self.seen:
                        self.seen.add(link)
                        level.append(link)
                depth += 1
            # Pages the last crawl saw that nothing links to now: asked again (their links not
            # followed), so one that is gone leaves the dataset and one that is not stays.
            orphans = [url for url in sorted(self.previous) if url not in self.seen]
            self.seen.update(orphans)
            await self._crawl_level(orphans, self.config.max_depth, results)
        return results

    async def _crawl_level(self, level: list[str], depth: int, results: list[Outcome]) -> list[str]:
        """Visit one level's URLs while pages are left; the links found, in order."""
        found: list[str] = []
        start = 0
        while start < len(level) and self.pages < self.config.max_pages:
            # Never more URLs in flight than pages left, so max_pages is exact.
            batch = level[start : start + self.config.max_pages - self.pages]
            start += len(batch)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._visit(url, depth)) for url in batch]
            except ExceptionGroup as group_error:
                # A bug or a failing on_page: the caller sees that error, not a group.
                raise group_error.exceptions[0] from group_error
            for task in tasks:
                outcome, links = task.result()
                results.append(outcome)
                found.extend(links)
        return found

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

    def _refusal(self, url: str) -> str | None:
        if not self.scope.allows(url):
            return "out_of_scope"
        if any(pattern.search(url) for pattern in self.exclude):
            return "excluded"
        return None

    def _wanted(self, url: str) -> bool:
        """Whether a link found on a page joins the frontier (never requested otherwise)."""
        return self._refusal(url) is None

    async def _visit(self, url: str, depth: int) -> tuple[Outcome, list[str]]:
        outcome, links, requested = await self._follow(url, depth)
        if requested:
            self.pages += 1
            if self.on_page is not None:
                self.on_page()
        return outcome, links

    async def _follow(self, origin: str, depth: int) -> tuple[Outcome, list[str], bool]:
        """Fetch ``origin`` and its redirect hops; (outcome, links found, whether it requested)."""
        chain = [origin]
        current = origin
        requested = False

        def failure(reason: str, detail: str = "", status: int | None = None) -> FetchFailure:
            if current != origin:
                detail = f"{detail} (after redirects to {current})".strip()
            return FetchFailure(origin, reason, detail, status)

        while True:
            refusal = self._refusal(current)
            if refusal is not None:
                return failure(refusal, current), [], requested
            if self.config.respect_robots_txt:
                robots = await self._robots_for(current)
                if not robots.allows(current, self.config.user_agent):
                    return failure(robots.reason, robots.detail), [], requested
            response = await self._fetch(
                current, self.config.max_page_bytes, self._read_body, self._validators(current)
            )
            requested = True
            if isinstance(response, _Failed):
                return failure(response.reason, response.detail, response.status), [], True
            location = response.headers.get("location")
            if not (300 <= response.status < 400 and location):
                break
            try:
                target = normalize_url(urljoin(current, location.strip()))
            except ValueError as e:
                return failure("invalid_redirect", str(e), response.status), [], True
            if target in chain:
                loop = " -> ".join([*chain, target])
                return FetchFailure(origin, "redirect_loop", loop, response.status), [], True
            if len(chain) > self.config.max_redirects:
                return failure("too_many_redirects", f"next: {target}", response.status), [], True
            refusal = self._refusal(target)
            if refusal is not None:
                return failure(refusal, f"redirect to {target}", response.status), [], True
            if target in self.seen:
                # Its page is fetched under its own URL; this one adds no second document.
                return failure("duplicate", f"redirect to {target}", response.status), [], True
            self.seen.add(target)
            chain.append(target)
            current = target
        outcome, links = await self._outcome(response, depth)
        if isinstance(outcome, FetchFailure):
            outcome = failure(outcome.reason, outcome.detail, outcome.status)
        return outcome, links, True

    def _validators(self, url: str) -> dict[str, str]:
        """The conditional-request headers for a page the last crawl saw (RFC 9110 §13.1)."""
        state = self.previous.get(url)
        headers: dict[str, str] = {}
        if state is not None and state.etag:
            headers["If-None-Match"] = state.etag
        if state is not None and state.last_modified:
            headers["If-Modified-Since"] = state.last_modified
        return headers

    def _read_body(self, status: int, headers: httpx.Headers) -> bool:
        """Skip the body of a page whose type is refused: an image is never downloaded."""
        if 200 <= status < 300:
            return _media_type(headers.get("content-type")) in self.content_types
        return True

    async def _outcome(self, response: _Response, depth: int) -> tuple[Outcome, list[str]]:
        """The page's outcome, remembered for the next refresh; Unchanged when it has not."""
        previous = self.previous.get(response.url)
        etag, modified = response.headers.get("etag"), response.headers.get("last-modified")
        if response.status == 304 and previous is not None:
            self.states[response.url] = replace(
                previous,
                etag=etag or previous.etag,
                last_modified=modified or previous.last_modified,
            )
            links = self._frontier_links(list(previous.links))
            unchanged = Unchanged(response.url, "not_modified", previous.doc_id)
            return unchanged, links if depth < self.config.max_depth else []
        outcome, links = await self._page(response)
        if not isinstance(outcome, Document):
            return outcome, []
        kept_url = self.kept_as(response.url)
        doc_id = None if outcome.reject_reason else document_id(kept_url, outcome.text)
        self.states[response.url] = PageState(response.url, etag, modified, doc_id, tuple(links))
        links = links if depth < self.config.max_depth else []
        if previous is not None and doc_id is not None and doc_id == previous.doc_id:
            return Unchanged(response.url, "same_content", doc_id), links
        return outcome, links

    async def _page(self, response: _Response) -> tuple[Document | FetchFailure, list[str]]:
        """A fetched page's document (or why it gave none) and every in-scope link on it."""
        status = response.status
        if not 200 <= status < 300:
            return FetchFailure(response.url, f"http_{status // 100}xx", "", status), []
        content_type = response.headers.get("content-type")
        media = _media_type(content_type)
        if media not in self.content_types:
            return FetchFailure(
                response.url, "content_type_not_allowed", media or "no Content-Type", status
            ), []

        def document(text: str, reject: str | None = None, detail: str = "") -> Document:
            return Document(
                url=response.url,
                text=text,
                source=SOURCE,
                fetched_at=response.fetched_at,
                reject_reason=reject,
                detail=detail,
            )

        if response.oversize:
            return document("", "oversize", f"body over {self.config.max_page_bytes} bytes"), []
        if response.undecodable:
            return document("", "undecodable", response.undecodable), []
        try:
            text, _charset = decode_body(response.body, content_type)
        except DecodeError as e:
            return document("", e.reason, str(e)), []
        if "html" not in media:
            return (document(text) if text.strip() else document("", "empty")), []
        # Links and text both come from the bounded worker: a hostile page costs at most the
        # extraction timeout. Links are kept even when the page's own text is rejected (a hub
        # page with no prose still leads to pages that have some), and at any depth (a refresh
        # may reach the page from higher up).
        try:
            extracted, found = await asyncio.to_thread(
                self.extractor.extract_with_links, text, response.url
            )
        except ExtractionError as e:
            return document("", e.reason, e.detail), self._frontier_links(e.links)
        links = self._frontier_links(found)
        if not extracted.strip():
            return document("", "empty"), links
        return document(extracted), links

    def _frontier_links(self, found: list[str]) -> list[str]:
        links: list[str] = []
        for link in found:
            try:
                url = normalize_url(link)
            except ValueError:
                continue
            if self._wanted(url):
                links.append(url)
        return links

    async def _robots_for(self, url: str) -> _Robots:
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

    async def _load_robots(self, origin: str) -> _Robots:
        """RFC 9309 §2.3.1: 2xx parsed; 4xx allow all; 5xx and unreachable disallow all."""
        target = f"{origin}/robots.txt"
        for _ in range(ROBOTS_MAX_REDIRECTS + 1):
            response = await self._fetch(target, ROBOTS_MAX_BYTES, lambda status, headers: True)
            if isinstance(response, _Failed):
                if response.reason == "address_refused":
                    return _Robots(None, False, response.detail, reason=response.reason)
                detail = f"robots.txt unreachable ({response.reason}: {response.detail})"
                return _Robots(None, False, detail)
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
                if not same_origin and self._refusal(target) is not None:
                    return _Robots(None, True, f"robots.txt redirects out of scope, to {target}")
                continue
            if 200 <= response.status < 300:
                return _parse_robots(response.body, response.oversize, self.config.user_agent)
            break
        return _Robots(None, True, "robots.txt unavailable")

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

    async def _fetch(
        self,
        url: str,
        limit: int,
        read_body: Callable[[int, httpx.Headers], bool],
        headers: dict[str, str] | None = None,
    ) -> _Response | _Failed:
        """One URL, retried with exponential backoff after a 5xx, a timeout or a lost connection."""
        failed = _Failed("connection_error", "not attempted")
        for attempt in range(self.config.retries + 1):
            if attempt:
                await asyncio.sleep(self.config.retry_backoff_s * 2 ** (attempt - 1))
            try:
                response = await self._request(url, limit, read_body, headers)
            except (httpx.UnsupportedProtocol, httpx.InvalidURL) as e:
                return _Failed("invalid_url", _error_text(e))
            except (httpx.TimeoutException, TimeoutError) as e:
                failed = _Failed("timeout", _error_text(e))
                continue
            except httpx.TransportError as e:
                if isinstance(e.__cause__, AddressRefused):  # not transient: no retry
                    return _Failed("address_refused", f"{url}: {e}")
                failed = _Failed("connection_error", _error_text(e))
                continue
            if response.status >= 500:
                failed = _Failed("http_5xx", response.reason, response.status)
                continue
            return response
        attempts = self.config.retries + 1
        return _Failed(failed.reason, f"{failed.detail} ({attempts} attempts)", failed.status)

    async def _request(
        self,
        url: str,
        limit: int,
        read_body: Callable[[int, httpx.Headers], bool],
        headers: dict[str, str] | None = None,
    ) -> _Response:
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
                return _Response(
                    url=url,
                    status=stream.status_code,
                    reason=stream.reason_phrase,
                    headers=stream.headers,
                    body=bytes(body[:limit]),
                    oversize=oversize,
                    undecodable=undecodable,
                    fetched_at=fetched_at,
                )


def crawl_web(
    seeds: list[str],
    config: CrawlConfig,
    extractor: BoundedExtractor,
    warc: WarcRecorder | None = None,
    on_page: Callable[[], None] | None = None,
    previous: Mapping[str, PageState] | None = None,
    states: dict[str, PageState] | None = None,
    kept_as: Callable[[str], str] | None = None,
) -> list[Outcome]:
    """Crawl from ``seeds`` and return one outcome per URL tried, sorted by URL.

    ``previous`` (a refresh: what the last crawl saw, by URL) turns on conditional requests and
    :class:`Unchanged` outcomes; ``states``, when given, receives what this crawl saw of every
    page it fetched, for the next refresh. ``kept_as`` gives the URL a page's document will be
    kept under, when the caller renames URLs (its id, and so "same content", depends on it).

    Documents carry their final URL (after redirects); failures the URL that was tried.
    ``on_page`` is called once per URL that cost at least one request (what ``max_pages``
    counts); robots.txt fetches are not counted, but they are spaced like any request and kept in
    the WARC. Runs its own event loop, in a helper thread when the caller is inside one already.

    Raises :class:`CrawlInterrupted` (a KeyboardInterrupt) when interrupted, returning nothing:
    the caller writes no output that would look complete, and a re-run does the crawl again.
    """
    if threading.current_thread() is threading.main_thread():
        install_interrupt_handler()
    crawler = _Crawler(
        config,
        extractor,
        warc,
        on_page,
        previous or {},
        states if states is not None else {},
        kept_as or (lambda url: url),
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        results = asyncio.run(crawler.run_interruptible(seeds))
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crawl_web") as pool:
            results = pool.submit(asyncio.run, crawler.run_interruptible(seeds)).result()
    if crawler.interrupted:
        raise CrawlInterrupted(f"crawl interrupted after {crawler.pages} pages")
    return sorted(results, key=lambda r: (r.url or "", not isinstance(r, Document)))
