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
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO, free_port

from llmflow.flows.ui_servers import (
    SERVER_AUTH_ENV,
    UIServerError,
    api_auth_string,
    experiment_pages,
    mlflow_server,
    prefect_server,
)

URL_LINE = re.compile(r"^(Prefect|MLflow) UI:\s+(http://\S+)\s+\(server pid (\d+)\)")
START_LINE = re.compile(r"^Starting (Prefect|MLflow) server \(pid (\d+)\)")


def _launch(workdir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = dict(os.environ) if env is None else env
    env.pop(SERVER_AUTH_ENV, None)  # the workdir's own secret, made by the command
    return subprocess.Popen(
        [sys.executable, "-m", "llmflow.flows.ui_servers", "--workdir", str(workdir), *args],
        cwd=REPO,
        env=env,
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


@pytest.mark.server
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

        while output[-1] != "Press Ctrl-C to stop both servers.":  # the login help comes first
            line = lines.get(timeout=30)
            assert line is not None, "command ended early:\n" + "\n".join(output)
            output.append(line)
        secret_file = tmp_path / "prefect" / "api-auth-string"
        secret = secret_file.read_text().strip()
        assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        login = "\n".join(output)
        assert secret.split(":", 1)[1] not in login  # where it is, never what it is
        assert f"kept in the file {secret_file} (mode 600)" in login
        assert f"export PREFECT_API_URL={urls['Prefect']}/api" in login
        assert f'export PREFECT_API_AUTH_STRING="$(cat {secret_file})"' in login

        api = f"{urls['Prefect']}/api"
        with httpx.Client(trust_env=False, timeout=10) as http:
            assert http.get(f"{api}/health").status_code == 200  # probes need no login
            # The Prefect server opened the workdir's database, as `llmflow run` would.
            assert (tmp_path / "prefect" / "prefect.db").exists()
            # No auth string, or a wrong one: 401; the right one: the API answers.
            filters = "/deployments/filter"
            guess = ("llmflow", "guess")
            assert http.post(f"{api}{filters}", json={}).status_code == 401
            assert http.post(f"{api}{filters}", json={}, auth=guess).status_code == 401
            user, password = secret.split(":", 1)
            assert http.post(f"{api}{filters}", json={}, auth=(user, password)).status_code == 200
            # Cross-origin: a page elsewhere gets no CORS grant, its preflight is refused;
            # the UI's own origin is granted.
            evil = {"Origin": "http://evil.example"}
            answer = http.post(f"{api}{filters}", json={}, headers=evil, auth=(user, password))
            assert "access-control-allow-origin" not in answer.headers, answer.headers
            preflight = {
                **evil,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            }
            answer = http.options(f"{api}{filters}", headers=preflight)
            assert answer.status_code == 400, (answer.status_code, answer.headers)
            assert "access-control-allow-origin" not in answer.headers, answer.headers
            own = dict(preflight, Origin=urls["Prefect"])
            answer = http.options(f"{api}{filters}", headers=own)
            assert answer.status_code == 200, answer.text
            assert answer.headers["access-control-allow-origin"] == urls["Prefect"]

            # MLflow: a state-changing request from another origin is refused, a read gets no
            # CORS grant, and a Host header other than its own (DNS rebinding) is refused.
            create = f"{urls['MLflow']}/api/2.0/mlflow/experiments/create"
            answer = http.post(create, json={"name": "from-evil"}, headers=evil)
            assert answer.status_code == 403, answer.text
            search = f"{urls['MLflow']}/api/2.0/mlflow/experiments/search"
            answer = http.get(search, params={"max_results": 10}, headers=evil)
            assert "access-control-allow-origin" not in answer.headers, answer.headers
            rebound = http.get(
                search, params={"max_results": 10}, headers={"Host": f"evil.example:{mlflow_port}"}
            )
            assert rebound.status_code == 403, rebound.text

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


@pytest.mark.server
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
    for name in ("PREFECT_HOME", "MLFLOW_TRACKING_URI", SERVER_AUTH_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere:4200/api")

    prefect = prefect_server(tmp_path, 4321)
    assert prefect.command[-5:] == ["start", "--host", "127.0.0.1", "--port", "4321"]
    assert prefect.env["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert "PREFECT_API_URL" not in prefect.env  # the UI must query this server, not elsewhere
    assert prefect.env["PREFECT_UI_API_URL"] == "http://127.0.0.1:4321/api"
    assert prefect.env["PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"] == "http://127.0.0.1:4321"
    assert prefect.env[SERVER_AUTH_ENV] == api_auth_string(tmp_path)[0]

    mlflow = mlflow_server(tmp_path, 5432)
    args = _options(mlflow.command)
    assert args["--backend-store-uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert args["--artifacts-destination"] == str(tmp_path / "mlartifacts")
    assert (args["--host"], args["--port"]) == ("127.0.0.1", "5432")
    assert args["--allowed-hosts"] == "127.0.0.1:5432,localhost:5432"
    assert args["--cors-allowed-origins"] == "http://127.0.0.1:5432"

    # An HTTP tracking server is not a store a server can open: fall back to the workdir's.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking.example:5000")
    args = _options(mlflow_server(tmp_path, 5432).command)
    assert args["--backend-store-uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_the_api_secret_is_made_once_private_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("PREFECT_HOME", SERVER_AUTH_ENV):
        monkeypatch.delenv(name, raising=False)
    secret, path = api_auth_string(tmp_path)
    assert path == tmp_path / "prefect" / "api-auth-string"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    user, password = secret.split(":", 1)
    assert user == "llmflow" and len(password) >= 40
    assert api_auth_string(tmp_path) == (secret, path)  # the next start: the same login
    assert prefect_server(tmp_path, 4321).env[SERVER_AUTH_ENV] == secret

    # Readable by others: refused, as ssh refuses such a key, with the fix in the message.
    path.chmod(0o644)
    with pytest.raises(UIServerError, match=r"others may read it \(mode 0644\).*chmod 600"):
        api_auth_string(tmp_path)

    # The user's own string wins, and no file is needed.
    monkeypatch.setenv(SERVER_AUTH_ENV, "me:my-own-secret")
    assert api_auth_string(tmp_path / "other") == ("me:my-own-secret", None)
    assert not (tmp_path / "other").exists()


def test_experiment_pages_open_the_runs_table_of_each_experiment(tmp_path: Path) -> None:
    """`llmflow ui` prints each experiment's page in MLflow's model-training view: MLflow 3
    opens an experiment on its GenAI overview unless the address asks for the runs."""
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert experiment_pages(store, "http://127.0.0.1:5001") == []  # no store yet: nothing
    client = MlflowClient(tracking_uri=store)
    ours = client.create_experiment("llmflow")
    gone = client.create_experiment("old")
    client.delete_experiment(gone)
    assert experiment_pages(store, "http://127.0.0.1:5001/") == [
        f"llmflow: http://127.0.0.1:5001/#/experiments/{ours}?workflowType=machine_learning"
    ]
