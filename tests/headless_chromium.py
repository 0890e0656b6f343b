"""Debian's Chromium, headless, driven over the DevTools protocol: no browser download needed.

The Prefect and MLflow UIs are single-page apps: the HTML the server sends is an empty shell and
the content appears only after scripts have queried the API. ``chromium --dump-dom`` with a
virtual-time budget guesses how long that takes; here the test instead asks the live page for its
text until the words it expects are there (or a deadline passes), then takes the screenshot, so a
slow machine gives a slower test, not a blank picture. The protocol is spoken over one websocket
with the ``websockets`` package, which Prefect already depends on; nothing else is installed.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from conftest import stop_process
from websockets.sync.client import ClientConnection, connect

NAMES = ("chromium", "chromium-browser")
START_TIMEOUT_S = 60.0
COMMAND_TIMEOUT_S = 60.0


def find_chromium() -> str | None:
    """$CHROMIUM if it names a program, else Debian's ``chromium`` (or ``chromium-browser``)."""
    candidates = [os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else list(NAMES)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One headless Chromium with one tab; a context manager that stops the browser by its pid."""

    def __init__(self, binary: str, profile: Path, width: int = 1600, height: int = 1100) -> None:
        self.binary = binary
        self.profile = profile
        self.width, self.height = width, height
        self._ids = itertools.count(1)
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: ClientConnection | None = None
        self._failures = 0

    def __enter__(self) -> Page:
        self.profile.mkdir(parents=True, exist_ok=True)
        log = (self.profile / "chromium.log").open("wb")
        # --no-sandbox: Chromium's sandbox refuses to start as root and in most containers; the
        # pages are the test's own servers on localhost. Port 0: Chromium picks a free port and
        # writes it to DevToolsActivePort in the profile, so two runs never collide.
        self._process = subprocess.Popen(
            [
                self.binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                f"--window-size={self.width},{self.height}",
                "about:blank",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        try:
            self._socket = connect(self._page_socket_url(), max_size=None, open_timeout=30)
            self.send(
                "Emulation.setDeviceMetricsOverride",
                {
                    "width": self.width,
                    "height": self.height,
                    "deviceScaleFactor": 1,
                    "mobile": False,
                },
            )
            self.send("Page.enable")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    def _log_tail(self) -> str:
        try:
            return (self.profile / "chromium.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"

    def _page_socket_url(self) -> str:
        """The tab's DevTools websocket, once Chromium has written its port to the profile."""
        assert self._process is not None
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"{self.binary} exited at start:\n{self._log_tail()}")
            lines = port_file.read_text().split() if port_file.exists() else []
            if lines:
                with httpx.Client(trust_env=False, timeout=5) as http:
                    try:
                        targets = http.get(f"http://127.0.0.1:{lines[0]}/json/list").json()
                    except httpx.HTTPError:
                        targets = []
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.2)
        raise RuntimeError(f"{self.binary} gave no DevTools page in time:\n{self._log_tail()}")

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One protocol command and its result; events arriving meanwhile are dropped."""
        assert self._socket is not None
        command_id = next(self._ids)
        self._socket.send(json.dumps({"id": command_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while True:
            message = json.loads(self._socket.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") != command_id:
                continue
            if "error" in message:
                raise RuntimeError(f"{method}: {message['error']}")
            return message["result"]

    def goto(self, url: str) -> None:
        result = self.send("Page.navigate", {"url": url})
        if result.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {result['errorText']}")

    def evaluate(self, expression: str) -> Any:  # noqa: ANN401 - whatever the script returns
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        """What a reader sees: the rendered text of the page (``innerText``, not the markup)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, missing: Callable[[], list[str]], timeout: float = 90.0) -> None:
        """Poll ``missing()`` (what the page does not show yet) until it is empty. If the deadline
        passes first: an AssertionError naming what is missing, with the page's address and text,
        and a screenshot of the page as it was (``failure-N.png`` in the profile folder)."""
        deadline = time.monotonic() + timeout
        while True:
            still = missing()
            if not still:
                return
            if time.monotonic() > deadline:
                self._failures += 1
                shot = self.screenshot(self.profile / f"failure-{self._failures}.png", settle=False)
                text = self.text()
                # Toasts (an API error, a refused login) are drawn last: keep the end too.
                shown = text if len(text) <= 4000 else f"{text[:2500]}\n[…]\n{text[-1500:]}"
                raise AssertionError(
                    f"{self.evaluate('location.href')} never showed {still} (screenshot {shot});"
                    f" its text:\n{shown}"
                )
            time.sleep(0.5)

    def wait_for_text(self, expected: list[str], timeout: float = 90.0) -> str:
        """The page's text once it holds every string in ``expected``."""
        self.wait_for(lambda: [e for e in expected if e not in self.text()], timeout)
        return self.text()

    def click(self, expression: str) -> None:
        """Click the element a JavaScript expression returns (an error if it returns none)."""
        script = f"(() => {{ const e = {expression}; if (e) e.click(); return !!e; }})()"
        found = self.evaluate(script)
        if not found:
            raise AssertionError(f"nothing to click: {expression}")

    def click_when_shown(self, expression: str, what: str, timeout: float = 90.0) -> None:
        """Click the element ``expression`` returns once the page shows it, enabled; else fail
        as :meth:`wait_for` fails, naming ``what``. SPAs draw buttons and menus a moment after
        the click or navigation that asks for them: clicking at once would find nothing."""
        shown = f"(() => {{ const e = {expression}; return !!e && !e.disabled; }})()"
        self.wait_for(lambda: [] if self.evaluate(shown) else [what], timeout)
        self.click(expression)

    def type_into(self, expression: str, text: str, what: str, timeout: float = 90.0) -> None:
        """Focus the input ``expression`` returns, once shown, and type ``text`` into it as a
        keyboard does (``Input.insertText``: the page gets the same input events, so a form's
        bindings see the value); else fail as :meth:`wait_for` fails, naming ``what``."""
        shown = f"(() => {{ const e = {expression}; return !!e && !e.disabled; }})()"
        self.wait_for(lambda: [] if self.evaluate(shown) else [what], timeout)
        self.evaluate(f"(() => {{ const e = {expression}; e.focus(); e.select && e.select(); }})()")
        self.send("Input.insertText", {"text": text})

    def settle(self, quiet_s: float = 1.0, cap_s: float = 10.0) -> bool:
        """Wait until the page stops changing: no DOM change for ``quiet_s`` and no finite CSS
        animation running (rows fading in, charts drawing), at most ``cap_s``. The text being
        there is not enough for a picture: SPAs keep filling charts and fading rows in after it.
        True if it settled, False if the cap was reached (a clock ticking on the page)."""
        script = """new Promise(resolve => {
          let last = performance.now();
          const start = last;
          const seen = new MutationObserver(() => { last = performance.now(); });
          seen.observe(document, {subtree: true, childList: true, attributes: true,
                                  characterData: true});
          const moving = () => document.getAnimations().some(a => a.playState === 'running'
            && a.effect && a.effect.getComputedTiming().endTime !== Infinity);
          const tick = () => {
            const now = performance.now();
            const quiet = now - last >= %d && !moving();
            if (quiet || now - start >= %d) { seen.disconnect(); resolve(quiet); }
            else setTimeout(tick, 100);
          };
          setTimeout(tick, 100);
        })"""
        return bool(self.evaluate(script % (quiet_s * 1000, cap_s * 1000)))

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 10) -> None:
        """Press the left button at ``start``, move to ``end`` in ``steps``, release: a column
        border dragged. One big jump is not enough: grids start a drag on a move *while* pressed."""
        (x0, y0), (x1, y1) = start, end
        mouse = {"button": "left", "clickCount": 1}
        self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x0, "y": y0})
        self.send("Input.dispatchMouseEvent", {"type": "mousePressed", "x": x0, "y": y0} | mouse)
        for i in range(1, steps + 1):
            x, y = x0 + (x1 - x0) * i / steps, y0 + (y1 - y0) * i / steps
            self.send(
                "Input.dispatchMouseEvent",
                {"type": "mouseMoved", "x": x, "y": y, "button": "left", "buttons": 1},
            )
        self.send("Input.dispatchMouseEvent", {"type": "mouseReleased", "x": x1, "y": y1} | mouse)

    def screenshot(self, path: Path, settle: bool = True) -> Path:
        """A PNG of the viewport, once the page has stopped changing (see :meth:`settle`)."""
        if settle:
            self.settle()
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path
