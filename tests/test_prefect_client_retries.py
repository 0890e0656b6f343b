"""A Prefect API that answers 503 for a while (SQLite busy under load) does not fail our runs:
the clients of our temporary server retry more often than Prefect's default. Against a real HTTP
server on 127.0.0.1 that answers 503 a set number of times before 200."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

from llmflow.flows.prefect_api import CLIENT_MAX_RETRIES, RETRIES_VARIABLE, client_environment

PREFECT_DEFAULT_RETRIES = 5  # PREFECT_CLIENT_MAX_RETRIES's default in prefect 3.8
BUSY_ANSWERS = PREFECT_DEFAULT_RETRIES + 1


class FlakyAPI(BaseHTTPRequestHandler):
    """503 (with Retry-After: 0, so the test does not sleep) for the first ``busy`` requests to
    /api/hello, then 200; every other path 200 at once."""

    busy = 0
    hello_requests = 0

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.endswith("/hello"):
            type(self).hello_requests += 1
            if type(self).hello_requests <= self.busy:
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        body = json.dumps("ok").encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def flaky_api() -> Iterator[str]:
    FlakyAPI.busy, FlakyAPI.hello_requests = BUSY_ANSWERS, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyAPI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def hello(api_url: str, retries: int) -> None:
    """GET /api/hello through Prefect's own (sync) client, as a task run's calls go."""
    updates = {PREFECT_API_URL: api_url, PREFECT_CLIENT_MAX_RETRIES: retries}
    with temporary_settings(updates=updates), get_client(sync_client=True) as client:
        client.hello()


def test_prefects_default_gives_up_on_an_api_busy_for_six_answers(flaky_api: str) -> None:
    with pytest.raises(Exception, match="503"):
        hello(flaky_api, PREFECT_DEFAULT_RETRIES)
    assert FlakyAPI.hello_requests == BUSY_ANSWERS


def test_our_clients_wait_out_the_busy_api(flaky_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RETRIES_VARIABLE, raising=False)
    retries = int(client_environment()[RETRIES_VARIABLE])
    assert retries == CLIENT_MAX_RETRIES
    hello(flaky_api, retries)
    assert FlakyAPI.hello_requests == BUSY_ANSWERS + 1


def test_a_retry_count_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RETRIES_VARIABLE, "2")
    assert client_environment() == {}
