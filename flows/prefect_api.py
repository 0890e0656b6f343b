"""The Prefect API a ``llmflow run`` talks to when the user names none: a temporary server of ours.

Prefect would start its own temporary server, but two things about it broke runs on a busy
machine: how long it waits for that server is read from the environment when ``prefect`` is first
imported (before the command line could raise it), so a start-up slower than 20 s failed the run;
and a run killed with SIGKILL left the server running with nobody to stop it. This one is the
same ``prefect server start`` that ``llmflow ui`` runs, on the workdir's database, behind the same
auth string and CORS limit, without the UI:
it gets a start-up timeout we choose, its log in ``<workdir>/logs``, and it is told by the kernel
to stop when the process that started it dies (Linux), so it never outlives its run.

Its clients are also more patient than Prefect's default (:func:`client_environment`): the server
is SQLite-backed, and under thousands of task-run writes it answers 503 ("database is locked",
which Prefect's server reports as retryable) for longer than Prefect's client waits by default.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmflow.flows.ui_servers import (
    CLIENT_AUTH_ENV,
    UIServerError,
    api_auth_string,
    prefect_server,
    start,
    stop_all,
    wait_healthy,
)
from llmflow.tasks.ingest.pydoc_site import free_port

# Honour Prefect's own setting when the user set it; otherwise be patient: a loaded 2-core machine
# took minutes to start the server (migrations on a fresh SQLite database).
DEFAULT_STARTUP_TIMEOUT_S = 600.0
TIMEOUT_VARIABLE = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


# Prefect's client (prefect/client/base.py, 3.8) retries 408, 429, 502 and 503 and dropped
# connections PREFECT_CLIENT_MAX_RETRIES times, 5 by default, waiting 2**n s (n = 1, 2, ...,
# with jitter) or the server's Retry-After: about a minute in all, then the call fails and with
# it the task or the flow. Eight retries wait 2 + 4 + ... + 256 = 510 s before giving up.
RETRIES_VARIABLE = "PREFECT_CLIENT_MAX_RETRIES"
CLIENT_MAX_RETRIES = 8

# The API URLs this process's temporary servers answer at: no UI, and gone when the run ends.
_TEMPORARY: set[str] = set()


def is_temporary(api_url: str | None = None) -> bool:
    """Whether ``api_url`` (default: the API this process talks to) is a temporary server of
    ours, so that no link to its pages outlives the run."""
    if api_url is None:
        from prefect.settings import PREFECT_API_URL

        api_url = PREFECT_API_URL.value()
    return bool(api_url) and str(api_url).rstrip("/") in _TEMPORARY


def client_environment() -> dict[str, str]:
    """What our temporary server's clients (this process, and the process pool's or local Dask
    cluster's workers, which inherit it) get in their environment: more retries on 503, unless
    the user set $PREFECT_CLIENT_MAX_RETRIES."""
    if RETRIES_VARIABLE in os.environ:
        return {}
    return {RETRIES_VARIABLE: str(CLIENT_MAX_RETRIES)}


def startup_timeout() -> float:
    """Seconds to wait for the server: $PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or 600."""
    raw = os.environ.get(TIMEOUT_VARIABLE)
    try:
        return float(raw) if raw else DEFAULT_STARTUP_TIMEOUT_S
    except ValueError:
        raise UIServerError(f"{TIMEOUT_VARIABLE}={raw!r} is not a number of seconds") from None


@contextmanager
def temporary_api(workdir: Path, say: Callable[[str], None] = print) -> Iterator[str]:
    """Start the workdir's Prefect API server, point this process's Prefect at it, yield its URL;
    stop it when the block ends, however it ends."""
    from prefect.context import refresh_global_settings_context

    auth_string, _ = api_auth_string(workdir)
    server = prefect_server(workdir, free_port(), auth_string)
    server.env["PREFECT_UI_ENABLED"] = "false"
    server.log_path = workdir / "logs" / "prefect-api.log"
    timeout_s = startup_timeout()
    started = time.monotonic()
    start(server, die_with_parent=True)
    assert server.process is not None
    clients = {"PREFECT_API_URL": f"{server.url}/api", CLIENT_AUTH_ENV: auth_string}
    clients |= client_environment()
    previous = {name: os.environ.get(name) for name in clients}
    try:
        say(
            f"Starting Prefect's API server for this run (pid {server.process.pid},"
            f" log {server.log_path}; waiting up to {timeout_s:.0f} s)"
        )
        wait_healthy([server], timeout_s, threading.Event())
        say(f"Prefect API ready after {time.monotonic() - started:.0f} s")
        os.environ.update(clients)
        refresh_global_settings_context()
        _TEMPORARY.add(clients["PREFECT_API_URL"])
        yield os.environ["PREFECT_API_URL"]
    finally:
        _TEMPORARY.discard(clients["PREFECT_API_URL"])
        _flush_to_api()
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        refresh_global_settings_context()
        stop_all([server])


def _flush_to_api() -> None:
    """Send the logs and events Prefect still holds before their server goes away (otherwise
    its background workers print connection errors at exit). Bounded: a stuck worker never
    holds the run's exit for more than a few seconds."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)
