"""Incremental refreshes: a second refresh adds only what is new, on a real web site that changes.

The site (tests/static_site_server.py, its own process) sends ETag and Last-Modified and answers
conditional requests with 304; it logs every request, so the test sees exactly what the crawler
asked for and what it was told.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import stop_process
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from test_crash_resume import QUALITY_OFF, finish, prose

from llmflow.flows.config import DOCUMENT_STAGES, DataLayout, PipelineConfig
from llmflow.tasks.core import document_versions, shards

SITE_SERVER = Path(__file__).with_name("static_site_server.py")


def page(title: str, text: str) -> str:
    return (
        f"<html><head><title>{title}</title></head><body><article><h1>{title}</h1>"
        f"<p>{text}</p></article></body></html>"
    )


def write_site(root: Path, pages: dict[str, str]) -> None:
    links = "".join(f'<li><a href="/{name}.html">{name}</a></li>' for name in sorted(pages))
    (root / "index.html").write_text(f"<html><body><h1>Index</h1><ul>{links}</ul></body></html>")
    for name, text in pages.items():
        (root / f"{name}.html").write_text(page(name, text))


@pytest.fixture
def site(tmp_path: Path):  # noqa: ANN201 - yields (root, url, log)
    root, log = tmp_path / "www", tmp_path / "requests.jsonl"
    root.mkdir()
    portfile = tmp_path / "port.json"
    server = subprocess.Popen(
        [sys.executable, str(SITE_SERVER), "--root", str(root), "--portfile", str(portfile)]
        + ["--log", str(log)],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not portfile.exists():
            assert server.poll() is None and time.monotonic() < deadline, "site did not start"
            time.sleep(0.05)
        yield root, f"http://127.0.0.1:{json.loads(portfile.read_text())['port']}", log
    finally:
        stop_process(server)


def requests_since(log: Path, start: int) -> dict[str, tuple[int, bool]]:
    lines = log.read_text().splitlines()[start:]
    return {(r := json.loads(line))["path"]: (r["status"], r["conditional"]) for line in lines}


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.server
def test_a_second_refresh_adds_only_what_is_new(
    prefect_api: str, tmp_path: Path, site: tuple[Path, str, Path]
) -> None:
    root, url, log = site
    pages = {f"p{i}": prose(i) for i in range(1, 6)}
    write_site(root, pages)
    workdir = tmp_path / "work"
    args = ["run", "--workdir", str(workdir), "--stages", ",".join(DOCUMENT_STAGES)]
    args += ["--set", f"crawl.seeds={json.dumps([url + '/'])}", "--set", "max_workers=1"]
    args += ["--set", "crawl.politeness_delay_s=0", *QUALITY_OFF]
    finish(args, prefect_api, tmp_path / "first.log")

    layout = DataLayout.of(PipelineConfig(workdir=str(workdir)))
    documents = layout.stage_dir("documents")
    first = shards.read_manifest(documents)
    assert first["version"] == 1
    first_urls = {d["url"] for d in shards.iter_documents(documents)}
    assert first_urls == {f"{url}/p{i}.html" for i in range(1, 6)}
    v1_files = tree_bytes(Path(documents) / "v0001")
    old = {d["url"].rsplit("/", 1)[1]: d["id"] for d in shards.iter_documents(documents)}

    # The site changes: p2 is rewritten, p3 deleted, p6 added, p7 is p1 with one sentence changed.
    pages["p2"] = prose(22)
    del pages["p3"]
    (root / "p3.html").unlink()
    pages["p6"] = prose(6)
    sentences = prose(1).split(". ")
    sentences[3] = "A new sentence sits here now"
    pages["p7"] = ". ".join(sentences)
    write_site(root, pages)
    seen = len(log.read_text().splitlines())
    finish([*args, "--refresh"], prefect_api, tmp_path / "refresh.log")

    asked = requests_since(log, seen)
    for name in ("p1", "p4", "p5"):  # unchanged: asked conditionally, told 304, not re-read
        assert asked[f"/{name}.html"] == (304, True)
    assert asked["/p2.html"] == (200, True)  # asked conditionally, and it had changed
    assert asked["/p3.html"] == (404, True)
    assert asked["/p6.html"] == (200, False) and asked["/p7.html"] == (200, False)

    # Only the new and changed pages went through the stages of version 2.
    layout = DataLayout.of(PipelineConfig(workdir=str(workdir)))  # now writing version 2
    crawl_dir = layout.stage_dir("crawl")
    assert crawl_dir.endswith("/documents/v0002/crawl")
    crawled = {d["url"].rsplit("/", 1)[1] for d in shards.iter_documents(crawl_dir)}
    assert crawled == {"p2.html", "p6.html", "p7.html"}
    crawl_stats = shards.read_manifest(crawl_dir)["stats"]
    assert crawl_stats["unchanged_not_modified"] >= 3
    assert shards.read_manifest(layout.stage_dir("normalize"))["counts"]["docs_in"] == 3
    # p7 is a near-duplicate of p1, which only the persistent index holds (version 1 kept it)
    dedup_dir = layout.stage_dir("dedup")
    (rejected,) = [
        row
        for shard in shards.manifest_shards(shards.read_manifest(dedup_dir), "rejected_shards")
        for row in shards.read_shard(dedup_dir, shard).to_pylist()
    ]
    assert rejected["url"].endswith("/p7.html") and rejected["reason"] == "near_duplicate"
    assert rejected["duplicate_of"] == old["p1.html"]

    # Version 2: the old documents less the changed and the gone, plus the new ones.
    second = shards.read_manifest(documents)
    assert second["version"] == 2 and second["previous"] == 1
    docs = {d["url"].rsplit("/", 1)[1]: d for d in shards.iter_documents(documents)}
    assert set(docs) == {"p1.html", "p2.html", "p4.html", "p5.html", "p6.html"}
    assert docs["p2.html"]["id"] != old["p2.html"] and "morning" in docs["p2.html"]["text"]
    assert docs["p1.html"]["id"] == old["p1.html"]
    assert second["refresh"]["added"] == 2
    assert second["refresh"]["removed_by_reason"] == {"changed": 1, "gone_http_4xx": 1}
    withdrawn = pq.read_table(Path(documents) / second["withdrawn"]["path"]).to_pylist()
    reasons = {(w["id"], w["reason"]) for w in withdrawn}
    assert {(old["p2.html"], "changed"), (old["p3.html"], "gone_http_4xx")} <= reasons

    # Version 1 is still there, untouched, and still reads as it was.
    assert tree_bytes(Path(documents) / "v0001") == v1_files
    v1 = document_versions.read_version(documents, 1)
    v1_ids = {
        row["id"]
        for shard in shards.manifest_shards(v1)
        for row in shards.read_shard(documents, shard, ["id"]).to_pylist()
    }
    assert v1_ids == set(old.values())

    # MLflow records the refresh on the flow's parent run.
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags)
    assert parent.data.tags["llmflow.documents_version"] == "v0002"
    metrics = parent.data.metrics
    assert metrics["refresh/added"] == 2 and metrics["refresh/removed"] == 2
    assert metrics["refresh/removed_by_reason/gone_http_4xx"] == 1
    assert metrics["refresh/unchanged"] >= 3 and metrics["refresh/fetched"] >= 7
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "documents")}
    assert "documents/v0002.json" in artifacts

    # A refresh that finds nothing new adds a version with the same documents.
    seen = len(log.read_text().splitlines())
    finish([*args, "--refresh"], prefect_api, tmp_path / "again.log")
    asked = requests_since(log, seen)
    assert all(asked[f"/{n}.html"] == (304, True) for n in pages)
    third = shards.read_manifest(documents)
    assert third["version"] == 3
    assert third["shards"] == second["shards"]
    assert third["refresh"]["added"] == 0 and third["refresh"]["removed"] == 0


def test_an_interrupted_refresh_is_resumed_not_abandoned(tmp_path: Path) -> None:
    documents = str(tmp_path / "documents")
    assert document_versions.begin(documents, refresh=True) == 1  # the first version
    shards.write_json_atomic(
        shards.join(documents, "versions", "v0001.json"), {"version": 1}
    )  # published
    assert document_versions.begin(documents, refresh=False) == 1  # a plain run re-runs it
    assert document_versions.begin(documents, refresh=True) == 2  # a refresh starts the next
    # version 2 is not published: a crash left it half made, and the next refresh finishes it
    assert document_versions.begin(documents, refresh=True) == 2
    assert document_versions.working_version(documents) == 2
    assert document_versions.previous_version(documents, 2) == 1
    with pytest.raises(FileNotFoundError, match="no version 3"):
        document_versions.read_version(documents, 3)


@pytest.mark.server
def test_a_refresh_rereads_only_changed_files_and_withdraws_what_left(
    prefect_api: str, tmp_path: Path
) -> None:
    folder = tmp_path / "inputs"
    folder.mkdir()
    for i in range(3):
        (folder / f"doc-{i}.txt").write_text(prose(i) + "\n")
    workdir = tmp_path / "work"
    args = ["run", "--workdir", str(workdir), "--stages", ",".join(DOCUMENT_STAGES)]
    args += ["--set", f"crawl.seeds={json.dumps([str(folder)])}", *QUALITY_OFF]
    finish(args, prefect_api, tmp_path / "first.log")
    layout = DataLayout.of(PipelineConfig(workdir=str(workdir)))
    documents = layout.stage_dir("documents")
    old = {Path(d["url"]).name: d["id"] for d in shards.iter_documents(documents)}
    assert set(old) == {"doc-0.txt", "doc-1.txt", "doc-2.txt"}

    (folder / "doc-1.txt").write_text(prose(11) + "\n")  # changed (a new size and time)
    os.utime(folder / "doc-1.txt", (time.time() + 5, time.time() + 5))
    (folder / "doc-2.txt").unlink()  # gone from the seeds
    (folder / "doc-3.txt").write_text(prose(3) + "\n")  # new
    finish([*args, "--refresh"], prefect_api, tmp_path / "refresh.log")

    layout = DataLayout.of(PipelineConfig(workdir=str(workdir)))  # now writing version 2
    crawl_dir = layout.stage_dir("crawl")
    read_again = {Path(d["url"]).name for d in shards.iter_documents(crawl_dir)}
    assert read_again == {"doc-1.txt", "doc-3.txt"}  # doc-0 is unchanged: not read again
    second = shards.read_manifest(documents)
    docs = {Path(d["url"]).name: d["id"] for d in shards.iter_documents(documents)}
    assert set(docs) == {"doc-0.txt", "doc-1.txt", "doc-3.txt"}
    assert docs["doc-0.txt"] == old["doc-0.txt"] and docs["doc-1.txt"] != old["doc-1.txt"]
    assert second["refresh"]["removed_by_reason"] == {"source_changed": 1, "source_removed": 1}
    sources = second["sources"]
    versions = {name.split("-")[1]: entry["version"] for name, entry in sources.items()}
    assert versions == {"0": 1, "1": 2, "3": 2}  # where each file's current read lives
