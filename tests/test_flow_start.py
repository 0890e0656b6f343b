"""A run's start survives a busy or slow Prefect API, and bookkeeping left by a killed run."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from llmflow.flows.tracking import DATA_ROOT_TAG, PipelineTracker, link_flow_run


class _Busy(BaseHTTPRequestHandler):
    """Answers every request 503, as a Prefect API whose SQLite database is locked does."""

    requests: list[str] = []

    def _busy(self) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_PATCH = do_POST = _busy

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def busy_api() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Busy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Busy.requests = []
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()


def test_a_busy_api_at_flow_start_is_retried_then_warned_not_fatal(
    busy_api: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tracker = PipelineTracker(f"sqlite:///{tmp_path}/mlflow.db", "e", str(tmp_path))
    run_id = tracker.start_parent("p", tags={}, params={})
    with temporary_settings({PREFECT_API_URL: busy_api, PREFECT_CLIENT_MAX_RETRIES: 0}):
        assert link_flow_run(tracker, run_id, attempts=2) is False
    assert len(_Busy.requests) == 2, _Busy.requests  # tried again before giving up
    assert "could not label the flow run" in caplog.text and "the run goes on" in caplog.text


def test_runs_a_killed_run_left_running_are_marked_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    dead = PipelineTracker(uri, "e", str(tmp_path), data_root="/data/a")
    parent = dead.start_parent("dead", tags={}, params={})
    child = dead.start_child("normalize", params={}, tags={})
    other = PipelineTracker(uri, "e", str(tmp_path), data_root="/data/b")
    elsewhere = other.start_parent("another root, still running", tags={}, params={})

    again = PipelineTracker(uri, "e", str(tmp_path), data_root="/data/a")
    assert sorted(again.close_abandoned_runs()) == sorted([parent, child])
    client = MlflowClient(uri)
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(child).info.status == "KILLED"
    assert client.get_run(elsewhere).info.status == "RUNNING"
    assert client.get_run(child).data.tags[DATA_ROOT_TAG] == "/data/a"
    assert again.close_abandoned_runs() == []


def test_params_logged_at_start_hold_no_credentials(tmp_path: Path) -> None:
    from llmflow.flows.config import load_config
    from llmflow.flows.tracking import flatten

    config = load_config(
        overrides=[
            'crawl.seeds=["http://alice:s3cret@127.0.0.1:8000/docs/", "/data/files"]',
            "mlflow_tracking_uri=http://bob:hunter2@127.0.0.1:5000",
        ],
        workdir=str(tmp_path),
    )
    params = flatten(config.model_dump(mode="json"))
    text = repr(params)
    assert "s3cret" not in text and "hunter2" not in text and "alice" not in text
    assert params["crawl.seeds"] == "['http://127.0.0.1:8000/docs/', '/data/files']"
    assert params["mlflow_tracking_uri"] == "http://127.0.0.1:5000"
