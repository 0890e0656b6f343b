"""What keeps the crawler's requests where they belong, and lets Ctrl-C stop it.

- Seed credentials (``http://user:pass@host/``) become HTTP basic auth for that origin's requests
  only; URLs are stored without them (see :func:`llmflow.tasks.ingest.crawl_config.redact_url`).
- With ``allow_private_addresses`` off, each host is resolved once, its non-global addresses
  (loopback, private, link-local such as 169.254.169.254...) are refused, and the connection goes
  to an address that was checked, so a DNS answer that changes in between (rebinding) gains
  nothing.
- Ctrl-C reaches only the main thread; a crawl in a worker thread watches a counter the SIGINT
  handler bumps (:func:`install_interrupt_handler`), or that :func:`stop_crawls` bumps.

Kept apart from ``web_crawler`` so that the crawl's own logic stays readable.
"""

from __future__ import annotations

import asyncio
import ipaddress
import signal
import socket
import threading
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

import httpcore
import httpx

__all__ = [
    "AddressRefused",
    "CrawlInterrupted",
    "install_interrupt_handler",
    "interrupt_count",
    "seed_credentials",
    "stop_crawls",
]


def seed_credentials(url: str) -> httpx.BasicAuth | None:
    """HTTP basic auth from a seed's userinfo (``http://user:pass@host/``), percent-decoded."""
    netloc = urlsplit(url.strip()).netloc
    if "@" not in netloc:
        return None
    user, _, password = netloc.rpartition("@")[0].partition(":")
    return httpx.BasicAuth(unquote(user), unquote(password))


class AddressRefused(httpcore.ConnectError):
    """A host resolved only to addresses the crawl may not connect to (allow_private_addresses)."""


def _refused_address(address: str) -> str | None:
    """Why an IP address is not one the open web can hand us, or None when it is global."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is no part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for name in ("loopback", "private", "link_local", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{name}"):
            return name.replace("_", "-")
    return None if ip.is_global else "not global"


class _GlobalOnlyBackend(httpcore.AsyncNetworkBackend):
    """Resolves each host once, keeps its global addresses and connects to those only.

    Checking the name before the request would not do: a DNS answer can change between that
    check and the connection (DNS rebinding), so the check is on the very address connected to.
    TLS still verifies the host name: httpcore passes it as server_hostname whatever the address.
    """

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as e:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {e}") from e
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        refused = {a: _refused_address(a) for a in addresses}
        allowed = [a for a in addresses if refused[a] is None]
        if not allowed:
            why = ", ".join(f"{a} ({refused[a]})" for a in addresses) or "no address"
            raise AddressRefused(
                f"{host} resolves to {why}, not a global address, and"
                " crawl.allow_private_addresses is false"
            )
        error: Exception | None = None
        for address in allowed:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as e:
                error = e
        assert error is not None
        raise error

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Any = None
    ) -> httpcore.AsyncNetworkStream:
        raise AddressRefused(f"unix socket {path!r}: not a global address")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def global_only_transport(limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport with its connection pool on :class:`_GlobalOnlyBackend`.

    httpx has no public hook for the network backend; its pool is httpcore's, built here with
    the arguments httpx itself would use.
    """
    transport = httpx.AsyncHTTPTransport(limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=httpx.create_ssl_context(),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=_GlobalOnlyBackend(),
    )
    return transport


# --------------------------------------------------------------------------- interrupts

# Interrupts seen so far (SIGINT through install_interrupt_handler, or stop_crawls()). A crawl
# notes the count when it starts and stops when it grows, so nothing stale stops a later crawl.
_interrupts = 0
_interrupt_lock = threading.Lock()
_previous_sigint: Any = None


class CrawlInterrupted(KeyboardInterrupt):
    """The crawl was stopped by Ctrl-C or :func:`stop_crawls`; what it fetched was not returned,
    so the caller writes nothing that looks complete (its unit is redone on the next run)."""


def stop_crawls() -> None:
    """Ask every crawl running in this process to stop within ``INTERRUPT_POLL_S`` or so."""
    global _interrupts
    with _interrupt_lock:
        _interrupts += 1


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    stop_crawls()
    previous = _previous_sigint
    if callable(previous):
        previous(signum, frame)
    else:
        raise KeyboardInterrupt


def install_interrupt_handler() -> bool:
    """Make Ctrl-C stop crawls running in other threads too; True when it is in place.

    Python delivers SIGINT to the main thread only: a crawl running in a worker thread (a
    Prefect task, or crawl_web called from inside an event loop) would otherwise run on to
    max_pages while the main thread waits for it. The handler counts the interrupt and then
    calls the handler it replaced, so KeyboardInterrupt still reaches the main thread. Only the
    main thread may install it; elsewhere (and where SIGINT is ignored) this does nothing.
    """
    global _previous_sigint
    if threading.current_thread() is not threading.main_thread():
        return signal.getsignal(signal.SIGINT) is _on_sigint
    current = signal.getsignal(signal.SIGINT)
    if current is _on_sigint:
        return True
    if current in (signal.SIG_IGN, None):
        return False
    _previous_sigint = current
    signal.signal(signal.SIGINT, _on_sigint)
    return True


def interrupt_count() -> int:
    """Interrupts so far: a crawl compares it with the count it started with."""
    return _interrupts
