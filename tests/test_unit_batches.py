"""Units grouped into task runs: how many runs a stage makes, and that a batch is only a grouping
(the same bytes as one unit per run; finished units of a half-done batch skipped on a re-run).
The batches on real Prefect runners (threads, processes, Dask) are in test_dask_runner.py."""

from __future__ import annotations

from pathlib import Path

from document_datasets import reference_documents, write_texts

from llmflow.flows.unit_batches import (
    MAX_TASK_RUNS,
    MIN_BATCHES_PER_WORKER,
    batches,
    run_batch,
    units_per_batch,
)
from llmflow.tasks.core import shards
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import UnitRecord, marker_path, plan_shard_units
from llmflow.tasks.curate import normalize


def task_runs(units: int, workers: int) -> int:
    return len(batches(range(units), units_per_batch(units, workers)))


def test_a_stage_is_a_few_hundred_task_runs_and_small_ones_one_unit_per_run() -> None:
    assert units_per_batch(20, 2) == 1  # the embedded default: as before
    assert units_per_batch(MAX_TASK_RUNS, 2) == 1
    assert units_per_batch(MAX_TASK_RUNS + 1, 2) == 2
    for units in (257, 1_000, 20_000, 2_000_000):
        assert MAX_TASK_RUNS // 2 < task_runs(units, 2) <= MAX_TASK_RUNS
    # a big cluster still gets a few batches per worker
    assert task_runs(20_000, 100) >= MIN_BATCHES_PER_WORKER * 100
    assert batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]


def normalized(stage_dir: Path, units: list, size: int) -> list[UnitRecord]:
    config = normalize.NormalizeConfig()
    records: list[UnitRecord] = []
    for batch in batches(units, size):
        records += run_batch.fn(normalize.normalize_shard.fn, batch, config, str(stage_dir))
    return records


def stage_files(stage_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(stage_dir)): p.read_bytes()
        for p in stage_dir.rglob("*")
        if p.is_file() and shards.DONE_DIR not in p.parts
    }


def test_batched_units_write_what_units_one_by_one_write_and_resume_inside_a_batch(
    tmp_path: Path,
) -> None:
    source = tmp_path / "crawl"
    texts = [text for _, text in reference_documents()[:36]]
    write_texts(str(source), texts, shards=18)
    config = normalize.NormalizeConfig()
    units, digest = plan_shard_units(normalize.STAGE, config, str(source))
    assert len(units) == 18

    one_by_one, grouped = tmp_path / "one", tmp_path / "grouped"
    finalize_stage(
        str(one_by_one), normalize.STAGE, config, normalized(one_by_one, units, 1), digest
    )
    records = normalized(grouped, units, 5)
    finalize_stage(str(grouped), normalize.STAGE, config, records, digest)
    assert [r.name for r in records] == [u.name for u in units]
    assert stage_files(grouped) == stage_files(one_by_one)  # manifest included, byte for byte

    # killed in the middle of the second batch: its first two units had finished
    half_done = units[5:10]
    for unit in half_done[2:]:
        shards.remove(marker_path(str(grouped), unit.name))
        shards.remove(str(grouped / f"{unit.name}.parquet"))
    again = run_batch.fn(normalize.normalize_shard.fn, half_done, config, str(grouped))
    assert [r.skipped for r in again] == [True, True, False, False, False]
    finalize_stage(str(grouped), normalize.STAGE, config, normalized(grouped, units, 5), digest)
    assert stage_files(grouped) == stage_files(one_by_one)
