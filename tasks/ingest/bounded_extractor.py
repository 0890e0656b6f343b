"""Extraction under limits: html_to_text in a pool of worker processes, one per core, each with a
CPU-time and a memory bound.

Extraction runs third-party parsers on untrusted input, and those parsers have pathological
cases: in our measurements (bench/html_extractors.md) resiliparse needs 32 s for 50,000 nested
``<div>`` tags, and trafilatura more than 6 minutes for one tag with 200,000 attributes. Neither
library can be interrupted from Python while it is inside C code, so the crawler and the file
readers extract through :class:`BoundedExtractor`, which runs the extractor in separate processes
it can kill (:mod:`llmflow.tasks.ingest.extraction_worker` is one such process).
"""

from __future__ import annotations

import os
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from llmflow.tasks.ingest.extraction_worker import CPU_LIMIT_SIGNAL, Worker
from llmflow.tasks.ingest.html_text import DEFAULT_EXTRACTOR, EXTRACTORS, ExtractionError

__all__ = ["BoundedExtractor", "usable_cores"]

Item = TypeVar("Item")
Result = TypeVar("Result")


def usable_cores() -> int:
    """CPUs this process may run on: its affinity mask (which taskset and containers narrow),
    else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _stop_all(workers: set[Worker], spawner: ThreadPoolExecutor) -> None:
    """Finalizer: stop every worker the extractor has at the time, then its spawning thread."""
    for worker in list(workers):
        workers.discard(worker)
        worker.stop(graceful=False)
    spawner.shutdown(wait=False)


class BoundedExtractor:
    """html_to_text in a pool of long-lived worker processes, with a CPU-time and an
    address-space limit per page; safe to call from many threads at once.

    Extraction libraries hang or balloon on pathological pages, inside C (and Rust) code that no
    Python-level timeout can interrupt, so the only reliable bound is a process that can be
    killed. Long-lived workers, rather than a process per page, keep the start-up cost (~0.4 s:
    imports of lxml, trafilatura, resiliparse) off the per-page path. The pool holds up to
    ``workers`` of them (0: one per usable core): each caller takes an idle worker, or starts a
    new one while the pool is below its size, or waits for one to come back. The first worker is
    started in the constructor, without waiting, so it boots while the caller does other work;
    the others start when callers first overlap, so a caller that extracts one page at a time
    holds one process. The crawler calls from many threads (``asyncio.to_thread``) and the file
    readers through :meth:`imap`, so both use every core.

    Workers are fresh interpreters (as with multiprocessing's spawn: the crawler calls from
    threads, and forking a threaded process can deadlock the child on a lock another thread
    held), but started with ``python -c`` rather than through multiprocessing.Process, because
    spawn and forkserver re-run the caller's ``__main__`` script in the child when it lacks an
    ``if __name__ == "__main__":`` guard. Pages and texts travel over
    ``multiprocessing.connection`` pipes. No worker outlives its parent (Linux's parent-death
    signal; elsewhere end of file on its pipe). That signal fires when the *thread* that started
    the worker ends, so every worker is started by one thread of the extractor's own, which lives
    as long as the extractor: callers' threads (a reader's, asyncio's) may come and go.

    Bounds, per page: ``cpu_s`` seconds of the worker's CPU time (enforced by the kernel in the
    worker, see :mod:`~llmflow.tasks.ingest.extraction_worker`), so a loaded machine makes pages
    slower but rejects none that an idle one keeps; ``wall_s`` seconds of wall clock from handing
    the page over, a generous backstop for a worker that gets no CPU at all; ``memory_mb`` of
    address space (RLIMIT_AS), set after the libraries are imported and warmed up (about 60-70
    MiB for either backend on x86-64 Linux), so a page can use roughly ``memory_mb`` minus that.
    Worker start-up is bounded separately (``startup_timeout_s``).

    Failures: over the CPU budget -> ``extract_cpu_timeout``; over the wall-clock backstop ->
    ``extract_wall_timeout`` (the machine was starved, or the worker stopped: a different reason,
    so that a reader can tell load from a hostile page); out of memory in the worker (a
    MemoryError, lexbor's allocation error, or resiliparse's Rust code aborting on a failed
    allocation) -> ``extract_memory``; a worker that dies otherwise -> ``extract_failed``. In each
    case the worker is replaced at once, so the next page finds it (nearly) ready.
    """

    startup_timeout_s = 60.0

    def __init__(
        self,
        extractor: str = DEFAULT_EXTRACTOR,
        cpu_s: float = 10.0,
        wall_s: float = 120.0,
        memory_mb: int = 1024,
        workers: int = 0,
    ) -> None:
        if extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {extractor!r}; choose one of {EXTRACTORS}")
        if cpu_s <= 0:
            raise ValueError("cpu_s must be positive")
        if wall_s < cpu_s:
            raise ValueError(f"wall_s ({wall_s}) must be at least cpu_s ({cpu_s})")
        if memory_mb <= 0:
            raise ValueError("memory_mb must be positive")
        if workers < 0:
            raise ValueError("workers must be 0 (one per core) or more")
        self.extractor = extractor
        self.cpu_s = cpu_s
        self.wall_s = wall_s
        self.memory_mb = memory_mb
        self.workers = workers or usable_cores()
        self._cond = threading.Condition()
        self._idle: list[Worker] = []  # a stack: a lone caller keeps reusing the warmest worker
        self._live: set[Worker] = set()  # idle, busy and starting; shared with the finalizer
        self._closed = False
        self._owner_pid = os.getpid()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-spawner")
        # Stops the workers if the extractor is garbage-collected or the interpreter exits
        # without close().
        self._finalizer = weakref.finalize(self, _stop_all, self._live, self._spawner)
        with self._cond:
            self._idle.append(self._start_worker())

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers, idle, busy or starting."""
        with self._cond:
            return sorted(worker.pid for worker in self._live)

    # -- the pool --------------------------------------------------------------------------------

    def _start_worker(self) -> Worker:
        """A new worker, counted as live (the caller holds the lock), started by the spawning
        thread (whose end is the worker's parent-death signal, see the class)."""
        memory_bytes = self.memory_mb * 1024 * 1024
        worker = self._spawner.submit(Worker, self.extractor, memory_bytes, self.cpu_s).result()
        self._live.add(worker)
        return worker

    def _forget_parent_workers(self) -> None:
        """In a forked copy of the owner: the workers are the parent's; this copy starts its own."""
        self._finalizer.detach()
        for worker in self._live:
            worker.stop(graceful=False)  # in a copy this closes only the copy's pipe ends
        self._cond = threading.Condition()
        self._idle, self._live = [], set()
        self._owner_pid = os.getpid()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="extract-spawner")
        self._finalizer = weakref.finalize(self, _stop_all, self._live, self._spawner)

    def _acquire(self) -> Worker:
        """An idle worker, a new one while the pool is below its size, or the next one freed."""
        if self._owner_pid != os.getpid():
            self._forget_parent_workers()
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("BoundedExtractor is closed")
                while self._idle:
                    worker = self._idle.pop()
                    if not worker.ready or worker.returncode() is None:
                        return worker
                    self._live.discard(worker)  # died between pages
                    worker.stop(graceful=False)
                if len(self._live) < self.workers:
                    return self._start_worker()
                self._cond.wait()

    def _release(self, worker: Worker) -> None:
        with self._cond:
            if self._closed:
                self._live.discard(worker)
                worker.stop(graceful=False)
            else:
                self._idle.append(worker)
            self._cond.notify()

    def _discard(self, worker: Worker) -> None:
        """Stop a worker whose state is not trusted; start its replacement at once, so that it
        boots while the caller goes on."""
        worker.stop(graceful=False)
        with self._cond:
            if worker not in self._live:
                return
            self._live.discard(worker)
            if not self._closed:
                self._idle.append(self._start_worker())
            self._cond.notify()

    def _fail(
        self, worker: Worker, reason: str, detail: str, links: list[str] | None = None
    ) -> ExtractionError:
        """Replace the worker and return the error the page gets."""
        code = worker.returncode(1.0) if reason == "extract_failed" else None
        self._discard(worker)
        if self._closed:
            raise RuntimeError("BoundedExtractor was closed during the extraction")
        if code == -CPU_LIMIT_SIGNAL:
            reason = "extract_cpu_timeout"
            detail = f"{self.extractor}: over {self.cpu_s} s of CPU time"
        elif code == -signal.SIGABRT:
            # resiliparse 2 is Rust inside: a failed allocation under RLIMIT_AS aborts the process
            # ("memory allocation of N bytes failed") instead of raising MemoryError. Nothing else
            # in the worker aborts in practice, so this is the memory bound doing its job.
            reason = "extract_memory"
            detail = f"{detail}: aborted, a failed allocation (limit {self.memory_mb} MiB)"
        elif code is not None:
            detail = f"{detail} (exit code {code})"
        error = ExtractionError(reason, detail)
        error.links = links or []
        return error

    # -- one page --------------------------------------------------------------------------------

    def extract(self, html: str, url: str | None = None) -> str:
        """Main-content text of one page, or :class:`ExtractionError`."""
        return self._run(html, url, want_links=False)[0]

    def extract_with_links(self, html: str, url: str) -> tuple[str, list[str]]:
        """(main-content text, absolute http(s) links) of one page, both parsed in the worker
        under the same bounds; :class:`ExtractionError` carries the links when the text fails
        after they were found."""
        return self._run(html, url, want_links=True)

    def _run(self, html: str, url: str | None, want_links: bool) -> tuple[str, list[str]]:
        worker = self._acquire()
        outcome: tuple[str, list[str]] | ExtractionError | None = None
        try:
            why = worker.wait_ready(self.startup_timeout_s)
            if why is not None:
                if self._closed:
                    raise RuntimeError("BoundedExtractor was closed during the extraction")
                raise RuntimeError(
                    f"the {self.extractor} extraction worker did not start "
                    f"(memory_mb={self.memory_mb}): {why}"
                )
            outcome = self._exchange(worker, html, url, want_links)
        finally:
            if outcome is None:  # the worker may be out of step with this caller: not reused
                self._discard(worker)
        if isinstance(outcome, ExtractionError):
            raise outcome
        return outcome

    def _exchange(
        self, worker: Worker, html: str, url: str | None, want_links: bool
    ) -> tuple[str, list[str]] | ExtractionError:
        """One page through a ready worker, which is released or replaced before returning."""
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
                return self._fail(worker, "extract_failed", "worker died receiving the page")
        links: list[str] = []
        deadline = time.monotonic() + self.wall_s  # links and text: one page, one bound
        while reply is None or reply[0] == "links":
            if reply is not None:
                links = reply[1]
            if not worker.inbox.poll(max(0.0, deadline - time.monotonic())):
                detail = (
                    f"{self.extractor}: no result after {self.wall_s} s of wall clock"
                    f" (the CPU budget, {self.cpu_s} s, was not reached)"
                )
                return self._fail(worker, "extract_wall_timeout", detail, links)
            try:
                reply = worker.inbox.recv()
            except (EOFError, OSError):
                return self._fail(worker, "extract_failed", "worker died during extraction", links)
        if reply[0] == "ok":
            self._release(worker)
            return reply[1], links
        _, reason, detail = reply
        if reason == "extract_memory":
            # The libraries' state after a failed allocation is not trusted: fresh worker.
            return self._fail(worker, reason, f"{detail} (limit {self.memory_mb} MiB)", links)
        self._release(worker)
        error = ExtractionError(reason, detail)
        error.links = links
        return error

    # -- many pages ------------------------------------------------------------------------------

    def imap(self, fn: Callable[[Item], Result], items: Iterable[Item]) -> Iterator[Result]:
        """``fn(item)`` for every item, yielded in the items' order, with up to ``workers`` calls
        running at once; for readers whose items each need an extraction (``fn`` calls
        :meth:`extract`).

        Items are drawn in the caller's thread (a reader's file is read in order, by one thread)
        and ``fn`` runs in a small thread pool; at most 2 × ``workers`` items are drawn ahead of
        what has been yielded, so memory is bounded by the pages in flight, not by the file.
        """
        if self.workers == 1:
            yield from map(fn, items)
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="extract")
        pending: deque[Future[Result]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    # -- the end ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker and wait for it: idle ones politely, then SIGKILL; a worker busy
        with a page is killed (its caller gets RuntimeError)."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live.difference_update(idle)
            busy = list(self._live)
            self._cond.notify_all()
        for worker in idle:
            worker.ask_to_exit()
        for worker in idle:
            worker.stop(graceful=True)
        for worker in busy:
            worker.kill()  # its caller's thread closes the pipes
        self._spawner.shutdown(wait=False)
        self._finalizer.detach()

    def __enter__(self) -> BoundedExtractor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
