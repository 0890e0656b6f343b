"""`llmflow run` end to end: a real Prefect server, real MLflow on SQLite, a real crawl of pydoc.

Runs the command twice on the same workdir: the first crawls and normalizes, the second must find
every unit complete, do no work, and leave the manifests byte-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from llmflow.flows.config import STAGES
from llmflow.tasks import datasets

LLMFLOW = str(Path(sys.executable).parent / "llmflow")
MAX_PAGES = 12


def run_llmflow(args: list[str], prefect_api: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PREFECT_API_URL=prefect_api, COLUMNS="200")
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [LLMFLOW, "run", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr[-5000:]}"
    return result


def test_pipeline_runs_through_prefect_and_mlflow_then_skips_finished_work(
    prefect_api: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    notes = tmp_path / "notes.txt"
    notes.write_text("A local note.\r\nIt  has\u00a0odd   spacing.\r\n", encoding="utf-8")
    seeds = json.dumps(["pydoc:", str(notes)])
    args = [
        "--workdir",
        str(workdir),
        "--set",
        f"crawl.seeds={seeds}",
        "--set",
        f"crawl.max_pages={MAX_PAGES}",
        "--set",
        "crawl.politeness_delay_s=0",
        "--set",
        "crawl.max_depth=1",
    ]
    first = run_llmflow(args, prefect_api, tmp_path)

    crawl_dir, normalize_dir = str(workdir / "data" / "crawl"), str(workdir / "data" / "normalize")
    crawl_manifest = datasets.read_manifest(crawl_dir)
    normalize_manifest = datasets.read_manifest(normalize_dir)
    crawl_counts = crawl_manifest["counts"]
    # Every page fetched is either kept, rejected or a fetch failure; the note is one more doc.
    assert crawl_counts["kept"] + crawl_counts["rejected"] == crawl_counts["docs_in"]
    assert 5 <= crawl_counts["kept"] <= MAX_PAGES + 1
    assert {s["path"].split("-")[0] for s in crawl_manifest["shards"]} == {"web.parquet", "notes"}
    docs = list(datasets.iter_documents(crawl_dir))
    web_urls = [d["url"] for d in docs if d["source"] == "http"]
    assert web_urls and all(u.startswith("http://127.0.0.1:") for u in web_urls)
    assert not any("antigravity" in u or "/this.html" in u for u in web_urls)
    assert any("Python" in d["text"] or "module" in d["text"] for d in docs)
    assert (workdir / "data" / "crawl" / "warc" / "web.warc.gz").stat().st_size > 0

    assert normalize_manifest["counts"]["docs_in"] == crawl_counts["kept"]
    normalized = {d["id"]: d["text"] for d in datasets.iter_documents(normalize_dir)}
    note_doc = next(d for d in docs if d["source"] == "file")
    assert normalized[note_doc["id"]] == "A local note.\nIt has odd spacing."
    assert "crawl" in first.stdout and "normalize" in first.stdout
    assert "prefect server start" in first.stdout or "open http" in first.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in first.stdout

    # MLflow: one parent run tagged with the Prefect flow run, a child per stage with its counts.
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["crawl.max_pages"] == str(MAX_PAGES)
    children = {r.data.tags["llmflow.stage"]: r for r in runs if r not in parents}
    assert set(children) == set(STAGES)
    stage_dirs = {stage: str(workdir / "data" / stage) for stage in STAGES}
    for stage, stage_dir in stage_dirs.items():
        manifest = datasets.read_manifest(stage_dir)
        child = children[stage]
        assert child.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id
        assert child.data.metrics["docs_kept"] == manifest["counts"]["kept"]
        assert child.data.metrics["docs_in"] == manifest["counts"]["docs_in"]
        assert child.data.metrics["units_skipped"] == 0
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"manifest.json", "rejected_sample.json"} <= artifacts
    assert children["crawl"].data.params["max_pages"] == str(MAX_PAGES)

    # Prefect knows the flow run MLflow points at, and it completed.
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    flow_run = httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}", timeout=10).json()
    assert flow_run["state"]["type"] == "COMPLETED"

    # Second run: nothing to do, identical manifests, shards untouched.
    manifests_before = {d: (Path(d) / "manifest.json").read_bytes() for d in stage_dirs.values()}
    shard_times = {p: p.stat().st_mtime_ns for p in (workdir / "data").rglob("*.parquet")}
    second = run_llmflow(args, prefect_api, tmp_path)
    assert "Nothing to do" in second.stdout
    for d, before in manifests_before.items():
        assert (Path(d) / "manifest.json").read_bytes() == before
    assert {p: p.stat().st_mtime_ns for p in shard_times} == shard_times
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    newest_parent = next(r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags)
    assert newest_parent.info.run_id != parent.info.run_id
    for child in (
        r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == newest_parent.info.run_id
    ):
        assert child.data.metrics["units_skipped"] == child.data.metrics["units"]
