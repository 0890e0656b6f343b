"""A static web site for the refresh tests, run as a separate program.

    python tests/static_site_server.py --root SITE_DIR --portfile port.json --log requests.jsonl

It serves the files under ``--root`` as HTML (``/`` is ``index.html``) with an ETag (a hash of
the file's bytes) and a Last-Modified (the file's mtime), answers a matching If-None-Match with
304, and appends one JSON line per request (path, status, and whether it was conditional) to
``--log``, so a test can see which pages the crawler fetched and which it was told were unchanged.
The test edits the files between refreshes; nothing is cached here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_LOG_LOCK = threading.Lock()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--portfile", required=True)
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    root = Path(args.root).resolve()
    log_path = Path(args.log)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            relative = self.path.split("?", 1)[0].lstrip("/") or "index.html"
            path = (root / relative).resolve()
            conditional = "If-None-Match" in self.headers or "If-Modified-Since" in self.headers
            if root not in path.parents or not path.is_file():
                status, body, headers = 404, b"not found", {}
            else:
                body = path.read_bytes()
                etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
                headers = {
                    "ETag": etag,
                    "Last-Modified": formatdate(path.stat().st_mtime, usegmt=True),
                }
                status = 304 if self.headers.get("If-None-Match") == etag else 200
            with _LOG_LOCK, log_path.open("a") as log:
                log.write(
                    json.dumps(
                        {"path": "/" + relative, "status": status, "conditional": conditional}
                    )
                    + "\n"
                )
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if status == 304:
                self.end_headers()
                return
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = args.portfile + ".tmp"
    Path(tmp).write_text(json.dumps({"port": server.server_address[1]}))
    os.replace(tmp, args.portfile)
    server.serve_forever()


if __name__ == "__main__":
    main()
