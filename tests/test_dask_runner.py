"""The data stages on a real dask.distributed LocalCluster (two worker processes, through
prefect-dask) give the same shards, byte for byte, as the local thread runner."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_llmflow
from test_crash_resume import QUALITY_OFF, data_files, write_inputs

pytestmark = pytest.mark.server  # a Prefect server and `llmflow run`

DATA_STAGES = "crawl,normalize,quality,dedup,toxicity,pii"


def run(workdir: Path, seeds: list[str], runner: str, prefect_api: str) -> str:
    args = ["--workdir", str(workdir), "--stages", DATA_STAGES, *QUALITY_OFF]
    for key, value in (
        ("crawl.seeds", json.dumps(seeds)),
        ("runner", runner),
        ("max_workers", "2"),
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
    output = run(tmp_path / "dask", seeds, "dask", prefect_api)
    # the units ran on the local cluster's two worker processes
    assert "PrefectDaskClient" in output
    assert len(set(re.findall(r"Remove worker addr: (tcp://\S+)", output))) == 2
    expected, got = data_files(tmp_path / "threads"), data_files(tmp_path / "dask")
    assert len(expected) >= 12 * 6
    assert got.keys() == expected.keys()
    assert [k for k in expected if got[k] != expected[k]] == []


def test_data_stages_in_processes_match_the_local_runner(prefect_api: str, tmp_path: Path) -> None:
    seeds = write_inputs(tmp_path / "inputs", count=6)
    run(tmp_path / "threads", seeds, "threads", prefect_api)
    run(tmp_path / "processes", seeds, "processes", prefect_api)
    expected, got = data_files(tmp_path / "threads"), data_files(tmp_path / "processes")
    assert len(expected) >= 6 * 6
    assert got == expected
