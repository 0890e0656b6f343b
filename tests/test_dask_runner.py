"""The data stages on a real dask.distributed LocalCluster (two worker processes, through
prefect-dask) and on a process pool, their units grouped several to a task run, give the same
shards and manifests, byte for byte, as the local thread runner with one unit per task run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_llmflow
from test_crash_resume import QUALITY_OFF, data_files, write_inputs

from llmflow.tasks.registry import GRAPH

pytestmark = pytest.mark.server  # a Prefect server and `llmflow run`

DATA_STAGES = ",".join(GRAPH.document_stages)


def run(
    workdir: Path, seeds: list[str], runner: str, prefect_api: str, units_per_task: int = 1
) -> str:
    args = ["--workdir", str(workdir), "--stages", DATA_STAGES, *QUALITY_OFF]
    for key, value in (
        ("crawl.seeds", json.dumps(seeds)),
        ("runner", runner),
        ("max_workers", "2"),
        ("units_per_task", str(units_per_task)),
    ):
        args += ["--set", f"{key}={value}"]
    result = run_llmflow(args, prefect_api)
    return result.stdout + result.stderr


def test_data_stages_on_a_dask_cluster_match_the_local_runner(
    prefect_api: str, tmp_path: Path
) -> None:
    pytest.importorskip("prefect_dask")
    seeds = write_inputs(tmp_path / "inputs", count=12)
    run(tmp_path / "threads", seeds, "threads", prefect_api)
    output = run(tmp_path / "dask", seeds, "dask", prefect_api, units_per_task=5)
    # the units ran on the local cluster's two worker processes
    assert "PrefectDaskClient" in output
    assert len(set(re.findall(r"Remove worker addr: (tcp://\S+)", output))) == 2
    assert "normalize-shard-batch-" in output  # 12 units, 5 to a task run
    expected, got = data_files(tmp_path / "threads"), data_files(tmp_path / "dask")
    assert len(expected) >= 12 * 6
    assert got.keys() == expected.keys()
    assert [k for k in expected if got[k] != expected[k]] == []


def test_data_stages_in_processes_match_the_local_runner(prefect_api: str, tmp_path: Path) -> None:
    seeds = write_inputs(tmp_path / "inputs", count=6)
    run(tmp_path / "threads", seeds, "threads", prefect_api)
    output = run(tmp_path / "processes", seeds, "processes", prefect_api, units_per_task=4)
    assert "crawl-unit-batch-" in output and "dedup-signatures-batch-" in output
    expected, got = data_files(tmp_path / "threads"), data_files(tmp_path / "processes")
    assert len(expected) >= 6 * 6
    assert got == expected
    # the manifests too: every field but the workdir's path and the hash of the manifest read
    # (which names that path in dedup's index_dir), so shards, rows, bytes, sha256, counts, stats
    names = [
        p.relative_to(tmp_path / "threads")
        for p in (tmp_path / "threads").glob("data/**/manifest.json")
    ]
    assert len(names) >= 6
    for name in names:
        mine, theirs = (
            json.loads((tmp_path / side / name).read_text().replace(str(tmp_path / side), "W"))
            for side in ("processes", "threads")
        )
        mine.pop("input_manifest_sha256", None)
        theirs.pop("input_manifest_sha256", None)
        assert mine == theirs, name
