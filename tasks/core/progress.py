"""Progress of a long step, shown where the user is looking: a terminal bar and a Prefect artifact.

One object does both so that a stage reports progress once. The terminal bar appears only on a
terminal (rich decides), the Prefect progress artifact only inside a flow or task run and for a
step whose total is known (one without would sit at 0% until it ends); both are best-effort and
never fail the work they describe. While a bar is shown, log lines that would be written to the
same terminal (Prefect's console handler, any stream handler on it) print above the bars instead
of through them.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import TracebackType
from typing import IO, Any, Self, cast
from uuid import UUID

from rich.console import Console
from rich.file_proxy import FileProxy
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger(__name__)
_ARTIFACT_INTERVAL_S = 2.0


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def stage_key(text: str, stage: str | None = None) -> str:
    """An artifact key led by the number of its stage in the pipeline (``quality-funnel`` →
    ``03-quality-funnel``), so that keys sort in stage order (``prefect artifact ls``, the API's
    KEY_ASC); ``stage`` names the stage, else the key's own first words do (the longest stage
    name that leads it: ``quality-model-rater`` is quality_model's). Unchanged when no stage
    leads it."""
    from llmflow.tasks.registry import GRAPH  # the stages' modules import this one

    key = artifact_key(text)
    names = GRAPH.names
    if stage is None:
        leading = [
            n for n in names if key == artifact_key(n) or key.startswith(f"{artifact_key(n)}-")
        ]
        if not leading:
            return key
        stage = max(leading, key=len)
    return f"{names.index(stage) + 1:02d}-{key}"


def in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's logger inside a flow or task run (its lines reach the Prefect UI), else ours."""
    if in_prefect_run():
        from prefect.logging import get_run_logger

        return get_run_logger()
    return log


_bar_lock = threading.Lock()
_bar: RichProgress | None = None
_bar_users = 0
_bar_console: Console | None = None  # where bars draw; None: stderr's terminal
_rerouted: list[Callable[[], None]] = []  # undoes the log routing while bars are shown


@contextmanager
def bars_on(console: Console) -> Iterator[None]:
    """Draw the bars started in this block on ``console`` (a terminal, or a console forced to
    act as one), not on stderr."""
    global _bar_console
    previous, _bar_console = _bar_console, console
    try:
        yield
    finally:
        _bar_console = previous


def _handlers() -> list[logging.Handler]:
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    found: dict[int, logging.Handler] = {}
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            found[id(handler)] = handler
    return list(found.values())


def _same_terminal(stream: Any, console: Console) -> bool:
    if stream is console.file:
        return True
    try:
        return bool(stream.isatty()) and bool(console.file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class _AboveBars(io.TextIOBase):
    """A terminal file whose lines print above the live bars (rich's FileProxy, which a rich
    Console would unwrap to the file beneath: it reads ``rich_proxied_file``)."""

    def __init__(self, console: Console, file: IO[str]) -> None:
        self._proxy = FileProxy(console, file)
        self._file = file

    def write(self, text: str) -> int:
        self._proxy.write(text)
        return len(text)

    def flush(self) -> None:
        self._proxy.flush()

    def isatty(self) -> bool:
        return self._file.isatty()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._file, "encoding", None) or "utf-8"


def _route_logs_above(console: Console) -> list[Callable[[], None]]:
    """Point every log handler that writes to the bars' terminal through the live display, which
    prints each line above the bars: Prefect's console handler renders with its own rich
    Console, bound to stderr when logging was configured, so rich's redirect of sys.stderr
    misses it, and its lines landed in the bar being drawn. Returns what undoes it."""
    from prefect.logging.handlers import PrefectConsoleHandler

    undo: list[Callable[[], None]] = []
    for handler in _handlers():
        if isinstance(handler, PrefectConsoleHandler):
            own = handler.console
            if _same_terminal(own.file, console):
                original: IO[str] = own.file
                own.file = cast(IO[str], _AboveBars(console, original))
                undo.append(partial(setattr, own, "file", original))
        elif isinstance(handler, logging.StreamHandler) and _same_terminal(handler.stream, console):
            stream = handler.stream
            handler.setStream(_AboveBars(console, stream))
            undo.append(partial(handler.setStream, stream))
    return undo


def _shared_bar() -> RichProgress | None:
    """The process's one rich Progress display, started by its first user (rich allows one live
    display at a time: a stage's bar and the crawl's page bar inside it share it as two rows)."""
    global _bar, _bar_users, _rerouted
    with _bar_lock:
        if _bar is None:
            console = _bar_console or Console(stderr=True)
            if not console.is_terminal:
                return None
            _bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            )
            _bar.start()
            _rerouted = _route_logs_above(console)
        _bar_users += 1
        return _bar


def _release_bar() -> None:
    global _bar, _bar_users, _rerouted
    with _bar_lock:
        _bar_users -= 1
        if _bar_users == 0 and _bar is not None:
            for undo in _rerouted:
                undo()
            _rerouted = []
            _bar.stop()
            _bar = None


class StepProgress:
    """Counts units of a step (pages, shards) towards an optional total."""

    def __init__(
        self, key: str, description: str, total: int | None, artifact: UUID | None = None
    ) -> None:
        """``key`` names the Prefect progress artifact (led by its stage's number:
        :func:`stage_key`); ``artifact`` is one to reuse (a step of several parts that shows as
        one artifact: :func:`progress_per_task`)."""
        self.description = description
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._last_artifact = 0.0
        self._artifact_id: UUID | None = None
        self._bar = _shared_bar()
        if self._bar is not None:
            self._bar_task = self._bar.add_task(description, total=total)
        if in_prefect_run() and total:
            try:
                from prefect.artifacts import create_progress_artifact, update_progress_artifact

                if artifact is None:
                    # prefect's sync_compatible type says "or a coroutine"; called sync, a UUID
                    artifact = cast(
                        UUID,
                        create_progress_artifact(
                            progress=0.0, key=stage_key(key), description=description
                        ),
                    )
                else:
                    update_progress_artifact(
                        artifact_id=artifact, progress=0.0, description=description
                    )
                self._artifact_id = artifact
            except Exception as error:  # progress display must never sink the work
                log.debug("no progress artifact for %s: %s", key, error)

    @property
    def artifact_id(self) -> UUID | None:
        """The Prefect progress artifact, if there is one."""
        return self._artifact_id

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(self._bar_task, completed=self.done)
            now = time.monotonic()
            if now - self._last_artifact >= _ARTIFACT_INTERVAL_S:
                self._last_artifact = now
                self._publish()

    def _publish(self) -> None:
        if self._artifact_id is None or not self.total:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            percent = min(100.0, 100.0 * self.done / self.total)
            update_progress_artifact(artifact_id=self._artifact_id, progress=percent)
        except Exception as error:
            log.debug("progress artifact update failed: %s", error)

    def close(self) -> None:
        with self._lock:
            # A closed step is complete, even one that stopped before its limit (a small site).
            self.total = max(self.total or 0, self.done, 1)
            self.done = self.total
            self._publish()
            if self._bar is not None:
                self._bar.update(self._bar_task, completed=self.done, total=self.total)
                _release_bar()
                self._bar = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextmanager
def progress_per_task(prefix: str) -> Iterator[Callable[[str, int], Callable[[], None]]]:
    """An ``on_task(task, items)`` callback for work done task after task (benchmarks): each
    call closes the previous task's bar and opens one for the new task, whose ``advance`` it
    returns; leaving the block closes the last one, whatever happened. In Prefect the tasks
    share one progress artifact (``<prefix>-tasks``), which shows the task being done."""
    bars: list[StepProgress] = []

    def on_task(task: str, items: int) -> Callable[[], None]:
        for bar in bars:
            bar.close()
        artifact = next((b.artifact_id for b in bars if b.artifact_id is not None), None)
        bars.append(StepProgress(f"{prefix}-tasks", f"{prefix}: {task}", items, artifact))
        return bars[-1].advance

    try:
        yield on_task
    finally:
        for bar in bars:
            bar.close()
