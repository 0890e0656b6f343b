"""Deployments: `llmflow serve` against a real Prefect server, a run triggered through Prefect's
API as the UI triggers one, its MLflow runs, and a bad value refused with the field named."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import LLMFLOW, llmflow_env, stop_process
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from test_crash_resume import QUALITY_OFF, prose

from llmflow.deployments.pipeline_deployments import (
    DATA_STAGES,
    PRESETS,
    build_deployments,
    preset_parameters,
)
from llmflow.flows.config import PipelineConfig


def test_presets_are_typed_parameters_with_a_schedule_for_the_refresh() -> None:
    config = PipelineConfig(workdir="/data/llmflow")
    deployments = {d.name: d for d in build_deployments(config, refresh_cron="30 2 * * 1")}
    assert set(deployments) == {
        "pipeline",
        "data-refresh",
        "train",
        "evaluate",
        "curation-ablation",
    }
    refresh = deployments["data-refresh"]
    assert [s.schedule.cron for s in refresh.schedules] == ["30 2 * * 1"]
    assert not deployments["pipeline"].schedules
    # deployment runs crawl with private addresses refused unless the serving config says so
    crawl = config.crawl.model_copy(update={"allow_private_addresses": False})
    served = config.model_copy(update={"crawl": crawl})
    for name, deployment in deployments.items():
        # each deployment runs its own flow: the pipeline, or one phase
        preset = PRESETS[name]
        assert deployment.entrypoint == f"llmflow.flows.{preset.module}.{preset.flow}"
        parameters = deployment.parameters
        assert PipelineConfig.model_validate(parameters["config"]) == served
    assert deployments["data-refresh"].parameters["refresh"] is True
    assert DATA_STAGES == (
        "crawl",
        "normalize",
        "quality",
        "dedup",
        "quality_model",
        "toxicity",
        "pii",
        "decontaminate",
    )
    assert PRESETS["train"].stages == ("tokenizer", "tokenize", "pretrain", "sft")
    # the UI's form: every field with its description, from the pydantic config
    schema = json.dumps(deployments["pipeline"]._parameter_openapi_schema.model_dump())
    assert "Stop after this many fetched pages." in schema  # crawl.max_pages's description
    assert set(preset_parameters("evaluate", config)) == {"config"}  # the evaluate flow's only one


def _wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN202 - a test helper
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def post_retrying(api: httpx.Client, path: str, body: dict) -> httpx.Response:
    """POST, retried while the server answers 503: Prefect's SQLite database is briefly locked
    while the runner registers and polls, and the server then asks the client to come back."""
    for _ in range(30):
        response = api.post(path, json=body)
        if response.status_code != 503:
            return response
        time.sleep(1)
    return response


def served_deployments(api: httpx.Client, server: subprocess.Popen, log: Path) -> dict[str, dict]:
    """The llmflow deployments by name, once ``llmflow serve`` has registered all of them."""

    def deployments() -> dict[str, dict]:
        assert server.poll() is None, log.read_text()[-3000:]
        found = post_retrying(api, "/deployments/filter", {}).json()
        # serve's names only: the session's server may also hold prefect.yaml's `<name>-worker`
        return {
            d["name"]: d for d in found if "llmflow" in d.get("tags", []) and d["name"] in PRESETS
        }

    return _wait(lambda: len(deployments()) == len(PRESETS) and deployments(), 120, "deployments")


def wait_final(api: httpx.Client, run_id: str) -> dict:
    """The flow run once it is in a final state, whichever."""

    def final() -> dict | None:
        response = api.get(f"/flow_runs/{run_id}")
        if response.status_code == 503:
            return None
        run = response.json()
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED") else None

    return _wait(final, 180, f"flow run {run_id} to finish")


def wait_completed(api: httpx.Client, run_id: str, log: Path) -> dict:
    """The flow run once it is COMPLETED; a failed or crashed one fails with the serve log."""

    def finished() -> dict | None:
        response = api.get(f"/flow_runs/{run_id}")
        if response.status_code == 503:  # the database is busy: ask again
            return None
        run = response.json()
        state = run["state"]
        assert state["type"] not in ("FAILED", "CRASHED", "CANCELLED"), (
            state,
            log.read_text()[-4000:],
        )
        return run if state["type"] == "COMPLETED" else None

    return _wait(finished, 300, "the triggered flow run")


def start_serve(workdir: Path, tmp_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """``llmflow serve`` on six small local documents (the tokenizer keeps some whatever the
    held-out split), its output in ``tmp_path/serve.log``."""
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"doc-{i}.txt")
        paths[-1].write_text(prose(i) + "\n")
    seeds = json.dumps([str(p) for p in paths])
    with (tmp_path / "serve.log").open("wb") as log:
        return subprocess.Popen(
            [LLMFLOW, "serve", "--workdir", str(workdir), "--set", f"crawl.seeds={seeds}"]
            + QUALITY_OFF,
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@pytest.mark.server
def test_a_served_deployment_runs_when_triggered_through_prefect(
    prefect_api: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    env = llmflow_env(prefect_api)
    server = start_serve(workdir, tmp_path, env)
    api = httpx.Client(base_url=prefect_api, timeout=10)
    try:
        served = served_deployments(api, server, tmp_path / "serve.log")
        refresh = served["data-refresh"]
        assert refresh["schedules"][0]["schedule"]["cron"] == "0 3 * * *"

        # a bad value, as a user could type it in the UI's form: refused, the field named
        bad = preset_parameters("data-refresh", PipelineConfig(workdir=str(workdir)))
        bad["config"]["crawl"]["max_pages"] = -5
        create = f"/deployments/{refresh['id']}/create_flow_run"
        refused = post_retrying(api, create, {"parameters": bad})
        assert refused.status_code in (409, 422), refused.text
        assert "max_pages" in refused.text, refused.text

        created = post_retrying(api, create, {})
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        wait_completed(api, run_id, tmp_path / "serve.log")
    finally:
        stop_process(server)
        api.close()

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if MLFLOW_PARENT_RUN_ID not in r.data.tags]
    assert parent.data.tags["prefect.flow_run_id"] == run_id
    assert parent.data.params["stages"] == ",".join(DATA_STAGES)
    children = {r.data.tags["llmflow.stage"] for r in runs if r is not parent}
    assert children == set(DATA_STAGES)
    assert (workdir / "data" / "documents" / "manifest.json").exists()  # a published version
    assert not (workdir / "data" / "tokenize").exists()  # token shards: the train flow's work


def _prefect_yaml() -> dict:
    import yaml

    return yaml.safe_load((Path(__file__).parents[1] / "prefect.yaml").read_text())


def test_prefect_yaml_declares_the_same_deployments_under_their_own_names() -> None:
    by_name = {d["name"]: d for d in _prefect_yaml()["deployments"]}
    # `<name>-worker`: deploying this file never replaces what `llmflow serve` registered
    assert set(by_name) == {f"{name}-worker" for name in PRESETS}
    for name, preset in PRESETS.items():
        deployment = by_name[f"{name}-worker"]
        assert deployment["description"] == preset.description
        assert deployment["entrypoint"] == f"llmflow.flows.{preset.module}:{preset.flow}"
        parameters = preset_parameters(name, PipelineConfig())
        declared = deployment["parameters"]
        # the required config: the defaults, crawling public addresses only, as serve's presets
        assert PipelineConfig.model_validate(declared["config"]) == PipelineConfig.model_validate(
            parameters["config"]
        )
        assert {k: v for k, v in declared.items() if k != "config"} == {
            k: v for k, v in parameters.items() if k != "config"
        }
        assert bool(deployment.get("schedules")) == preset.scheduled
    assert by_name["train-worker"]["work_pool"]["name"] == "llmflow-gpu"
    assert by_name["curation-ablation-worker"]["work_pool"]["name"] == "llmflow-gpu"
    assert by_name["pipeline-worker"]["work_pool"]["name"] == "llmflow-process"


@pytest.mark.server
def test_prefect_yaml_deploys_and_a_worker_runs_its_deployment(
    prefect_api: str, tmp_path: Path
) -> None:
    """`prefect deploy --all` from prefect.yaml, as its header says, then runs created as
    `prefect deployment run` creates them: with no parameters they pass validation; one runs to
    completion on a process worker, in the folder deployed from."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "prefect.yaml").write_text((Path(__file__).parents[1] / "prefect.yaml").read_text())
    env = llmflow_env(prefect_api, PWD=str(project))
    prefect = str(Path(LLMFLOW).parent / "prefect")
    for pool in ("llmflow-process", "llmflow-gpu"):
        created = subprocess.run(
            [prefect, "work-pool", "create", pool, "--type", "process"],
            env=env,
            cwd=project,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert created.returncode == 0, created.stdout + created.stderr
    deployed = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--all"],
        env=env,
        cwd=project,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    api = httpx.Client(base_url=prefect_api, timeout=10)
    worker = None
    try:
        found = post_retrying(api, "/deployments/filter", {}).json()
        ours = {d["name"]: d for d in found if d["name"].endswith("-worker")}
        assert set(ours) == {f"{name}-worker" for name in PRESETS}
        assert ours["pipeline-worker"]["job_variables"]["working_dir"] == str(project)
        # `prefect deployment run` sends no parameters: the declared config makes that valid
        for deployment in ours.values():
            created = post_retrying(api, f"/deployments/{deployment['id']}/create_flow_run", {})
            assert created.status_code == 201, (deployment["name"], created.text)
            api.delete(f"/flow_runs/{created.json()['id']}")
        # one run to the end, on six small documents, by a worker
        docs = []
        (tmp_path / "docs").mkdir()
        for i in range(6):
            docs.append(str(tmp_path / "docs" / f"doc-{i}.txt"))
            Path(docs[-1]).write_text(prose(i) + "\n")
        config = _prefect_yaml()["definitions"]["config"]
        config = json.loads(json.dumps(config))
        config["crawl"]["seeds"] = docs
        config["quality"] = {k.split(".")[1].split("=")[0]: [] for k in QUALITY_OFF[1::2]}
        refresh = ours["data-refresh-worker"]
        created = post_retrying(
            api,
            f"/deployments/{refresh['id']}/create_flow_run",
            {"parameters": {"config": config}},
        )
        assert created.status_code == 201, created.text
        log = tmp_path / "worker.log"
        with log.open("wb") as out:
            worker = subprocess.Popen(
                [prefect, "worker", "start", "--pool", "llmflow-process"],
                env=llmflow_env(
                    prefect_api,
                    LLMFLOW_ALLOWED_ROOTS=f"{project / 'llmflow-work'},{tmp_path / 'docs'}",
                ),
                cwd=tmp_path,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_completed(api, created.json()["id"], log)
    finally:
        if worker is not None:
            stop_process(worker)
        # the session's server is shared: leave it with serve's deployments only
        for deployment in post_retrying(api, "/deployments/filter", {}).json():
            if deployment["name"].endswith("-worker"):
                api.delete(f"/deployments/{deployment['id']}")
        api.close()
    # the run wrote where it was deployed from: ./llmflow-work of the project folder
    assert (project / "llmflow-work" / "data" / "documents" / "manifest.json").exists()


@pytest.mark.server
def test_a_deployment_run_naming_paths_outside_the_roots_is_refused(
    prefect_api: str, tmp_path: Path
) -> None:
    """A run's parameters are whatever its creator typed: a seed at /etc/passwd, a data_root or a
    Dask scheduler of their own fail the run, naming the parameter and the allow-list, before
    anything is read or written."""
    workdir = tmp_path / "work"
    outside = tmp_path / "outside"
    server = start_serve(workdir, tmp_path, llmflow_env(prefect_api))
    api = httpx.Client(base_url=prefect_api, timeout=10)
    try:
        evaluate = served_deployments(api, server, tmp_path / "serve.log")["evaluate"]
        create = f"/deployments/{evaluate['id']}/create_flow_run"
        reads = json.loads(json.dumps(evaluate["parameters"]))
        reads["config"]["crawl"]["seeds"] = ["/etc/passwd"]
        writes = json.loads(json.dumps(evaluate["parameters"]))
        writes["config"]["data_root"] = str(outside)
        writes["config"]["dask_address"] = "tcp://127.0.0.1:1"
        runs = []
        for parameters in (reads, writes):
            created = post_retrying(api, create, {"parameters": parameters})
            assert created.status_code == 201, created.text
            runs.append(created.json()["id"])
        refused = [wait_final(api, run_id)["state"] for run_id in runs]
    finally:
        stop_process(server)
        api.close()

    log = (tmp_path / "serve.log").read_text()
    assert f"Deployment runs may name paths under: {workdir}," in log, log[-2000:]
    for state in refused:
        assert state["type"] == "FAILED", state
        assert "deployment run refused" in state["message"], state
        assert f"Allowed roots: {workdir}, " in state["message"], state
        assert "LLMFLOW_ALLOWED_ROOTS" in state["message"], state
    assert (
        "config.crawl.seeds[0]='/etc/passwd' is outside the allowed roots"
        in (refused[0]["message"])
    )
    assert (
        f"config.data_root={str(outside)!r} is outside the allowed roots" in (refused[1]["message"])
    )
    assert (
        "config.dask_address='tcp://127.0.0.1:1' is not an allowed Dask scheduler"
        in (refused[1]["message"])
    )
    # Refused before the dataset lock, the MLflow run or any dataset: nothing was written.
    assert not outside.exists()
    assert not (workdir / "data").exists()
    assert not (workdir / "mlflow.db").exists()
