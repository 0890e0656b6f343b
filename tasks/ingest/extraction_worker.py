"""One extraction worker process: the code it runs, and the parent's handle on it.

The pool that hands pages to these workers, and maps their failures to rejection reasons, is
:class:`llmflow.tasks.ingest.bounded_extractor.BoundedExtractor`. This module holds what one
worker is: a fresh interpreter that warms up the extractor, puts its address space under
RLIMIT_AS, then loops over pages, each under a CPU-time budget the kernel enforces.

Why the CPU budget is the worker's own: before each page the worker arms ``ITIMER_PROF``, a
kernel timer that counts down only while the process runs (user and system time). When it
expires the kernel delivers SIGPROF, whose default action ends the process at once, even in the
middle of a C or Rust call that holds the GIL (no Python code has to run, which is why a Python
timer could not do it). The budget so counts the CPU the page costs, not the wall clock: a
loaded machine, or a worker stopped with SIGSTOP, makes the page slower, never rejected. The
parent needs no polling of ``/proc`` for it and only keeps a generous wall-clock backstop.
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
from typing import Any

from llmflow.tasks.ingest.html_links import extract_links
from llmflow.tasks.ingest.html_text import ExtractionError, _extract

__all__ = ["CPU_LIMIT_SIGNAL", "Worker"]

# The signal the kernel sends when a page's CPU budget runs out; a worker killed by it was over.
CPU_LIMIT_SIGNAL = signal.SIGPROF

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
    "from llmflow.tasks.ingest.extraction_worker import _worker_entry; _worker_entry(sys.argv[2:])"
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
    extractor, memory_bytes, cpu_s, read_fd, write_fd, parent_pid = argv
    # trafilatura imports py3langid when it is installed (the quality stage needs it) and loads
    # its model (~130 MiB of address space) for a language check extraction never asks for.
    sys.modules.setdefault("py3langid", None)  # type: ignore[arg-type]
    _die_with_parent()
    if os.getppid() != int(parent_pid):  # the parent died before prctl took effect
        return
    inbox = multiprocessing.connection.Connection(int(read_fd), writable=False)
    outbox = multiprocessing.connection.Connection(int(write_fd), readable=False)
    _worker_main(inbox, outbox, extractor, int(memory_bytes), float(cpu_s))


def _worker_main(inbox: Any, outbox: Any, extractor: str, memory_bytes: int, cpu_s: float) -> None:
    """Loop of the extraction process: receive (html, url, want_links); answer ("links", links)
    first when asked for them, then ("ok", text) or ("error", reason, detail)."""
    # Ctrl-C goes to the whole process group; the parent decides what happens to the worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The CPU budget is the default action of this signal: ending the process (see the module).
    signal.signal(CPU_LIMIT_SIGNAL, signal.SIG_DFL)
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
        # Links and text: one page, one budget. Time blocked sending to a slow parent is not
        # CPU time, so it does not count.
        signal.setitimer(signal.ITIMER_PROF, cpu_s)
        if want_links:
            # Links are parsed here too, not in the caller: lxml has pathological pages of its
            # own, and only this process can be stopped in the middle of one. Sent before the
            # text, so that a page whose text is over budget still leads to its links.
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
        signal.setitimer(signal.ITIMER_PROF, 0)
        del html
        try:
            outbox.send(reply)
        except MemoryError:
            del reply
            outbox.send(("error", "extract_memory", "out of memory sending the text"))


class Worker:
    """One worker process and its two pipe ends, as its parent holds them.

    Started without waiting (the interpreter boots while the caller does other work); ``ready``
    turns true once its "ready" message has been read.
    """

    def __init__(self, extractor: str, memory_bytes: int, cpu_s: float) -> None:
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
                    repr(cpu_s),
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

    def wait_ready(self, timeout_s: float) -> str | None:
        """Read the worker's "ready" message; None when it came, else why it did not."""
        if self.ready:
            return None
        try:
            message = self.inbox.recv() if self.inbox.poll(timeout_s) else None
        except (EOFError, OSError):
            message = None
        if message and message[0] == "ready":
            self.ready = True
            return None
        return str(message[1]) if message else f"exit code {self.returncode(1.0)}"

    def returncode(self, wait_s: float = 0.0) -> int | None:
        """Exit status (negative: killed by that signal), waiting up to ``wait_s`` for it."""
        process = self.process
        if process is None:
            return None
        try:
            return process.wait(wait_s) if wait_s else process.poll()
        except subprocess.TimeoutExpired:
            return None

    def ask_to_exit(self) -> bool:
        """Tell an idle, ready worker to finish (it exits at its next read); whether it was told."""
        if not self.ready or self.process is None or self.owner_pid != os.getpid():
            return False
        with contextlib.suppress(OSError, ValueError):
            self.outbox.send(None)
        return True

    def kill(self) -> None:
        """SIGKILL the process and reap it; the pipes stay open for the thread using them."""
        process = self.process
        if process is None or self.owner_pid != os.getpid():
            return
        process.kill()  # Popen's own kill: never signals a pid that was already reaped
        process.wait()

    def stop(self, graceful: bool) -> None:
        """End the process (politely first when ``graceful``) and close the pipes."""
        if self.process is None:
            return
        if graceful and self.ask_to_exit():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(1.0)
        self.kill()  # a forked copy of the owner leaves the worker alone
        self.process = None
        self.outbox.close()
        self.inbox.close()
