"""The embedded default's web site: Python's own documentation, served by pydoc on localhost.

Every Python installation can render its standard library's reference as hundreds of linked HTML
pages, so the default pipeline crawls a real web server with real text and needs no network.
pydoc renders a module's page by importing the module, and a few modules act on import; the
server therefore runs in its own process (with no browser to open and no display), and the crawl
config keeps those pages out of scope (``PYDOC_UNSAFE_PAGES``).

Run as a program (``python -I -S pydoc_site.py PORT PARENT_PID``) it serves until stopped. It must
not import anything outside the standard library: the server runs without site-packages.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

PYDOC_SEED = "pydoc:"
_START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def pydoc_site() -> Iterator[str]:
    """Start pydoc's HTTP server in a child process; yield its base URL; stop it by pid."""
    port = free_port()
    # A fixed environment, never ours: pydoc renders default values, and cgi's default
    # ``environ=os.environ`` would put every variable of the run (PREFECT_API_AUTH_STRING,
    # credentials, paths) into the crawled pages, and so into the dataset, its manifests and
    # MLflow; it would also make the documents differ from machine to machine.
    env = {
        "BROWSER": "true",
        "DISPLAY": "",
        "LANG": "C.UTF-8",
        "PATH": os.defpath,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    process = subprocess.Popen(
        # -I -S: no site-packages and no current directory on the server's path, so it serves
        # the standard library only (never imports torch, mlflow or this project to render a
        # page), and it runs this file's code by path, not as an llmflow module.
        [sys.executable, "-I", "-S", __file__, str(port), str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(url, timeout=2.0) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if process.poll() is not None:
                raise RuntimeError(f"pydoc server exited with code {process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"pydoc server did not answer at {url} in {_START_TIMEOUT_S}s")
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _serve(port: int, parent_pid: int) -> None:
    """Serve until stopped, or until the process that started us is gone.

    A crawl killed with SIGKILL cannot stop its server; the server notices that it has been
    handed to another parent and exits, so no orphan keeps the port.
    """
    import pydoc

    # typeshed leaves out pydoc's private server API (what `python -m pydoc -p` runs)
    server = pydoc._start_server(pydoc._url_handler, "127.0.0.1", port)  # type: ignore[attr-defined]
    if server.error:
        raise SystemExit(f"pydoc server failed: {server.error}")
    try:
        while server.serving and os.getppid() == parent_pid:
            time.sleep(0.5)
    finally:
        server.stop()


if __name__ == "__main__":
    _serve(int(sys.argv[1]), int(sys.argv[2]))
