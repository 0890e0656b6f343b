"""Progress of a long step, shown where the user is looking: a terminal bar and a Prefect artifact.

One object does both so that a stage reports progress once. The terminal bar appears only on a
terminal (rich decides), the Prefect progress artifact only inside a flow or task run; both are
best-effort and never fail the work they describe.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Self, cast
from uuid import UUID

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

log = logging.getLogger(__name__)
_ARTIFACT_INTERVAL_S = 2.0


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lower-case letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


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


def _shared_bar() -> RichProgress | None:
    """The process's one rich Progress display, started by its first user (rich allows one live
    display at a time: a stage's bar and the crawl's page bar inside it share it as two rows)."""
    global _bar, _bar_users
    with _bar_lock:
        if _bar is None:
            console = Console(stderr=True)
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
        _bar_users += 1
        return _bar


def _release_bar() -> None:
    global _bar, _bar_users
    with _bar_lock:
        _bar_users -= 1
        if _bar_users == 0 and _bar is not None:
            _bar.stop()
            _bar = None


class StepProgress:
    """Counts units of a step (pages, shards) towards an optional total."""

    def __init__(self, key: str, description: str, total: int | None) -> None:
        self.description = description
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._last_artifact = 0.0
        self._artifact_id: UUID | None = None
        self._bar = _shared_bar()
        if self._bar is not None:
            self._bar_task = self._bar.add_task(description, total=total)
        if in_prefect_run():
            try:
                from prefect.artifacts import create_progress_artifact

                # prefect's sync_compatible type says "or a coroutine"; called sync, a UUID
                self._artifact_id = cast(
                    UUID,
                    create_progress_artifact(
                        progress=0.0, key=artifact_key(key), description=description
                    ),
                )
            except Exception as error:  # progress display must never sink the work
                log.debug("no progress artifact for %s: %s", key, error)

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
    returns; leaving the block closes the last one, whatever happened."""
    bars: list[StepProgress] = []

    def on_task(task: str, items: int) -> Callable[[], None]:
        for bar in bars:
            bar.close()
        bars.append(StepProgress(f"{prefix}-{task}", f"{prefix}: {task}", items))
        return bars[-1].advance

    try:
        yield on_task
    finally:
        for bar in bars:
            bar.close()
