"""Fixtures shared by the test modules: real data beside the repo, and servers started by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
LLMFLOW = str(Path(sys.executable).parent / "llmflow")


def llmflow_env(prefect_api: str, **extra: str) -> dict[str, str]:
    """The environment an ``llmflow`` command runs in under test: the session's Prefect server,
    and MLflow on the workdir's own store (never a tracking URI set outside the test)."""
    env = dict(os.environ, PREFECT_API_URL=prefect_api, **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_llmflow(
    args: list[str],
    prefect_api: str,
    *,
    cwd: Path | None = None,
    returncode: int = 0,
    timeout: float = 600,
    command: str = "run",
) -> subprocess.CompletedProcess:
    """``llmflow COMMAND ARGS`` (``run`` by default) to the end, output captured; fails the
    test unless it exits with ``returncode`` (wide COLUMNS, so Rich does not wrap the lines
    tests search)."""
    result = subprocess.run(
        [LLMFLOW, command, *args],
        env=llmflow_env(prefect_api, COLUMNS="200"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    output = f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    assert result.returncode == returncode, f"exit {result.returncode}\n{output}"
    return result


def shared_data_dir() -> Path:
    """../shared/data beside the repo (LLMFLOW_SHARED_DATA overrides); may be absent."""
    return Path(os.environ.get("LLMFLOW_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path}")
    return path


def free_port() -> int:
    from llmflow.tasks.ingest.pydoc_site import free_port as _free_port

    return _free_port()


def stop_process(process: subprocess.Popen) -> None:
    """Stop a server we started, by its process group, and reap it."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the whole test session, on a free localhost port.

    Its database lives in a temporary PREFECT_HOME. Tests that run flows pass its URL to the
    ``llmflow`` command as PREFECT_API_URL.
    """
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - closed after the server stops
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(
                    f"prefect server did not start: {(home / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        stop_process(process)
        log.close()
