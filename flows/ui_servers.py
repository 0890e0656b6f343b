"""``llmflow ui``: the Prefect and MLflow UIs over one workdir's stores, started and stopped as one.

``llmflow run`` keeps Prefect's database in ``<workdir>/prefect`` and MLflow's in
``<workdir>/mlflow.db`` (artifacts in ``<workdir>/mlartifacts``). Looking at a run then needs two
servers, each with the right store flags and environment; getting one wrong starts a server on an
empty store that looks fine and shows nothing. This module starts both on 127.0.0.1, waits until
each answers its health endpoint, prints both URLs, and stops both when the user presses Ctrl-C
or when either one dies, so no orphaned server keeps a port.

Both servers answer only what they should (a web page the user visits can reach 127.0.0.1 too,
and so can any local process): Prefect's API requires its basic-auth string (a random one made
once per Prefect home and kept in a 0600 file there, or the user's own
$PREFECT_SERVER_API_AUTH_STRING) and allows cross-origin requests only from its own UI's
origin; MLflow's security middleware accepts only its own Host header (no DNS rebinding) and
its own origin. The secret is never printed: the command prints where it is and how a worker,
``llmflow serve`` or ``llmflow run`` uses it (terminal scroll-back and redirected logs outlive
the session; a file with 0600 permissions is where tools such as Jupyter and Docker keep theirs).

Each server runs in its own session (process group): Prefect's and MLflow's servers fork uvicorn
workers and job runners, and only signalling the whole group reliably stops those too. Being in
their own sessions also keeps a terminal's Ctrl-C from reaching them directly, so the shutdown
order stays ours.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Annotated

import typer

HOST = "127.0.0.1"
# Every command's --workdir default as its help shows it: relative to where the command runs.
WORKDIR_DEFAULT = "./llmflow-work"
# Prefect's server needs 15-30 s on a small shared machine (../shared/STACK.md); leave room.
STARTUP_TIMEOUT_S = 180.0
STOP_GRACE_S = 15.0
_LOG_TAIL_CHARS = 3000
_POLL_S = 0.5


class UIServerError(RuntimeError):
    """A server did not come up or died: the message names it, its command and its log's tail."""


@dataclass
class Server:
    """One child server: how to start it, where it logs, and where it answers."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    url: str
    health_url: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _log: IO[bytes] | None = field(default=None, repr=False)

    def describe(self) -> str:
        return f"{self.name} server ({shlex.join(self.command)})"

    def log_tail(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = text[-_LOG_TAIL_CHARS:].strip()
        return tail or "(log is empty)"


def _tool(name: str) -> str:
    """The console script installed beside this interpreter, so the servers match this venv."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise UIServerError(
            f"the {name!r} command is not installed (looked beside {sys.executable})"
        )
    return found


def prefect_home(workdir: Path) -> Path:
    """The Prefect home ``llmflow run`` uses: $PREFECT_HOME if set, else ``<workdir>/prefect``."""
    return Path(os.environ.get("PREFECT_HOME") or workdir / "prefect").absolute()


def experiment_pages(store: str, mlflow_url: str) -> list[str]:
    """``<name>: <address>`` of each experiment in a SQLite store, in MLflow's model-training
    view: MLflow 3's UI opens an experiment on its GenAI overview unless the address asks for
    runs (:func:`~llmflow.flows.tracking.mlflow_page`). Read with sqlite3, read-only, beside
    the server that has it open."""
    import sqlite3

    from llmflow.flows.tracking import mlflow_page

    path = store.removeprefix("sqlite:///")
    if not store.startswith("sqlite:///") or not Path(path).exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            rows = db.execute(
                "SELECT experiment_id, name FROM experiments"
                " WHERE lifecycle_stage = 'active' ORDER BY experiment_id"
            ).fetchall()
    except sqlite3.Error:
        return []
    return [f"{name}: {mlflow_page(mlflow_url, str(i))}" for i, name in rows if name != "Default"]


def mlflow_backend_store(workdir: Path) -> str:
    """The store ``llmflow run`` logs to, when it is one a server can open; else the workdir's."""
    from llmflow.flows.tracking import default_tracking_uri, resolve_tracking_uri

    uri = resolve_tracking_uri(None, str(workdir))
    if uri.split(":", 1)[0] in ("http", "https", "databricks"):
        return default_tracking_uri(str(workdir))
    return uri


# Prefect's settings (prefect/settings/models/server/api.py, models/api.py in Prefect 3.8).
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"  # the server's basic auth, "user:password"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"  # what a client (worker, runner, flow run) sends
CORS_ORIGINS_ENV = "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS"  # comma-separated; default "*"
AUTH_FILE_NAME = "api-auth-string"
AUTH_USER = "llmflow"


def auth_file(workdir: Path) -> Path:
    """Where the Prefect API's auth string is kept: beside the database it protects."""
    return prefect_home(workdir) / AUTH_FILE_NAME


def api_auth_string(workdir: Path) -> tuple[str, Path | None]:
    """The auth string the Prefect server requires, and the file it is in (None: the user's own
    $PREFECT_SERVER_API_AUTH_STRING).

    Made once per Prefect home (``llmflow:`` and 32 random bytes, URL-safe), written with 0600
    permissions before any byte of it, and reused on every later start so the workers' and the
    browser's saved logins keep working. A file others may read is refused, as ssh refuses such
    a key: the secret may already be out.
    """
    own = os.environ.get(SERVER_AUTH_ENV)
    if own:
        return own, None
    path = auth_file(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{AUTH_USER}:{secrets.token_urlsafe(32)}\n")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UIServerError(
            f"{path} holds the Prefect API's password but others may read it (mode {mode:04o});"
            f" make it private (chmod 600 {shlex.quote(str(path))}) or delete it for a new one"
        )
    secret = path.read_text().strip()
    if ":" not in secret:
        raise UIServerError(
            f"{path}: expected the Prefect API's auth string as user:password; delete it for a"
            " new one"
        )
    return secret, path


def prefect_server(workdir: Path, port: int, auth_string: str | None = None) -> Server:
    """``prefect server start`` on the same database ``llmflow run`` writes to, its API behind
    ``auth_string`` (None: the workdir's, see :func:`api_auth_string`) and open cross-origin
    only to its own UI."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(prefect_home(workdir))
    # A PREFECT_API_URL pointing elsewhere would make this server's UI query that other API.
    env.pop("PREFECT_API_URL", None)
    url = f"http://{HOST}:{port}"
    env["PREFECT_UI_API_URL"] = f"{url}/api"
    env[SERVER_AUTH_ENV] = auth_string if auth_string is not None else api_auth_string(workdir)[0]
    env[CORS_ORIGINS_ENV] = url
    # Telemetry races the first database migration on SQLite (see flows/cli.py); offline anyway.
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    command = [_tool("prefect"), "server", "start", "--host", HOST, "--port", str(port)]
    return Server(
        name="Prefect",
        command=command,
        env=env,
        log_path=workdir / "logs" / "prefect-server.log",
        url=url,
        health_url=f"{url}/api/health",
    )


def mlflow_server(workdir: Path, port: int) -> Server:
    """``mlflow server`` on the workdir's store, serving the artifacts in ``<workdir>/mlartifacts``.

    Runs logged by ``llmflow run`` carry ``file://<workdir>/mlartifacts/...`` artifact URIs, which
    the server reads directly; ``--artifacts-destination`` puts artifacts of experiments created
    through this server in the same folder. ``--allowed-hosts`` and ``--cors-allowed-origins``
    narrow MLflow's security middleware from its defaults (any private-network Host header) to
    this server's own address. MLflow lets state-changing requests from any localhost origin
    through whatever these say (mlflow/server/security_utils.py), and has no login here.
    """
    env = dict(os.environ)
    # Without this the server also starts several job-runner processes nobody here uses.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    command = [
        _tool("mlflow"),
        "server",
        "--backend-store-uri",
        mlflow_backend_store(workdir),
        "--artifacts-destination",
        str(workdir / "mlartifacts"),
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--allowed-hosts",
        f"{HOST}:{port},localhost:{port}",
        "--cors-allowed-origins",
        f"http://{HOST}:{port}",
    ]
    return Server(
        name="MLflow",
        command=command,
        env=env,
        log_path=workdir / "logs" / "mlflow-server.log",
        url=f"http://{HOST}:{port}",
        health_url=f"http://{HOST}:{port}/health",
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _check_port_free(port: int, option: str) -> None:
    """A taken port otherwise shows up only as a bind error deep in a server's log."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as error:
            raise UIServerError(f"{option} {port}: {HOST}:{port} is not free ({error})") from None


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent dies (prctl
    PR_SET_PDEATHSIG), so a server started for one run cannot outlive a SIGKILLed run."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def start(server: Server, die_with_parent: bool = False) -> None:
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    server._log = open(server.log_path, "wb")  # noqa: SIM115 - closed in stop_all
    server.process = subprocess.Popen(
        server.command,
        env=server.env,
        stdout=server._log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=_die_with_parent if die_with_parent else None,  # noqa: PLW1509
    )


def _answers(url: str) -> bool:
    # imported here: `llmflow --help` imports this module for its `ui` command
    import httpx

    try:
        with httpx.Client(trust_env=False, timeout=2) as client:
            return client.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def _died(server: Server) -> UIServerError:
    assert server.process is not None
    return UIServerError(
        f"{server.describe()} exited with code {server.process.returncode};"
        f" last lines of {server.log_path}:\n{server.log_tail()}"
    )


def wait_healthy(servers: list[Server], timeout_s: float, stop: threading.Event) -> bool:
    """Wait until every server answers its health URL; False if ``stop`` was set first."""
    pending = list(servers)
    deadline = time.monotonic() + timeout_s
    while pending:
        for server in list(pending):
            assert server.process is not None
            if server.process.poll() is not None:
                raise _died(server)
            if _answers(server.health_url):
                pending.remove(server)
        if not pending:
            return True
        if time.monotonic() > deadline:
            server = pending[0]
            raise UIServerError(
                f"{server.describe()} did not answer {server.health_url} within {timeout_s:.0f} s;"
                f" last lines of {server.log_path}:\n{server.log_tail()}"
            )
        if stop.wait(_POLL_S):
            return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a pgid reused by someone else's process: not ours any more
        return False
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_all(servers: list[Server], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM every server's process group, wait up to ``grace_s``, then SIGKILL what is left.

    Both groups are signalled before waiting on either, so stopping takes one grace period, not two.
    """
    started = [s for s in servers if s.process is not None]
    for server in started:
        assert server.process is not None
        _signal_group(server.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for server in started:
        assert server.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.process.wait(timeout=max(0.0, deadline - time.monotonic()))
        # Workers the leader forked may outlive it for a moment.
        while _group_alive(server.process.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    for server in started:
        assert server.process is not None
        if server.process.poll() is None or _group_alive(server.process.pid):
            _signal_group(server.process.pid, signal.SIGKILL)
            server.process.wait()
        if server._log is not None:
            server._log.close()


def _say(message: str, *, err: bool = False) -> None:
    print(message, file=sys.stderr if err else sys.stdout, flush=True)


def login_help(prefect_url: str, auth_path: Path | None) -> str:
    """How to log in to the Prefect UI and point a client at its API, naming where the auth string
    is but never printing it."""
    if auth_path is None:
        where = f"your ${SERVER_AUTH_ENV}"
        value = f'"${SERVER_AUTH_ENV}"'
    else:
        where = f"the file {auth_path} (mode 600)"
        value = f'"$(cat {shlex.quote(str(auth_path))})"'
    return "\n".join(
        [
            f"Prefect's API asks for its auth string, kept in {where}: the Prefect UI's login"
            " takes it as the password (user:password).",
            "Workers, `llmflow serve` and `llmflow run` reach this server with:",
            f"  export PREFECT_API_URL={prefect_url}/api",
            f"  export {CLIENT_AUTH_ENV}={value}",
        ]
    )


def serve_ui(
    workdir: Path,
    prefect_port: int | None = None,
    mlflow_port: int | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> int:
    """Run both servers until SIGINT/SIGTERM (exit code 0) or until one fails (exit code 1)."""
    workdir = workdir.absolute()
    try:
        for port, option in ((prefect_port, "--prefect-port"), (mlflow_port, "--mlflow-port")):
            if port is not None:
                _check_port_free(port, option)
        auth_string, auth_path = api_auth_string(workdir)
        servers = [
            prefect_server(workdir, prefect_port or _free_port(), auth_string),
            mlflow_server(workdir, mlflow_port or _free_port()),
        ]
    except UIServerError as error:
        _say(f"Error: {error}", err=True)
        return 2

    home = prefect_home(workdir)
    if not (home / "prefect.db").exists():
        _say(
            f"Note: no Prefect database at {home / 'prefect.db'} yet: the Prefect UI starts empty."
        )
    if os.environ.get("PREFECT_API_URL"):
        _say(
            f"Note: PREFECT_API_URL is set, so `llmflow run` sends flow runs to"
            f" {os.environ['PREFECT_API_URL']}, not to this server's database."
        )
    store = mlflow_backend_store(workdir)
    if store.startswith("sqlite:///") and not Path(store.removeprefix("sqlite:///")).exists():
        _say(f"Note: no MLflow store at {store} yet: the MLflow UI starts empty.")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for server in servers:
            start(server)
            assert server.process is not None
            _say(
                f"Starting {server.name} server (pid {server.process.pid}), log: {server.log_path}"
            )
        if not wait_healthy(servers, startup_timeout_s, stop):
            _say("Interrupted during start-up; stopping both servers.")
            return 0
        for server in servers:
            assert server.process is not None
            label = f"{server.name} UI:"
            _say(f"{label:<12} {server.url}  (server pid {server.process.pid})")
        experiments = experiment_pages(store, servers[1].url)
        if experiments:
            _say("MLflow experiments (their runs tables):")
            for line in experiments:
                _say(f"  {line}")
        _say(login_help(servers[0].url, auth_path))
        _say("Press Ctrl-C to stop both servers.")
        while not stop.wait(_POLL_S):
            for server in servers:
                assert server.process is not None
                if server.process.poll() is not None:
                    raise _died(server)
        _say("Stopping both servers.")
        return 0
    except UIServerError as error:
        _say(f"Error: {error}", err=True)
        return 1
    finally:
        stop_all(servers)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ui(
    workdir: Annotated[
        str,
        typer.Option(help="The workdir of `llmflow run`: its Prefect database and MLflow store."),
    ] = WORKDIR_DEFAULT,
    prefect_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port of the Prefect UI (default: a free one)."),
    ] = None,
    mlflow_port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="Port of the MLflow UI (default: a free one)."),
    ] = None,
) -> None:
    """Start the Prefect and MLflow UIs on the workdir's stores; Ctrl-C stops both."""
    code = serve_ui(Path(workdir), prefect_port, mlflow_port)
    if code:
        raise typer.Exit(code=code)


if __name__ == "__main__":
    typer.run(ui)
