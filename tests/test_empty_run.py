"""A run whose data comes to nothing stops after the stage that emptied it and says why.

The site here is a real HTTP server on 127.0.0.1 whose robots.txt answers 500: RFC 9309 then
forbids the whole host, so the crawl fetches nothing. ``llmflow run`` must stop after the crawl
(no tokenizer trying to learn from nothing), print the table of what ran and one line naming the
stage and the cause, exit 1, and show no traceback.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import llmflow_env, run_llmflow
from mlflow.tracking import MlflowClient


class _RobotsDown(BaseHTTPRequestHandler):
    """robots.txt answers 500; every page would answer 200 (the crawler must not ask)."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        status = 500 if self.path == "/robots.txt" else 200
        body = b"<html><body><p>A page the crawler must not fetch.</p></body></html>"
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def robots_down() -> Iterator[tuple[str, list[str]]]:
    """The site's root URL, and the paths it was asked for."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RobotsDown)
    server.paths = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", server.paths  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.server
def test_a_crawl_that_fetches_nothing_stops_after_the_crawl_and_names_the_cause(
    prefect_api: str, tmp_path: Path, robots_down: tuple[str, list[str]]
) -> None:
    url, requested = robots_down
    workdir = tmp_path / "work"
    args = [
        "--workdir",
        str(workdir),
        "--set",
        f"crawl.seeds={json.dumps([url])}",
        "--set",
        "crawl.allow_private_addresses=true",
        "--set",
        "crawl.retry_backoff_s=0.05",
    ]
    result = run_llmflow(args, prefect_api, returncode=1, timeout=300)
    output = result.stdout + result.stderr

    assert output.count("Traceback") == 0, output[-4000:]
    assert requested and set(requested) == {"/robots.txt"}  # retried, nothing else asked for
    # the table of the stages that ran: the crawl, and nothing after it
    assert "llmflow pipeline" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert [row.split("│")[1].strip() for row in rows] == ["crawl"], result.stdout
    robots_url = f"{url}robots.txt"
    stopped = [line for line in result.stdout.splitlines() if line.startswith("Stopped after")]
    assert len(stopped) == 1, result.stdout
    assert stopped[0].startswith("Stopped after crawl: it kept no documents (fetch failures:")
    assert f"robots_unreachable 1 — robots.txt at {robots_url} answered 500" in stopped[0]
    data = workdir / "data"
    assert not (data / "tokenizer").exists()
    assert not (data / "documents" / "v0001" / "normalize").exists()
    assert not (data / "documents" / "manifest.json").exists()  # no empty version published

    # MLflow's parent run ended, and says why it stopped
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    assert experiment is not None
    (parent,) = client.search_runs(
        [experiment.experiment_id], "tags.`llmflow.stopped` != ''", max_results=5
    )
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["llmflow.stopped"] == stopped[0]


# The train flow run on its own, in a process of its own (as a deployment runs it), so that what
# it writes to the terminal is all there is to read: its final state as the last line, in JSON.
TRAIN_ALONE = """
import json, sys
from llmflow.flows.config import load_config
from llmflow.flows.pipeline import train
state = train(config=load_config(workdir=sys.argv[1]), return_state=True)
result = state.result(raise_on_failure=False)
print(json.dumps({"failed": state.is_failed(), "message": state.message, "result": result}))
"""


@pytest.mark.server
@pytest.mark.parametrize("documents", ["unpublished", "empty"])
def test_the_train_flow_on_no_documents_fails_with_one_clear_error(
    documents: str, prefect_api: str, tmp_path: Path
) -> None:
    """The train phase run on its own (the ``train`` deployment) with no documents to learn
    from: its flow run ends Failed with one message naming the stage and the cause, nothing
    raised, no traceback; the tokenizer never starts."""
    workdir = tmp_path / "work"
    documents_dir = workdir / "data" / "documents"
    if documents == "empty":  # what a run before this check published from an empty crawl
        documents_dir.mkdir(parents=True)
        pointer = {"stage": "documents", "version": 1, "shards": [], "counts": {"kept": 0}}
        (documents_dir / "manifest.json").write_text(json.dumps(pointer))
    process = subprocess.run(
        [sys.executable, "-c", TRAIN_ALONE, str(workdir)],
        env=llmflow_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-4000:]
    assert "Traceback" not in output, output[-4000:]
    outcome = json.loads(process.stdout.splitlines()[-1])

    assert outcome["failed"]
    cause = (
        f"the documents version v0001 in {documents_dir} holds no documents"
        if documents == "empty"
        else f"no documents version is published in {documents_dir}"
    )
    assert outcome["message"].startswith(f"Stopped before tokenizer: {cause}"), outcome
    result = outcome["result"]
    assert result["stopped"]["stage"] == "tokenizer" and result["stages"] == []
    assert not (workdir / "data" / "tokenizer").exists()
    parent = MlflowClient(tracking_uri=result["mlflow_tracking_uri"]).get_run(
        result["mlflow_run_id"]
    )
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["llmflow.stopped"] == outcome["message"]
