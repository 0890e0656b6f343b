"""Which URLs a crawl may request: the one spelling of a URL, and the crawl's scope.

Every URL the crawler meets (seed, link, redirect target, robots.txt) is normalized here first, so
that deduplication, scope checks and output all see one spelling, and credentials never survive
in a URL. :func:`parse_scope_entry` is also the check ``CrawlConfig.allowed_prefixes`` runs.
"""

from __future__ import annotations

import functools
import hashlib
import re
import string
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

__all__ = [
    "Scope",
    "ScopeEntry",
    "host_partition",
    "normalize_url",
    "origin_of",
    "parse_scope_entry",
]

_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_SUB_DELIMS = "!$&'()*+,;="
_PATH_SAFE = frozenset(_SUB_DELIMS + ":@/")
_QUERY_SAFE = frozenset(_SUB_DELIMS + ":@/?")
_HEX = frozenset(string.hexdigits)
_DEFAULT_PORTS = {"http": 80, "https": 443}


@functools.lru_cache(maxsize=1 << 14)
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

    Cached (a pure function of the string): a site's pages repeat the same navigation links, and
    normalizing every link of every page was most of a crawl's CPU in the crawling process.
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
    if _plain(part, safe):
        return part  # no escape, nothing to escape: every character is copied as it is
    # One regex pass (a long query, such as a code playground link, was a character loop's
    # hundreds of microseconds): an escape, or a character that is neither unreserved nor safe.
    return _TO_FIX[safe].sub(_fix_escape, part)


def _fix_escape(match: re.Match[str]) -> str:
    """A percent-escape upper-cased, or decoded when it is an unreserved character; any other
    character escaped (as UTF-8; a lone "%" becomes "%25")."""
    text = match.group()
    if len(text) == 3 and text[0] == "%":
        decoded = chr(int(text[1:], 16))
        return decoded if decoded in _UNRESERVED else text.upper()
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


_PLAIN = {
    safe: re.compile("[" + re.escape("".join(sorted(_UNRESERVED | safe))) + "]*")
    for safe in (_PATH_SAFE, _QUERY_SAFE)
}


_TO_FIX = {
    safe: re.compile("%[0-9A-Fa-f]{2}|[^" + re.escape("".join(sorted(_UNRESERVED | safe))) + "]")
    for safe in (_PATH_SAFE, _QUERY_SAFE)
}


def _plain(part: str, safe: frozenset[str]) -> bool:
    """Whether every character of ``part`` is unreserved or in ``safe`` (no ``%`` among them)."""
    return _PLAIN[safe].fullmatch(part) is not None


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


@functools.lru_cache(maxsize=1 << 14)  # asked for every link of every page: see normalize_url
def _host_port(url: str) -> tuple[str, int]:
    """(host, port) of a normalized URL, the port made explicit (80/443 when the URL has none)."""
    parts = urlsplit(url)
    return (parts.hostname or "", parts.port or _DEFAULT_PORTS.get(parts.scheme, 0))


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL: what credentials and robots.txt belong to."""
    return (urlsplit(url).scheme.lower(), *_host_port(normalize_url(url)))


def host_partition(url: str, partitions: int) -> int:
    """Which of ``partitions`` crawl units owns the URL's host (``crawl.web_partitions``).

    A stable hash of the host name, the key politeness is kept by (:mod:`web_fetcher`): every
    port and scheme of a host falls in one unit, so two workers never send one host requests.
    """
    host = urlsplit(url).hostname or ""
    return int.from_bytes(hashlib.sha256(host.encode()).digest()[:8], "big") % partitions


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


class Scope:
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
