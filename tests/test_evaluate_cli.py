"""``llmflow evaluate``: its options, where its results go (a file in the workdir and a run in
the workdir's MLflow store), and what it keeps out of the terminal and the logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import LLMFLOW
from mlflow.tracking import MlflowClient
from test_evaluate import save_uniform_model, write_arc
from typer.testing import CliRunner

from llmflow.flows.cli import app
from llmflow.tasks.evaluate.benchmarks import TASKS
from llmflow.tasks.ingest.embedded_data import EMBEDDED_TASKS

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_uniform_model(tmp_path_factory.mktemp("tiny"))


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["evaluate", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_tasks_list_describes_every_task_and_needs_no_model() -> None:
    code, output = invoke("--tasks", "list")
    assert code == 0, output
    rows = {line.split()[0]: line for line in output.splitlines() if line.split()[:1]}
    for task in TASKS:
        assert task in rows, output
        assert ("yes" in rows[task].split()) == (task in EMBEDDED_TASKS), rows[task]
    assert "acc_norm" in rows["hellaswag"] and "perplexity" in rows["lambada"]
    assert rows["mmlu"].split().count("5") == 1 and "0" in rows["arc_easy"].split()


def test_help_shows_the_workdir_default() -> None:
    code, output = invoke("--help")
    assert code == 0 and "./llmflow-work" in output and "--device" in output


@pytest.mark.parametrize("limit", ["0", "-3"])
def test_a_limit_below_one_is_a_clear_error(tiny_model: Path, limit: str) -> None:
    code, output = invoke("--model", str(tiny_model), "--tasks", "arc_easy", "--limit", limit)
    assert code == 2, output
    assert "--limit" in output and limit in output and "Traceback" not in output


def test_a_bad_device_is_named(tiny_model: Path, tmp_path: Path) -> None:
    args = ["--model", str(tiny_model), "--tasks", "arc_easy", "--workdir", str(tmp_path)]
    code, output = invoke(*args, "--device", "gpu")
    assert code == 2 and "--device 'gpu'" in output and "cuda:N" in output, output
    if not torch.cuda.is_available():
        code, output = invoke(*args, "--device", "cuda:1")
        assert code == 2 and "CUDA is not available" in output, output
    code, output = invoke("--tasks", "arc_easy")
    assert code == 2 and "--model" in output, output


def test_results_go_to_the_workdir_and_to_mlflow_without_loading_bars(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Run as a user runs it (a process of its own, output piped as into a log): the results
    file lands under the workdir, the run in the workdir's MLflow store, and transformers'
    "Loading weights … it/s" bar stays out of the output."""
    write_arc(tmp_path / "bench", 6)
    workdir = tmp_path / "work"
    env = dict(os.environ, COLUMNS="200", PREFECT_HOME=str(tmp_path / "prefect"))
    env.pop("MLFLOW_TRACKING_URI", None)
    args = ["--model", str(tiny_model), "--tasks", "arc_easy", "--limit", "4", "--device", "cpu"]
    args += ["--data-dir", str(tmp_path / "bench"), "--workdir", str(workdir)]
    done = subprocess.run(
        [LLMFLOW, "evaluate", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    everything = done.stdout + done.stderr
    assert done.returncode == 0, everything
    assert "Loading" not in everything and "it/s" not in everything, everything
    assert not (tmp_path / "eval-results.json").exists()

    (output,) = (workdir / "evaluations").iterdir()
    assert re.fullmatch(r"model-\d{8}T\d{6}Z\.json", output.name), output.name
    assert str(output) in " ".join(done.stdout.split())
    results = json.loads(output.read_text())
    scores = results["results"]["arc_easy"]
    assert scores["items"] == 4 and results["config"]["device"] == "cpu"

    run_id = re.search(r"MLflow run ([0-9a-f]{32})", done.stdout)
    assert run_id is not None, done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    run = client.get_run(run_id.group(1))
    assert client.get_experiment(run.info.experiment_id).name == "llmflow"
    assert run.info.run_name == "evaluate-model" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith((workdir / "mlartifacts").as_uri())
    assert run.data.params["model"] == str(tiny_model)
    assert run.data.params["tasks"] == "arc_easy" and run.data.params["limit"] == "4"
    assert run.data.params["num_fewshot"] == "None" and run.data.params["device"] == "cpu"
    assert run.data.params["batch_size"] == "8"
    for metric, value in scores["metrics"].items():
        assert run.data.metrics[f"eval/arc_easy/{metric}"] == pytest.approx(value)
        assert run.data.metrics[f"eval_stderr/arc_easy/{metric}"] == pytest.approx(
            scores["stderr"][metric]
        )
    assert "eval/core" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert output.name in artifacts
