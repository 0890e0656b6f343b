"""The browser check: a deployment run started from the Prefect UI, as README's walk-through
starts one, and what a person then sees in the Prefect and MLflow UIs.

``llmflow ui`` starts a Prefect server and an MLflow server over one workdir; ``llmflow serve``
serves the five deployments to that Prefect server. Then Debian's Chromium, headless, does what
the walk-through tells a user to do, the test asserting on what each page renders and saving a
screenshot of it (to $LLMFLOW_SCREENSHOTS if set, else the test's temporary folder):

- Prefect's login page: ``llmflow ui`` puts the API behind an auth string, so the UI asks for
  it; the test types the one from the file ``llmflow ui`` names and presses Login;
- Prefect's deployments page: the five deployments, the refresh with its schedule;
- Prefect's flows page: the data, train and evaluate flows and the pipeline that runs them;
- the ``data-refresh`` deployment's page (the data flow's), reached by its link there, just
  before Run is clicked;
- Run → Quick run (which opens the "Run Deployment" form, the preset filled in) → the form's Run →
  the toast's "View run": the new flow run's id is read from the address the UI goes to, and the
  run is waited to completion through the API;
- Prefect's page of that flow run: Completed, its task runs by name, all completed;
- Prefect's page of that flow run also names its MLflow run (a tag in its header);
- MLflow's page of the ``llmflow`` experiment, at the address llmflow gives for it: the runs
  table (in MLflow's model-training view, not the GenAI overview MLflow 3 opens otherwise),
  the run's parent run with one nested child run per stage, shown only once the parent row is
  expanded (so they really are nested).

tests/test_deployments.py triggers the same deployment through the REST API instead, without a
browser. The servers here are ``llmflow ui``'s, not the session's ``prefect_api`` fixture: the
UI of a Prefect server started without PREFECT_UI_API_URL asks its API at the default port 4200,
not at its own, and shows nothing; ``llmflow ui`` sets it (flows/ui_servers.py), which is also
what a user runs. Skipped, never failed, where no Chromium is installed (``.ci/install_chromium``
installs it).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
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
from llmflow.flows.tracking import flow_run_tag, mlflow_page

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
)
# A listed task run: the task's name, a dash, a short random suffix.
TASK_RUN_LINE = re.compile(rf"^({'|'.join(STAGE_TASKS)})-[0-9a-z]+$")

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium found (chromium, chromium-browser or $CHROMIUM); .ci/install_chromium"
        " installs Debian's, then `make browser-check` runs this check",
    ),
]


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


def _auth_string(workdir: Path) -> str:
    """The Prefect API's auth string, where ``llmflow ui`` keeps it (and tells the user so)."""
    return (workdir / "prefect" / "api-auth-string").read_text().strip()


# The Prefect UI's login page (Prefect 3.8's Unauthenticated view): one password input, whose
# placeholder shows the form it wants ("admin:pass"), and a Login button submitting it.
LOGIN_INPUT = "document.querySelector('form input[type=password]')"
LOGIN_BUTTON = "document.querySelector('form button[type=submit]')"


def _log_in(page: Page, prefect_url: str, auth_string: str, shots: Path) -> Path:
    """Open the Prefect UI as a user does: it asks for the password; type the auth string
    ``llmflow ui`` pointed to and press Login; the UI then shows its pages. The screenshot is
    of the login page, the password typed (the field masks it)."""
    page.goto(f"{prefect_url}/deployments")
    page.type_into(LOGIN_INPUT, auth_string, "the password field of the Prefect UI's login")
    assert page.evaluate(f"{LOGIN_INPUT}.value") == auth_string
    shot = page.screenshot(shots / "prefect-login.png")
    page.click_when_shown(LOGIN_BUTTON, "the Login button")
    page.wait_for(lambda: [] if not page.evaluate(f"!!{LOGIN_INPUT}") else ["logged in"])
    return shot


def _stop_ui(process: subprocess.Popen[str], pids: dict[str, int]) -> None:
    """Ctrl-C, as a user stops it; by pid whatever is left after that."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=60)
    if process.poll() is None or not all(_gone(pid) for pid in pids.values()):
        _kill_leftovers(process, set(pids.values()))


def _serve(
    workdir: Path, tmp_path: Path, api_url: str, auth_string: str
) -> subprocess.Popen[bytes]:
    """``llmflow serve`` as tests/test_deployments.py serves, against ``llmflow ui``'s Prefect,
    authenticated as ``llmflow ui`` tells a user to; PREFECT_HOME keeps the runner's own local
    state out of the user's ~/.prefect."""
    env = dict(
        _clean_env(),
        PREFECT_API_URL=api_url,
        PREFECT_API_AUTH_STRING=auth_string,
        PREFECT_HOME=str(tmp_path / "serve-home"),
    )
    return start_serve(workdir, tmp_path, env)


# The steps from the deployments page to a flow run, each a JavaScript expression for the one
# element a user clicks there, and the name a failure gives it. Classes are the UI's own
# component names (Prefect 3.8's prefect-ui-library), kept to one per step.
STEPS = (
    (
        # The deployment's name in the deployments list links to its page.
        """[...document.querySelectorAll('a[href*="/deployments/deployment/"]')]"""
        ".find(a => a.textContent.trim() === 'data-refresh')",
        "the data-refresh link on the deployments page",
    ),
    (
        # The deployment page's "Run" button (RunMenu) opens a menu: Quick run, Custom run.
        "document.querySelector('button.run-menu__run-button')",
        "the deployment page's Run button",
    ),
    (
        "[...document.querySelectorAll('button.p-overflow-menu-item')]"
        ".find(b => b.innerText.trim() === 'Quick run')",
        "Quick run in the Run menu",
    ),
    (
        # The flow's parameters are required (a default lives in the deployment, not the flow's
        # signature), so Quick run opens the "Run Deployment" form with the preset filled in
        # (QuickRunParametersModal); its "Run" submits the form.
        "document.querySelector('.quick-run-parameters-modal-v2 button[type=submit]')",
        "the Run button of the Run Deployment form",
    ),
    (
        # Submitted: a toast "<run name> scheduled to start now" with "View run", which opens the
        # new flow run's page (ToastFlowRunCreate).
        "document.querySelector('.toast-flow-run-create__button')",
        "View run in the toast of the created flow run",
    ),
)
FLOW_RUN_PATH = re.compile(r"/runs/flow-run/([0-9a-f-]{36})$")


def _run_from_ui(page: Page, shots: Path) -> tuple[str, Path]:
    """From the deployments page, data-refresh → Run → Quick run → the form's Run → View run, as
    README's walk-through does; the new flow run's id (from the address the UI goes to) and the
    screenshot of the deployment's page taken just before Run is clicked."""
    (link, link_what), (run_button, run_what), *rest = STEPS
    page.click_when_shown(link, link_what)

    def deployment_missing() -> list[str]:
        # On the deployment's page (not the list still showing): its Run button, served, and
        # the schedule in the side panel.
        if not page.evaluate(f"!!{run_button}"):
            return [run_what]
        lines = _lines(page)
        expected = ["data-refresh", "Ready", "At 03:00 AM every day"]
        return [e for e in expected if e not in lines]

    page.wait_for(deployment_missing)
    shot = page.screenshot(shots / "prefect-run-deployment.png")
    page.click_when_shown(run_button, run_what)
    for expression, what in rest:
        page.click_when_shown(expression, what)

    def flow_run_id() -> str | None:
        found = FLOW_RUN_PATH.search(page.evaluate("location.pathname"))
        return found[1] if found else None

    page.wait_for(lambda: [] if flow_run_id() else ["the new flow run's page"])
    run_id = flow_run_id()
    assert run_id is not None
    return run_id, shot


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


def _check_flows(page: Page, prefect_url: str, shots: Path) -> Path:
    """The Flows page: one flow per phase (data, train, evaluate) and the pipeline that runs
    them as subflows, each with its own deployment, runs and parameters."""
    page.goto(f"{prefect_url}/flows")
    expected = [f"llmflow-{name}" for name in ("pipeline", "data", "train", "evaluate")]
    page.wait_for(lambda: [e for e in expected if e not in _lines(page)])
    return page.screenshot(shots / "prefect-flows.png")


def _check_flow_run(
    page: Page, prefect_url: str, run: dict, task_runs: int, mlflow_run: str, shots: Path
) -> Path:
    page.goto(f"{prefect_url}/runs/flow-run/{run['id']}")
    # The run's header, above its tabs; its parts arrive from separate API calls. The tag
    # naming its MLflow run is there too (its labels are shown nowhere in Prefect 3.8's UI).
    in_header = [run["name"], "Completed", "data-refresh", f"{task_runs} Task runs"]
    in_header.append(flow_run_tag(mlflow_run))

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

    # The experiment's own page, at the address llmflow gives for it: the runs table, not the
    # GenAI overview ("Traces", "Send your first trace") that MLflow 3.18 opens an experiment on
    # unless the address asks for its model-training view (it ignores the experiment's kind
    # tag, which llmflow sets as well: tests/test_run_records.py).
    page.goto(mlflow_page(mlflow_url, experiment_id))
    page.wait_for(lambda: [] if parent in shown() else [parent])
    assert page.evaluate("location.hash").startswith(f"#/experiments/{experiment_id}/runs")
    assert "Send your first trace" not in page.text()
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


def test_a_run_started_from_the_prefect_ui_shows_in_both_uis(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    shots = _screenshots(tmp_path)
    workdir = tmp_path / "work"
    log = tmp_path / "serve.log"
    ui, urls, pids = _start_ui(workdir)
    try:
        api_url = f"{urls['Prefect']}/api"
        auth_string = _auth_string(workdir)
        user, password = auth_string.split(":", 1)
        # Served throughout: when `llmflow serve` stops, Prefect pauses its deployments and the
        # UI greys them out; the pictures are of deployments being served.
        serve = _serve(workdir, tmp_path, api_url, auth_string)
        try:
            with (
                httpx.Client(
                    base_url=api_url, timeout=10, trust_env=False, auth=(user, password)
                ) as api,
                Page(CHROMIUM, tmp_path / "chromium") as page,
            ):
                refresh = served_deployments(api, serve, log)["data-refresh"]
                taken = [_log_in(page, urls["Prefect"], auth_string, shots)]
                taken.append(_check_deployments(page, urls["Prefect"], shots))
                run_id, shot = _run_from_ui(page, shots)
                taken.append(shot)
                run = wait_completed(api, run_id, log)
                # Created by the UI's form for this deployment, with the preset unchanged.
                assert run["deployment_id"] == refresh["id"], run
                assert run["parameters"] == refresh["parameters"], run["parameters"]
                states = api.get("/flow_run_states/", params={"flow_run_id": run_id}).json()
                first = min(states, key=lambda state: state["timestamp"])
                assert (first["message"] or "").startswith("Run from the Prefect UI"), first
                filters = {"flow_runs": {"id": {"any_": [run_id]}}}
                task_runs = post_retrying(api, "/task_runs/count", filters).json()
                assert task_runs >= len(STAGE_TASKS)

                client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
                experiment = client.get_experiment_by_name("llmflow")
                runs = client.search_runs([experiment.experiment_id])
                (parent,) = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
                assert parent.data.tags["prefect.flow_run_id"] == run_id

                taken += [
                    _check_flow_run(
                        page, urls["Prefect"], run, task_runs, parent.info.run_id, shots
                    ),
                    _check_flows(page, urls["Prefect"], shots),
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
