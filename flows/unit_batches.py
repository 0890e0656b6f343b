"""Units of work grouped into task runs: a stage of 20,000 small shards is a few hundred runs.

Prefect records every task run in its API (states, events, logs). One task run per unit, all
mapped at once, made a stage of 20,000 small files 20,000 task runs, and the SQLite-backed API of
the embedded default answered 503 under that load. Units are therefore grouped into batches,
one task run per batch:

* **How big a batch is** (:func:`units_per_batch`): as few units as keep a stage at most
  :data:`MAX_TASK_RUNS` task runs, and never so many that a worker gets fewer than
  :data:`MIN_BATCHES_PER_WORKER` batches (a cluster of more than 64 workers gets
  ``4 x workers`` task runs, so each still has work and a slow batch is not the whole stage's
  tail). A stage of at most 256 units keeps one unit per task run: the embedded default's runs
  look as they always did. ``PipelineConfig.units_per_task`` sets the size instead (1: one
  unit per task run however many there are).
* **What a batch does** (:func:`run_batch`): each of its units, one after another, through the
  stage's own task function, so through :func:`~llmflow.tasks.core.stage.run_unit` with the
  unit's own key and marker. Grouping changes no output byte, and a re-run after a kill skips
  the finished units of a half-done batch; a failure or a resume costs at most one batch.
* **Progress**: the stage's bar and live counts advance by the units of each batch as it ends
  (a worker may be another process or machine, with no channel back but its result), so they
  move at least ``4 x workers`` times per stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.utilities.annotations import unmapped

MAX_TASK_RUNS = 256
MIN_BATCHES_PER_WORKER = 4

T = TypeVar("T")


def units_per_batch(units: int, workers: int) -> int:
    """Units per task run: the fewest that keep a stage within ``max(256, 4 x workers)`` runs."""
    return max(1, math.ceil(units / max(MAX_TASK_RUNS, MIN_BATCHES_PER_WORKER * workers)))


def batches(items: Sequence[T], size: int) -> list[list[T]]:
    """``items`` cut into runs of ``size`` in plan order (the last one may be shorter)."""
    if size < 1:
        raise ValueError(f"a batch holds at least one unit, not {size}")
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


@task(name="unit-batch", cache_policy=NO_CACHE, persist_result=False)
def run_batch(
    unit_fn: Callable[[Any, Any, str], Any], units: list[Any], config: Any, stage_dir: str
) -> list[Any]:
    """One batch: each unit through the stage task's function, as its own task run would."""
    return [unit_fn(unit, config, stage_dir) for unit in units]


def map_units(
    unit_task: Task[..., Any], units: Sequence[Any], config: Any, stage_dir: str, size: int
) -> Iterator[list[Any]]:
    """Map ``unit_task`` over ``units`` on the flow's task runner, ``size`` units per task run;
    yield each task run's results as it ends (one result per unit, a list per batch).

    With ``size`` 1 the stage's own task is mapped, one task run per unit (named as before);
    otherwise :func:`run_batch` under the task's name plus ``-batch``, handed the task's plain
    function (which pickles for process pools and Dask workers)."""
    if size == 1:
        futures = unit_task.map(list(units), unmapped(config), unmapped(stage_dir))
        for future in as_completed(futures):
            yield [future.result()]
        return
    batch_task = run_batch.with_options(name=f"{unit_task.name}-batch")
    batch_futures = batch_task.map(
        unit_fn=unmapped(unit_task.fn),
        units=batches(units, size),
        config=unmapped(config),
        stage_dir=unmapped(stage_dir),
    )
    for batch_future in as_completed(batch_futures):
        yield batch_future.result()
