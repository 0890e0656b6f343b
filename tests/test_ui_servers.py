"""``llmflow ui``: real Prefect and MLflow servers over a workdir, started and stopped by pid.

The command is run as ``python -m llmflow.flows.ui_servers`` (the same function ``llmflow ui``
calls), so these tests hold whether or not the CLI has registered it yet.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, free_port

from llmflow.flows.ui_servers import mlflow_server, prefect_server

URL_LINE = re.compile(r"^(Prefect|MLflow) UI:\s+(http://\S+)\s+\(server pid (\d+)\)")
START_LINE = re.compile(r"^Starting (Prefect|MLflow) server \(pid (\d+)\)")


def _launch(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "llmflow.flows.ui_servers", "--workdir", str(workdir), *args],
        cwd=REPO,
        env=env or dict(os.environ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def _reader(process: subprocess.Popen[str]) -> queue.Queue[str | None]:
    """Lines of the command's output as they come; None once it closes its output."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _gone(pid: int) -> bool:
    """No process (or process group member) with this id is left."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
    return False


def _kill_leftovers(process: subprocess.Popen[str], pids: set[int]) -> None:
    """After a failed assertion: stop whatever the test started, by pid, never by name."""
    for pid in {process.pid, *pids}:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    process.wait(timeout=30)


def read_urls(
    lines: queue.Queue[str | None],
    urls: dict[str, str],
    pids: dict[str, int],
    output: list[str],
    timeout: float,
) -> None:
    """Read ``llmflow ui``'s output until both servers' URLs are printed, filling ``urls`` and
    ``pids`` as they come (so the caller's cleanup knows what started, even on a failure)."""
    deadline = time.monotonic() + timeout
    while len(urls) < 2:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "command ended early:\n" + "\n".join(output)
        output.append(line)
        if match := URL_LINE.match(line):
            urls[match[1]] = match[2]
            pids[match[1]] = int(match[3])


def test_ui_serves_the_workdirs_stores_and_stops_both_on_sigint(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    # A run logged the way `llmflow run` logs one: SQLite store, artifacts in <workdir>/mlartifacts.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment(
        "ui-test-experiment", artifact_location=(tmp_path / "mlartifacts").as_uri()
    )
    run_id = client.create_run(experiment_id).info.run_id
    client.log_text(run_id, "hello from the workdir\n", "notes/hello.txt")

    prefect_port, mlflow_port = free_port(), free_port()
    process = _launch(
        tmp_path, "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port)
    )
    lines = _reader(process)
    urls: dict[str, str] = {}
    pids: dict[str, int] = {}
    output: list[str] = []
    try:
        read_urls(lines, urls, pids, output, 120)
        assert urls == {
            "Prefect": f"http://127.0.0.1:{prefect_port}",
            "MLflow": f"http://127.0.0.1:{mlflow_port}",
        }

        with httpx.Client(trust_env=False, timeout=10) as http:
            assert http.get(f"{urls['Prefect']}/api/health").status_code == 200
            # The Prefect server opened the workdir's database, as `llmflow run` would.
            assert (tmp_path / "prefect" / "prefect.db").exists()

            found = http.get(
                f"{urls['MLflow']}/api/2.0/mlflow/experiments/search",
                params={"max_results": 10},
            )
            assert found.status_code == 200, found.text
            names = {e["name"] for e in found.json()["experiments"]}
            assert "ui-test-experiment" in names, names

            # The run's artifact (a file:// URI in the workdir) is readable through the server.
            artifact = http.get(
                f"{urls['MLflow']}/get-artifact",
                params={"path": "notes/hello.txt", "run_uuid": run_id},
            )
            assert artifact.status_code == 200, artifact.text
            assert artifact.text == "hello from the workdir\n"

        assert (tmp_path / "logs" / "prefect-server.log").stat().st_size > 0
        assert (tmp_path / "logs" / "mlflow-server.log").stat().st_size > 0

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        while (line := lines.get(timeout=5)) is not None:
            output.append(line)
        assert "Stopping both servers." in output
        for name, pid in pids.items():
            assert _gone(pid), f"{name} server pid {pid} (or its group) is still running"
    finally:
        if process.poll() is None or not all(_gone(pid) for pid in pids.values()):
            _kill_leftovers(process, set(pids.values()))


def test_a_server_that_dies_at_start_is_named_and_the_other_is_stopped(tmp_path: Path) -> None:
    # An MLflow store URI no server can open: MLflow exits at start; Prefect must be stopped too.
    env = dict(os.environ, MLFLOW_TRACKING_URI="nosuchdb://nowhere/x")
    process = _launch(tmp_path, env=env)
    try:
        out, _ = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            _kill_leftovers(process, set())
    started = {m[1]: int(m[2]) for line in out.splitlines() if (m := START_LINE.match(line))}
    try:
        assert process.returncode == 1, out
        assert "Error: MLflow server (" in out, out
        assert "nosuchdb://nowhere/x" in out  # the command, then the tail of its log
        assert f"last lines of {tmp_path / 'logs' / 'mlflow-server.log'}" in out
        assert set(started) == {"Prefect", "MLflow"}
        for name, pid in started.items():
            assert _gone(pid), f"{name} server pid {pid} (or its group) is still running"
    finally:
        for pid in started.values():
            if not _gone(pid):
                os.killpg(pid, signal.SIGKILL)


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = _launch(tmp_path, "--mlflow-port", str(port))
        out, _ = process.communicate(timeout=60)
    assert process.returncode == 2, out
    assert f"--mlflow-port {port}: 127.0.0.1:{port} is not free" in out
    assert "Starting" not in out
    assert not (tmp_path / "logs").exists()


def _options(command: list[str]) -> dict[str, str]:
    """``[tool, "server", "--a", "1", "--b", "2"]`` -> ``{"--a": "1", "--b": "2"}``."""
    return dict(zip(command[2::2], command[3::2], strict=True))


def test_commands_point_at_the_workdirs_stores(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")

    prefect = prefect_server(tmp_path, 4321)
    assert prefect.command[-5:] == ["start", "--host", "127.0.0.1", "--port", "4321"]
    assert prefect.env["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert "PREFECT_API_URL" not in prefect.env  # the UI must query this server, not elsewhere
    assert prefect.env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"

    mlflow = mlflow_server(tmp_path, 5432)
    args = _options(mlflow.command)
    assert args["--backend-store-uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert args["--artifacts-destination"] == str(tmp_path / "mlartifacts")
    assert (args["--host"], args["--port"]) == ("127.0.0.1", "5432")

    # An HTTP tracking server is not a store a server can open: fall back to the workdir's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    args = _options(mlflow_server(tmp_path, 5432).command)
    assert args["--backend-store-uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
