"""The browser check: what a person sees in the Prefect and MLflow UIs after a deployment run.

``llmflow ui`` starts a Prefect server and an MLflow server over one workdir; ``llmflow serve``
serves the four deployments to that Prefect server; a ``data-refresh`` run is created through
Prefect's REST API, as the UI's "Run" button creates one, and waited to completion. Then Debian's
Chromium, headless, opens three pages and the test asserts on what they render and saves a
screenshot of each (to $LLMFLOW_SCREENSHOTS if set, else the test's temporary folder):

- Prefect's deployments page: the four deployments, the refresh with its schedule;
- Prefect's page of the triggered flow run: Completed, its task runs by name, all completed;
- MLflow's runs table of the ``llmflow`` experiment: the run's parent run with one nested child
  run per stage, shown only once the parent row is expanded (so they really are nested).

The servers are ``llmflow ui``'s, not the session's ``prefect_api`` fixture: the UI of a Prefect
server started without PREFECT_UI_API_URL asks its API at the default port 4200, not at its own,
and shows nothing; ``llmflow ui`` sets it (flows/ui_servers.py), which is also what a user runs.
Skipped, never failed, where no Chromium is installed (``.ci/install_chromium`` installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import stop_process
from headless_chromium import Page, find_chromium
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from test_deployments import post_retrying, served_deployments, start_serve, wait_completed
from test_ui_servers import _gone, _kill_leftovers, _launch, _reader, read_urls

from llmflow.deployments.pipeline_deployments import DATA_STAGES, PRESETS

LLMFLOW = str(Path(sys.executable).parent / "llmflow")
CHROMIUM = find_chromium()
# The Prefect task of each data stage, by the name its @task gives it (tasks/*.py): the UI lists
# each task run as that name plus a short suffix.
STAGE_TASKS = (
    "crawl-unit",
    "normalize-shard",
    "quality-shard",
    "dedup-signatures",
    "dedup-resolve",
    "dedup-shard",
    "toxicity-shard",
    "pii-shard",
    "tokenizer-train",
    "tokenize-shard",
)
# A listed task run: the task's name, a dash, a short random suffix.
TASK_RUN_LINE = re.compile(rf"^({'|'.join(STAGE_TASKS)})-[0-9a-z]+$")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium found (chromium, chromium-browser or $CHROMIUM); .ci/install_chromium"
    " installs Debian's, then `make browser-check` runs this check",
)


def _screenshots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("LLMFLOW_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder.absolute()


def _clean_env() -> dict[str, str]:
    """Our environment without the variables that would send runs or servers to other stores."""
    env = dict(os.environ)
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    return env


def _start_ui(workdir: Path) -> tuple[subprocess.Popen[str], dict[str, str], dict[str, int]]:
    """``llmflow ui`` over the workdir; its two URLs and server pids once both answer."""
    process = _launch(workdir, env=_clean_env())
    lines = _reader(process)
    urls: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        read_urls(lines, urls, pids, [], 180)
    except BaseException:
        _kill_leftovers(process, set(pids.values()))
        raise
    return process, urls, pids


def _stop_ui(process: subprocess.Popen[str], pids: dict[str, int]) -> None:
    """Ctrl-C, as a user stops it; by pid whatever is left after that."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    if process.poll() is None or not all(_gone(pid) for pid in pids.values()):
        _kill_leftovers(process, set(pids.values()))


def _serve(workdir: Path, tmp_path: Path, api_url: str) -> subprocess.Popen[bytes]:
    """``llmflow serve`` as tests/test_deployments.py serves, against ``llmflow ui``'s Prefect;
    PREFECT_HOME keeps the runner's own local state out of the user's ~/.prefect."""
    env = dict(_clean_env(), PREFECT_API_URL=api_url, PREFECT_HOME=str(tmp_path / "serve-home"))
    return start_serve(workdir, tmp_path, env)


def _run_refresh(api: httpx.Client, serve: subprocess.Popen[bytes], log: Path) -> dict:
    """Create a data-refresh run through the API once the four deployments are served; its
    flow-run document once it is COMPLETED."""
    served = served_deployments(api, serve, log)
    created = post_retrying(api, f"/deployments/{served['data-refresh']['id']}/create_flow_run", {})
    assert created.status_code == 201, created.text
    return wait_completed(api, created.json()["id"], log)


def _lines(page: Page) -> list[str]:
    return [line.strip() for line in page.text().splitlines()]


def _check_deployments(page: Page, prefect_url: str, shots: Path) -> Path:
    page.goto(f"{prefect_url}/deployments")
    # Whole lines: "pipeline" alone, not inside the flow's name "llmflow-pipeline".
    expected = [*PRESETS, f"{len(PRESETS)} Deployments"]

    def missing() -> list[str]:
        lines = _lines(page)
        absent = [e for e in expected if e not in lines]
        # Ready: a runner polls for each, i.e. `llmflow serve` is serving them.
        if lines.count("Ready") < len(PRESETS):
            absent.append(f"{len(PRESETS)} x Ready")
        # data-refresh's schedule, "0 3 * * *" in words (a time-zone note may follow it)
        return absent + ([] if any("03:00 AM" in line for line in lines) else ["03:00 AM"])

    page.wait_for(missing)
    return page.screenshot(shots / "prefect-deployments.png")


def _check_flow_run(page: Page, prefect_url: str, run: dict, task_runs: int, shots: Path) -> Path:
    page.goto(f"{prefect_url}/runs/flow-run/{run['id']}")
    # The run's header, above its tabs; its parts arrive from separate API calls.
    in_header = [run["name"], "Completed", "data-refresh", f"{task_runs} Task runs"]

    def header_missing() -> list[str]:
        text = page.text()
        if "\nLogs\n" not in text:  # the tabs are not drawn yet
            return ["the run's tabs"]
        header = text.split("\nLogs\n")[0]
        return [e for e in in_header if e not in header]

    page.wait_for(header_missing)
    page.click(
        "[...document.querySelectorAll('li.p-tab')].find(e => e.innerText.trim() === 'Task Runs')"
    )
    # Every task run completed, and the task of every stage among those listed.
    expected = [f"{task_runs} Task runs", f"({task_runs} Completed)"]

    def missing() -> list[str]:
        lines = _lines(page)
        absent = [e for e in expected if e not in lines]
        listed = {m[1] for line in lines if (m := TASK_RUN_LINE.match(line))}
        return absent + [t for t in STAGE_TASKS if t not in listed]

    page.wait_for(missing)
    return page.screenshot(shots / "prefect-flow-run.png")


# Where to grab the right border of the MLflow runs table's run-name column (null if not found).
RUN_NAME_BORDER = """(() => {
  const header = [...document.querySelectorAll('.ag-header-cell')]
    .find(e => (e.getAttribute('col-id') || '').includes('Run Name'));
  const handle = header && header.querySelector('.ag-header-cell-resize');
  if (!handle) return null;
  const box = handle.getBoundingClientRect();
  return [box.x + 2, box.y + box.height / 2];
})()"""
RUN_NAME_LINKS = """[...document.querySelectorAll('a[href*="#/experiments/%s/runs/"]')]"""


def _check_mlflow(
    page: Page, mlflow_url: str, experiment_id: str, parent: str, shots: Path
) -> Path:
    links = RUN_NAME_LINKS % experiment_id

    def shown() -> set[str]:
        """The run names in the table's run-name column, as links to the runs."""
        return set(page.evaluate(f"{links}.map(a => a.textContent.trim())") or [])

    page.goto(f"{mlflow_url}/#/experiments/{experiment_id}/runs")
    page.wait_for(lambda: [] if parent in shown() else [parent])
    # Collapsed: the stage runs are children of the parent, not runs of their own.
    assert shown() == {parent}, shown()
    # The expander in the parent's run-name cell.
    page.click(
        f"{links}.find(a => a.textContent.trim() === {json.dumps(parent)})"
        ".closest('.ag-cell, [role=gridcell]').querySelector('button')"
    )
    expected = {parent, *DATA_STAGES}
    page.wait_for(lambda: sorted(expected - shown()))
    assert shown() == expected, shown()
    page.wait_for_text([f"{len(expected)} matching runs"])
    # For the picture only: MLflow 3 opens its assistant's side panel over the table, and its
    # run-name column cuts "pipeline-<flow run name>" short. Close the one, widen the other.
    page.evaluate(
        "(() => { const b = document.querySelector('button[aria-label=\"Close\"]');"
        " if (b) b.click(); })()"
    )
    border = page.evaluate(RUN_NAME_BORDER)
    if border:
        page.drag((border[0], border[1]), (border[0] + 150, border[1]))
    return page.screenshot(shots / "mlflow-nested-runs.png")


def test_the_uis_show_the_deployments_the_run_and_its_nested_mlflow_runs(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    shots = _screenshots(tmp_path)
    workdir = tmp_path / "work"
    ui, urls, pids = _start_ui(workdir)
    try:
        api_url = f"{urls['Prefect']}/api"
        # Served throughout: when `llmflow serve` stops, Prefect pauses its deployments and the
        # UI greys them out; the picture is of deployments being served.
        serve = _serve(workdir, tmp_path, api_url)
        try:
            with httpx.Client(base_url=api_url, timeout=10, trust_env=False) as api:
                run = _run_refresh(api, serve, tmp_path / "serve.log")
                filters = {"flow_runs": {"id": {"any_": [run["id"]]}}}
                task_runs = post_retrying(api, "/task_runs/count", filters).json()
            assert task_runs >= len(STAGE_TASKS)

            client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
            experiment = client.get_experiment_by_name("llmflow")
            runs = client.search_runs([experiment.experiment_id])
            (parent,) = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
            assert parent.data.tags["prefect.flow_run_id"] == run["id"]

            with Page(CHROMIUM, tmp_path / "chromium") as page:
                taken = [
                    _check_deployments(page, urls["Prefect"], shots),
                    _check_flow_run(page, urls["Prefect"], run, task_runs, shots),
                    _check_mlflow(
                        page, urls["MLflow"], experiment.experiment_id, parent.info.run_name, shots
                    ),
                ]
        finally:
            stop_process(serve)
        for path in taken:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
            assert path.stat().st_size > 20_000, path  # a rendered page, not a blank one
    finally:
        _stop_ui(ui, pids)
