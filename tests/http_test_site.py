"""A small web site for the crawler's tests, run as a separate program.

    python tests/http_test_site.py --port 0 --portfile ports.json

It serves four sites from one process, each on its own 127.0.0.1 port, so that "another host" is
a real server whose log would show a request the crawler must never make:

- ``main``: robots.txt disallows /private/; one page per crawler scenario (see ``MAIN_INDEX``);
- ``other``: no robots.txt (404, so everything is allowed); the out-of-scope target;
- ``delay``: robots.txt asks for ``Crawl-delay: 1``;
- ``down``: robots.txt answers 503, so a polite crawler requests nothing else there;
- ``bounce``: robots.txt redirects to ``other`` (a robots.txt must not lead the crawler there);
- ``auth``: every page needs HTTP basic auth as ``AUTH_USER``/``AUTH_PASSWORD`` (else 401).

Every request to any site is logged (site, path, start time, User-Agent, Authorization header)
and the log is served as
JSON at ``/_log`` on every site; a test tells its own requests apart by a User-Agent of its own.
The ports are written as JSON ({"main": port, ...}) to --portfile (atomically) and to stdout.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gzip
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# An 8x8 PNG's leading bytes: a signature full of bytes no text has, then chunks with NULs.
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x08\x00\x00\x00\x08\x08\x02\x00\x00\x00"
    b"Km)\xdc\x00\x00\x00\x15IDATx\x9cc\xfc\xff\xff?\x03\x0c0\xc2\x00F\x06\x08\x00\x00\x8f\x8a"
    b"\x03\x01\x8b\x0f\xf2\xbb\x00\x00\x00\x00IEND\xaeB`\x82" * 8
)
CP1252_TEXT = "Café crème brûlée, naïve façade – “quoted” in Zürich for 5 €."
PLAIN_TEXT = "A plain text file.\nIts second line says déjà vu.\n"
SLOW_S = 3.0  # longer than any test's read timeout
HOPS = 20
AUTH_USER = "crawler"
AUTH_PASSWORD = "s3cret-Pa55word"
HOSTILE_ATTRIBUTES = 80_000  # on one tag: minutes of lxml parsing, unbounded
# Sections whose pages are plain pages named after their path.
PLAIN_SECTIONS = ("/polite/", "/wide/", "/scope/", "/outside/", "/hostile/", "/hosts/")
MANY_DELAY_S = 0.3  # each /many/ page takes this long to answer

MAIN_INDEX = [
    "/a",
    "/a#section",
    "/./a",
    "/b/../a",
    "/private/secret",
    "/missing",
    "/flaky",
    "/slow",
    "/loop1",
    "/hops/0",
    "/binary",
    "/big",
    "/cp1252",
    "/plain.txt",
    "/image.png",
    "/empty",
    "/gzip",
    "/chunked",
    "/to-a",
    "/to-landing",
    "/to-private",
    "/to-other",
    "/excluded/page",
    "mailto:someone@example.com",
    "{other}/page",
    "{other}/",
]


def prose(name: str) -> str:
    """A few sentences of real prose, so an extractor has enough text to keep the page."""
    return (
        f"<p>This is the page called {name}. It exists so that the crawler under test has a real"
        " document to fetch, decode and extract, with enough sentences to look like an article."
        "</p><p>Crawlers must be polite: they read robots.txt first, space their requests to"
        " each host, and never leave the scope their operator gave them. A page like this one"
        " is ordinary text that any extractor should keep.</p>"
    )


def html_page(name: str, body: str = "", links: list[str] | tuple[str, ...] = ()) -> str:
    anchors = "".join(f'<li><a href="{link}">{link}</a></li>' for link in links)
    return (
        f"<!doctype html><html><head><title>{name}</title></head><body><article>"
        f"<h1>{name}</h1>{prose(name)}{body}</article><ul>{anchors}</ul></body></html>"
    )


class Log:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: list[dict] = []
        self.counts: dict[tuple[str, str, str], int] = {}

    def add(self, site: str, port: int, path: str, user_agent: str, authorization: str) -> int:
        """Log a request; returns how many times this site, path and agent were seen so far."""
        with self.lock:
            self.entries.append(
                {
                    "site": site,
                    "port": port,
                    "path": path,
                    "time": time.monotonic(),
                    "user_agent": user_agent,
                    "authorization": authorization,
                }
            )
            key = (site, path, user_agent)
            self.counts[key] = self.counts.get(key, 0) + 1
            return self.counts[key]

    def dump(self) -> bytes:
        with self.lock:
            return json.dumps(self.entries).encode()


LOG = Log()
PORTS: dict[str, int] = {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    site = "main"

    def log_message(self, format: str, *args: object) -> None:
        pass  # the JSON log is the record; stderr stays quiet

    def do_GET(self) -> None:
        if self.path == "/_log":
            self.send(200, LOG.dump(), "application/json")
            return
        user_agent = self.headers.get("User-Agent", "")
        authorization = self.headers.get("Authorization", "")
        port = self.server.server_address[1]
        seen = LOG.add(self.site, port, self.path, user_agent, authorization)
        # The crawler may stop reading (oversize) or give up (timeout): both are intended.
        with contextlib.suppress(ConnectionError):
            getattr(self, f"site_{self.site}")(self.path, seen)

    def send(
        self,
        status: int,
        body: bytes | str = b"",
        content_type: str = "text/html; charset=utf-8",
        headers: dict[str, str] | None = None,
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def redirect(self, location: str, status: int = 302) -> None:
        self.send(status, f'<a href="{location}">moved</a>', headers={"Location": location})

    def site_main(self, path: str, seen: int) -> None:
        other = f"http://127.0.0.1:{PORTS['other']}"
        if path == "/robots.txt":
            self.send(200, "User-agent: *\nDisallow: /private/\n", "text/plain")
        elif path == "/":
            links = [link.format(other=other) for link in MAIN_INDEX]
            self.send(200, html_page("index", links=links))
        elif path in ("/a", "/landing", "/from-empty"):
            self.send(200, html_page(path.strip("/")))
        elif path == "/flaky":
            if seen == 1:
                self.send(500, "try again")
            else:
                self.send(200, html_page("flaky"))
        elif path == "/slow":
            time.sleep(SLOW_S)
            self.send(200, html_page("slow"))
        elif path == "/loop1":
            self.redirect("/loop2")
        elif path == "/loop2":
            self.redirect("/loop1")
        elif path.startswith("/hops/"):
            n = int(path.rsplit("/", 1)[1])
            if n < HOPS:
                self.redirect(f"/hops/{n + 1}", 301)
            else:
                self.send(200, html_page("last hop"))
        elif path == "/binary":
            self.send(200, PNG, "text/html")
        elif path == "/big":
            self.send(200, html_page("big", "<p>" + "big page " * 40_000 + "</p>"))
        elif path == "/cp1252":
            # The header claims UTF-8; the bytes and the meta tag say windows-1252.
            page = (
                '<!doctype html><html><head><meta charset="windows-1252"><title>cp1252</title>'
                f"</head><body><article><h1>Encoding</h1><p>{CP1252_TEXT}</p>{prose('cp1252')}"
                "</article></body></html>"
            )
            self.send(200, page.encode("cp1252"), "text/html; charset=utf-8")
        elif path == "/plain.txt":
            self.send(200, PLAIN_TEXT, "text/plain; charset=utf-8")
        elif path == "/image.png":
            self.send(200, PNG, "image/png")
        elif path == "/empty":
            # No text at all, but a link: the crawler must still follow it.
            page = '<html><body><a href="/from-empty"><img src="/image.png"></a></body></html>'
            self.send(200, page)
        elif path == "/gzip":
            data = gzip.compress(html_page("gzip").encode())
            self.send(200, data, headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        elif path == "/chunked":
            self.send_chunked(html_page("chunked").encode())
        elif path == "/to-a":
            self.redirect("/a")
        elif path == "/to-landing":
            self.redirect("/landing", 301)
        elif path == "/to-private":
            self.redirect("/private/moved")
        elif path == "/to-other":
            self.redirect(f"{other}/page")
        elif path.startswith("/private/") or path.startswith("/excluded/"):
            self.send(200, html_page("should never be fetched"))
        elif path == "/polite/":
            self.send(200, html_page("polite", links=[f"/polite/{i}" for i in range(6)]))
        elif path.startswith("/depth/"):
            n = int(path.rsplit("/", 1)[1])
            self.send(200, html_page(f"depth {n}", links=[f"/depth/{n + 1}"]))
        elif path == "/wide/":
            self.send(200, html_page("wide", links=[f"/wide/{i}" for i in range(10)]))
        elif path == "/scope/":
            links = ["/scope/in", "/outside/1", "/scope/../outside/2"]
            self.send(200, html_page("scope", links=links))
        elif path in ("/hostile/", "/hostile/quoted"):
            # One tag with tens of thousands of attributes (parsers are quadratic in them),
            # then ordinary prose and links the crawl should still follow. "quoted" puts a ">"
            # in every value, so that no cheap scan of the raw text sees one long tag.
            value = '">"' if path.endswith("quoted") else "x"
            attributes = " ".join(f"data-a{i}={value}" for i in range(HOSTILE_ATTRIBUTES))
            body = f"<div {attributes}>hostile</div>"
            self.send(200, html_page("hostile", body, links=["/hostile/1", "/hostile/2"]))
        elif path == "/hosts/":
            # Served under two host names (127.0.0.1 and localhost): the relative link stays on
            # the host it was found on, the absolute one always goes to localhost.
            links = ["/hosts/a", f"http://localhost:{PORTS['main']}/hosts/b"]
            self.send(200, html_page("hosts", links=links))
        elif path.startswith("/many/"):
            # A slow site with many pages: 5 links per page, each page MANY_DELAY_S to answer.
            n = int(path.rsplit("/", 1)[1])
            time.sleep(MANY_DELAY_S)
            links = [f"/many/{5 * n + i}" for i in range(1, 6)]
            self.send(200, html_page(f"many {n}", links=links))
        elif path.startswith(PLAIN_SECTIONS):
            self.send(200, html_page(path))
        else:
            self.send(404, html_page("not found"))

    def send_chunked(self, data: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for start in range(0, len(data), 100):
            chunk = data[start : start + 100]
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def site_other(self, path: str, seen: int) -> None:
        if path in ("/", "/page"):
            self.send(200, html_page("other " + path, links=["/page"]))
        else:
            self.send(404, "not here")

    def site_delay(self, path: str, seen: int) -> None:
        if path == "/robots.txt":
            self.send(200, "User-agent: *\nCrawl-delay: 1\n", "text/plain")
        elif path == "/":
            self.send(200, html_page("delay", links=["/d1"]))
        elif path == "/d1":
            self.send(200, html_page("delay d1"))
        else:
            self.send(404, "not here")

    def site_down(self, path: str, seen: int) -> None:
        if path == "/robots.txt":
            self.send(503, "down for maintenance")
        else:
            self.send(200, html_page("down " + path))

    def site_bounce(self, path: str, seen: int) -> None:
        if path == "/robots.txt":
            self.redirect(f"http://127.0.0.1:{PORTS['other']}/robots.txt")
        elif path == "/":
            self.send(200, html_page("bounce", links=["/b1"]))
        elif path == "/b1":
            self.send(200, html_page("bounce b1"))
        else:
            self.send(404, "not here")

    def site_auth(self, path: str, seen: int) -> None:
        token = base64.b64encode(f"{AUTH_USER}:{AUTH_PASSWORD}".encode()).decode()
        if self.headers.get("Authorization") != f"Basic {token}":
            self.send(401, "who are you?", headers={"WWW-Authenticate": 'Basic realm="test"'})
        elif path == "/robots.txt":
            self.send(200, "User-agent: *\nDisallow: /private/\n", "text/plain")
        elif path == "/":
            self.send(200, html_page("members", links=["/members/1", "/members/2"]))
        elif path.startswith("/members/"):
            self.send(200, html_page("member page " + path))
        else:
            self.send(404, "not here")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        """A crawler closing a kept-alive connection is normal; anything else is printed."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(site: str, port: int) -> ThreadingHTTPServer:
    handler = type(f"{site.title()}Handler", (Handler,), {"site": site})
    server = QuietServer(("127.0.0.1", port), handler)
    PORTS[site] = server.server_address[1]
    threading.Thread(target=server.serve_forever, name=site, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="port of the main site (0: any)")
    parser.add_argument("--portfile", help="write the ports here as JSON")
    args = parser.parse_args()
    serve("main", args.port)
    for site in ("other", "delay", "down", "bounce", "auth"):
        serve(site, 0)
    ports = json.dumps(PORTS)
    if args.portfile:
        tmp = f"{args.portfile}.tmp"
        with open(tmp, "w") as f:
            f.write(ports)
        os.replace(tmp, args.portfile)
    print(ports, flush=True)
    threading.Event().wait()  # until the test stops this process


if __name__ == "__main__":
    main()
