"""Extraction under limits: html_to_text in a worker process with a time and a memory bound.

Extraction runs third-party parsers on untrusted input, and those parsers have pathological
cases: in our measurements (bench/html_extractors.md) resiliparse needs 32 s for 50,000 nested
``<div>`` tags, and trafilatura more than 6 minutes for one tag with 200,000 attributes. Neither
library can be interrupted from Python while it is inside C code, so the crawler and the file
readers extract through :class:`BoundedExtractor`, which runs the extractor in a separate process
it can kill.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing.connection
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

from llmflow.tasks.ingest.html_links import extract_links
from llmflow.tasks.ingest.html_text import DEFAULT_EXTRACTOR, EXTRACTORS, ExtractionError, _extract

__all__ = ["BoundedExtractor"]

_WARMUP_HTML = (
    "<html><body><article><p>Warm-up paragraph for the extractor.</p></article></body></html>"
)

# The worker is a fresh interpreter that imports this module and nothing of the caller's.
# multiprocessing's spawn and forkserver methods would re-import the caller's __main__ script in
# the child, which re-runs any script without an ``if __name__ == "__main__":`` guard (a second
# crawl, a second pydoc server...). The channel is still multiprocessing's Connection, and the
# child gets the parent's sys.path the way spawn would give it.
_WORKER_CODE = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
    "from llmflow.tasks.ingest.bounded_extractor import _worker_entry; _worker_entry(sys.argv[2:])"
)
_PR_SET_PDEATHSIG = 1


def _vm_size_bytes() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _die_with_parent() -> None:
    """Linux: SIGKILL the worker when its parent dies, even mid-way through a slow page."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # elsewhere the worker still exits at its next read, on end of file


def _worker_entry(argv: list[str]) -> None:
    extractor, memory_bytes, read_fd, write_fd, parent_pid = argv
    # trafilatura imports py3langid when it is installed (the quality stage needs it) and loads
    # its model (~130 MiB of address space) for a language check extraction never asks for.
    sys.modules.setdefault("py3langid", None)  # type: ignore[arg-type]
    _die_with_parent()
    if os.getppid() != int(parent_pid):  # the parent died before prctl took effect
        return
    inbox = multiprocessing.connection.Connection(int(read_fd), writable=False)
    outbox = multiprocessing.connection.Connection(int(write_fd), readable=False)
    _worker_main(inbox, outbox, extractor, int(memory_bytes))


def _worker_main(inbox: Any, outbox: Any, extractor: str, memory_bytes: int) -> None:
    """Loop of the extraction process: receive (html, url, want_links); answer ("links", links)
    first when asked for them, then ("ok", text) or ("error", reason, detail)."""
    # Ctrl-C goes to the whole process group; the parent decides what happens to the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Imports and the libraries' lazy initialisation happen before the limit, so the limit
    # bounds what a page costs rather than whether the worker can start.
    _extract(_WARMUP_HTML, extractor)
    baseline = _vm_size_bytes()
    if baseline is not None and baseline >= memory_bytes:
        outbox.send(("error", f"baseline address space {baseline >> 20} MiB already exceeds it"))
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    outbox.send(("ready", baseline))

    while True:
        try:
            message = inbox.recv()
        except EOFError:
            return
        except MemoryError:
            # The rest of the message is still in the pipe: the stream is out of step, so answer
            # and exit; the parent starts a fresh worker.
            outbox.send(("error", "extract_memory", "out of memory receiving the page"))
            return
        if message is None:
            return
        html, url, want_links = message
        del message
        if want_links:
            # Links are parsed here too, not in the caller: lxml has pathological pages of its
            # own, and only this process can be stopped in the middle of one. Sent before the
            # text, so that a page whose text times out still leads to its links.
            try:
                links = extract_links(html, url) if url else []
            except Exception:  # MemoryError included: the page then has no links
                links = []
            outbox.send(("links", links))
        try:
            reply: tuple[Any, ...] = ("ok", _extract(html, extractor, url))
        except ExtractionError as error:
            reply = ("error", error.reason, error.detail)
        except MemoryError:  # raised outside the library call (e.g. while tidying the text)
            reply = ("error", "extract_memory", f"{extractor}: out of memory")
        except Exception as error:
            reply = ("error", "extract_failed", f"{extractor}: {error!r}"[:500])
        del html
        try:
            outbox.send(reply)
        except MemoryError:
            del reply
            outbox.send(("error", "extract_memory", "out of memory sending the text"))


class _Worker:
    """One worker process and its two pipe ends; what the finalizer needs, without the extractor."""

    def __init__(self, extractor: str, memory_bytes: int) -> None:
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        try:
            self.process: subprocess.Popen[bytes] | None = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_CODE,
                    json.dumps(sys.path),
                    extractor,
                    str(memory_bytes),
                    str(to_worker_read),
                    str(from_worker_write),
                    str(os.getpid()),
                ],
                pass_fds=(to_worker_read, from_worker_write),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (to_worker_write, from_worker_read):
                os.close(fd)
            raise
        finally:
            os.close(to_worker_read)
            os.close(from_worker_write)
        self.pid = self.process.pid
        self.outbox = multiprocessing.connection.Connection(to_worker_write, readable=False)
        self.inbox = multiprocessing.connection.Connection(from_worker_read, writable=False)
        self.owner_pid = os.getpid()
        self.ready = False

    def returncode(self, wait_s: float = 0.0) -> int | None:
        """Exit status (negative: killed by that signal), waiting up to ``wait_s`` for it."""
        if self.process is None:
            return None
        try:
            return self.process.wait(wait_s) if wait_s else self.process.poll()
        except subprocess.TimeoutExpired:
            return None

    def stop(self, graceful: bool) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if self.owner_pid == os.getpid():  # a forked copy of the owner leaves the worker alone
            if graceful and self.ready and process.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    self.outbox.send(None)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(1.0)
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()
        self.outbox.close()
        self.inbox.close()


def _stop_worker(holder: list[_Worker | None]) -> None:
    """Finalizer: stop whichever worker the extractor has at the time."""
    worker = holder[0]
    if worker is not None:
        holder[0] = None
        worker.stop(graceful=False)


class BoundedExtractor:
    """html_to_text in one long-lived worker process, with a time and an address-space limit.

    Extraction libraries hang or balloon on pathological pages, inside C (and Rust) code that no
    Python-level timeout can interrupt, so the only reliable bound is a process that can be
    killed. One long-lived worker, rather than a process per page, keeps the start-up cost
    (~0.4 s: imports of lxml, trafilatura, resiliparse) off the per-page path; it is started
    in the constructor, without waiting, so it boots while the caller does other work.

    The worker is a fresh interpreter (as with multiprocessing's spawn: the crawler calls from
    threads, and forking a threaded process can deadlock the child on a lock another thread
    held), but started with ``python -c`` rather than through multiprocessing.Process, because
    spawn and forkserver re-run the caller's ``__main__`` script in the child when it lacks an
    ``if __name__ == "__main__":`` guard. Pages and texts travel over
    ``multiprocessing.connection`` pipes.

    ``memory_mb`` bounds the worker's whole address space (RLIMIT_AS), set after the libraries
    are imported and warmed up (about 60-70 MiB of address space for either backend on x86-64
    Linux), so a page can use roughly ``memory_mb`` minus that. The timeout counts from handing
    the page to the worker; worker start-up is bounded separately (``startup_timeout_s``).

    Failures: timeout -> ``extract_timeout`` (the worker is killed); out of memory in the worker
    (a MemoryError, lexbor's allocation error, or resiliparse's Rust code aborting on a failed
    allocation) -> ``extract_memory``; a worker that dies otherwise -> ``extract_failed``. In each
    case the worker is replaced at once, so the next page finds it (nearly) ready.
    """

    startup_timeout_s = 60.0

    def __init__(
        self, extractor: str = DEFAULT_EXTRACTOR, timeout_s: float = 10.0, memory_mb: int = 1024
    ) -> None:
        if extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {extractor!r}; choose one of {EXTRACTORS}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if memory_mb <= 0:
            raise ValueError("memory_mb must be positive")
        self.extractor = extractor
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._lock = threading.Lock()
        self._closed = False
        self._holder: list[_Worker | None] = [None]
        # Stops the worker if the extractor is garbage-collected or the interpreter exits
        # without close().
        self._finalizer = weakref.finalize(self, _stop_worker, self._holder)
        with self._lock:
            self._holder[0] = _Worker(extractor, memory_mb * 1024 * 1024)

    @property
    def pid(self) -> int | None:
        """The worker's process id."""
        worker = self._holder[0]
        return worker.pid if worker is not None else None

    def _replace_worker(self) -> None:
        if self._holder[0] is not None:
            self._holder[0].stop(graceful=False)
        self._holder[0] = _Worker(self.extractor, self.memory_mb * 1024 * 1024)

    def _ready_worker(self) -> _Worker:
        worker = self._holder[0]
        if (
            worker is None
            or worker.owner_pid != os.getpid()  # we are a forked copy of the owner
            or (worker.ready and worker.returncode() is not None)  # died between pages
        ):
            self._replace_worker()
            worker = self._holder[0]
            assert worker is not None
        if worker.ready:
            return worker
        try:
            message = worker.inbox.recv() if worker.inbox.poll(self.startup_timeout_s) else None
        except (EOFError, OSError):
            message = None
        if not message or message[0] != "ready":
            code = worker.returncode(1.0)
            self._holder[0] = None
            worker.stop(graceful=False)
            why = message[1] if message else f"exit code {code}"
            raise RuntimeError(
                f"the {self.extractor} extraction worker did not start "
                f"(memory_mb={self.memory_mb}): {why}"
            )
        worker.ready = True
        return worker

    def _fail(self, reason: str, detail: str) -> ExtractionError:
        """Replace the worker and return the error to raise."""
        worker = self._holder[0]
        code = worker.returncode(1.0) if worker is not None and reason == "extract_failed" else None
        self._replace_worker()
        if code == -signal.SIGABRT:
            # resiliparse 2 is Rust inside: a failed allocation under RLIMIT_AS aborts the process
            # ("memory allocation of N bytes failed") instead of raising MemoryError. Nothing else
            # in the worker aborts in practice, so this is the memory bound doing its job.
            reason = "extract_memory"
            detail = f"{detail}: aborted, a failed allocation (limit {self.memory_mb} MiB)"
        elif code is not None:
            detail = f"{detail} (exit code {code})"
        return ExtractionError(reason, detail)

    def extract(self, html: str, url: str | None = None) -> str:
        """Main-content text of one page, or :class:`ExtractionError`."""
        return self._run(html, url, want_links=False)[0]

    def extract_with_links(self, html: str, url: str) -> tuple[str, list[str]]:
        """(main-content text, absolute http(s) links) of one page, both parsed in the worker
        under the same timeout; :class:`ExtractionError` carries the links when the text fails
        after they were found."""
        return self._run(html, url, want_links=True)

    def _run(self, html: str, url: str | None, want_links: bool) -> tuple[str, list[str]]:
        with self._lock:
            if self._closed:
                raise RuntimeError("BoundedExtractor is closed")
            worker = self._ready_worker()
            reply: tuple[Any, ...] | None = None
            try:
                worker.outbox.send((html, url, want_links))
            except OSError:
                # The worker died while reading; it may have left a reply before exiting.
                try:
                    reply = worker.inbox.recv() if worker.inbox.poll(0.5) else None
                except (EOFError, OSError):
                    reply = None
                if reply is None:
                    raise self._fail("extract_failed", "worker died receiving the page") from None
            links: list[str] = []
            deadline = time.monotonic() + self.timeout_s  # links and text: one page, one bound
            while reply is None or reply[0] == "links":
                if reply is not None:
                    links = reply[1]
                if not worker.inbox.poll(max(0.0, deadline - time.monotonic())):
                    error = self._fail(
                        "extract_timeout", f"{self.extractor}: no result after {self.timeout_s} s"
                    )
                    error.links = links
                    raise error
                try:
                    reply = worker.inbox.recv()
                except (EOFError, OSError):
                    error = self._fail("extract_failed", "worker died during extraction")
                    error.links = links
                    raise error from None
            if reply[0] == "ok":
                return reply[1], links
            _, reason, detail = reply
            if reason == "extract_memory":
                # The libraries' state after a failed allocation is not trusted: fresh worker.
                error = self._fail(reason, f"{detail} (limit {self.memory_mb} MiB)")
            else:
                error = ExtractionError(reason, detail)
            error.links = links
            raise error

    def close(self) -> None:
        """Stop the worker (a polite request, then SIGKILL to its pid) and wait for it."""
        with self._lock:
            self._closed = True
            worker, self._holder[0] = self._holder[0], None
            if worker is not None:
                worker.stop(graceful=True)
            self._finalizer.detach()

    def __enter__(self) -> BoundedExtractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
