"""``llmflow run`` with no Prefect API of the user's: a server of its own that may start slowly
and never outlives the run (no PREFECT_API_URL here, unlike the other run tests)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import LLMFLOW
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

pytestmark = pytest.mark.server  # a Prefect server and `llmflow run`

# Imported by every Python process started with this folder on PYTHONPATH: a Prefect API server
# process (`prefect server start`, or Prefect's own temporary one, uvicorn on its app factory)
# sleeps before it starts, as on a loaded machine.
SLOW_START = """
import os, sys, time
server = sys.orig_argv[2:4] == ["server", "start"]
server = server or "prefect.server.api.server:create_app" in sys.orig_argv
if os.environ.get("SLOW_PREFECT_START") and server:
    time.sleep(float(os.environ["SLOW_PREFECT_START"]))
"""


def _env(tmp_path: Path, slow_s: float) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SLOW_START)
    env = dict(os.environ, PYTHONPATH=str(hooks), SLOW_PREFECT_START=str(slow_s), COLUMNS="200")
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def _args(tmp_path: Path) -> list[str]:
    seeds = tmp_path / "seeds"
    seeds.mkdir(exist_ok=True)
    (seeds / "a.txt").write_text("A short document about foxes and dogs in the field.\n")
    return [
        "run",
        "--workdir",
        str(tmp_path / "work"),
        "--stages",
        "crawl",
        "--set",
        f'crawl.seeds=["{seeds}"]',
    ]


def test_a_server_slower_than_prefects_20_s_default_is_waited_for(tmp_path: Path) -> None:
    result = subprocess.run(
        [LLMFLOW, *_args(tmp_path)],
        env=_env(tmp_path, slow_s=25),
        capture_output=True,
        text=True,
        timeout=900,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ready = re.search(r"Prefect API ready after (\d+) s", result.stderr)
    assert ready and int(ready.group(1)) >= 25, result.stderr[-4000:]
    assert "crawl: " in result.stdout
    assert (tmp_path / "work" / "prefect" / "prefect.db").exists()  # the workdir's database
    assert "Error logging to API" not in result.stderr  # logs were sent before it stopped
    # The MLflow run names the flow run, but links no page of a server that has no UI and is
    # gone now (Prefect's own ui_url would name it).
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    (parent,) = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if MLFLOW_PARENT_RUN_ID not in r.data.tags
    ]
    assert parent.data.tags["prefect.flow_run_id"]
    assert "prefect.flow_run_url" not in parent.data.tags, parent.data.tags


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead, only not yet reaped
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def test_the_server_stops_when_its_run_is_killed(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        run = subprocess.Popen(
            [LLMFLOW, *_args(tmp_path)],
            env=_env(tmp_path, slow_s=0),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 600
        while "Prefect API ready" not in log.read_text():
            assert run.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the server never came up"
            time.sleep(0.2)
        server = int(re.search(r"API server for this run \(pid (\d+)", log.read_text()).group(1))
        assert _alive(server)
        os.kill(run.pid, signal.SIGKILL)  # the run only: nothing of ours stops the server
        run.wait()
        deadline = time.monotonic() + 30
        while _alive(server):
            assert time.monotonic() < deadline, f"server {server} outlived its killed run"
            time.sleep(0.2)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
