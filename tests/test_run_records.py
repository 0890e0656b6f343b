"""What a run leaves in MLflow and Prefect, and what it shows on a terminal, kept to what is read.

- MLflow: the experiment opens on its runs (MLflow 3's experiment kind); a stage that found all
  its work done adds no run when an earlier run recorded the same (a no-op re-run adds only its
  parent); metrics logged once are bars, not one-point lines, and the live counts come first.
- Prefect: one artifact per purpose per stage, keyed in stage order; the summary links the
  MLflow run, or says how to open it; the flow run's page names the MLflow run in a tag.
- A terminal: log lines print above the progress bars, not through them.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from prefect import flow
from prefect.logging.handlers import PrefectConsoleHandler
from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings
from rich.console import Console
from test_crash_resume import prose

from llmflow.flows import reporting
from llmflow.flows.tracking import (
    EXPERIMENT_KIND_TAG,
    MODEL_DEVELOPMENT,
    PipelineTracker,
    default_tracking_uri,
    flow_run_tag,
    flow_run_tags,
)
from llmflow.tasks.core import progress
from llmflow.tasks.core.shards import ShardFile
from llmflow.tasks.core.stage import UnitRecord
from llmflow.tasks.registry import GRAPH

# --- MLflow -------------------------------------------------------------------------------------


def test_the_experiment_is_marked_model_development_new_or_old(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    new = PipelineTracker(uri, "fresh", str(tmp_path))
    assert client.get_experiment(new.experiment_id).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    # made before llmflow set the tag: set when a run opens it
    old = client.create_experiment("old")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    PipelineTracker(uri, "old", str(tmp_path))
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT
    # a kind the user chose is theirs
    chosen = client.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    PipelineTracker(uri, "chosen", str(tmp_path))
    assert client.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def _stage(
    tracker: PipelineTracker, params: dict, units: int, skipped: int, tags: dict | None = None
) -> tuple[str, bool]:
    """One stage run as the flow makes one: its params, inputs, counts and manifest."""
    with tracker.stage_run("normalize", params, {"llmflow.dataset": "/d/normalize"}) as run:
        run.log_input("crawl", "/d/crawl", "f" * 64, "input")
        run.log(metrics={"counts/docs_in": 5}, step=units, tags=tags)
        run.log(metrics={"units": units, "units_skipped": skipped})
        run.log_dict({"units": units}, "manifest.json")
    return run.run_id, run.repeats


def _runs(client: MlflowClient, tracker: PipelineTracker) -> list:
    return client.search_runs([tracker.experiment_id])


def test_a_stage_that_found_its_work_done_is_recorded_once(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    tracker = PipelineTracker(uri, "e", str(tmp_path), data_root="/d")
    tracker.start_parent("first", tags={}, params={})
    worked, repeats = _stage(tracker, {"min_chars": 1}, units=2, skipped=0)
    assert not repeats
    assert client.get_run(worked).data.metrics["counts/docs_in"] == 5
    assert [i.dataset.name for i in client.get_run(worked).inputs.dataset_inputs] == ["crawl"]

    tracker.start_parent("nothing to do", tags={}, params={})
    again, repeats = _stage(tracker, {"min_chars": 1}, units=2, skipped=2)
    assert (again, repeats) == (worked, True)  # the earlier run stands for it
    assert len(_runs(client, tracker)) == 3  # two parents, one stage run

    # all skipped, but not what the earlier run recorded (another tag): recorded, once
    tracker.start_parent("other", tags={}, params={})
    other, repeats = _stage(tracker, {"min_chars": 1}, 2, 2, tags={"llmflow.x": "1"})
    assert other != worked and not repeats
    tracker.start_parent("other again", tags={}, params={})
    assert _stage(tracker, {"min_chars": 1}, 2, 2, tags={"llmflow.x": "1"}) == (other, True)
    assert len(_runs(client, tracker)) == 6
    assert client.get_run(other).data.tags[MLFLOW_PARENT_RUN_ID] != tracker.parent_run_id


def test_a_stage_run_opens_when_its_id_is_needed_or_it_fails(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    tracker = PipelineTracker(uri, "e", str(tmp_path))
    tracker.start_parent("p", tags={}, params={})
    before = int(time.time() * 1000)
    with tracker.stage_run("pretrain", {"lr": 3e-3}, {}) as run:
        run.log(metrics={"units": 1, "units_skipped": 0})
        assert not run.opened  # nothing asked for it yet
        time.sleep(0.05)
        opened = client.get_run(run.run_id)  # a training job is handed the id: it must exist
        assert opened.info.status == "RUNNING" and opened.info.start_time <= before + 20
        assert opened.data.metrics["units"] == 1  # what waited is there
    assert client.get_run(run.run_id).info.status == "FINISHED"

    with pytest.raises(RuntimeError), tracker.stage_run("sft", {}, {}) as failing:
        failing.log(metrics={"units": 1, "units_skipped": 1})
        raise RuntimeError("out of memory")
    assert client.get_run(failing.run_id).info.status == "FAILED"  # a failure is recorded


def test_counts_are_grouped_so_the_live_curves_come_first() -> None:
    """MLflow 3 draws a run's charts in sections by name prefix, the prefixed sections in
    alphabetical order before the unprefixed ("Model metrics"); a metric whose last value has
    step 0 as a bar, one with a step of 1 or more as a line."""
    part = ShardFile("a.parquet", rows=2, bytes=100, sha256="0" * 64)
    records = [
        UnitRecord("a", "k", 3, [part], [], {"too_short": 1}, {"chars": 9}, [], 0.1),
        UnitRecord("b", "k", 2, [part], [], {}, {}, [], 0.0, skipped=True),
    ]
    live = reporting.unit_counts(records)
    assert set(live) == {
        "counts/docs_in",
        "counts/docs_kept",
        "counts/docs_rejected",
        "counts/fetch_failures",
        "counts/bytes_out",
        "rejected/too_short",
        "stats/chars",
    }
    assert live["counts/docs_in"] == 5 and live["counts/docs_kept"] == 4
    assert live["rejected/too_short"] == 1
    manifest = {"counts": {"docs_in": 5}, "stats": {"chars": 9}, "work": {"reused": 1}}
    final, summary = reporting.stage_metrics(manifest, records, seconds=2.0)
    assert set(final) == set(live) | {"stats/reused"}
    assert summary == {"units": 2, "units_skipped": 1, "seconds": 2.0, "docs_per_s": 2.5}
    sections = sorted({name.split("/")[0] for name in final})
    assert sections == ["counts", "rejected", "stats"]  # the funnel's section first
    assert not any("/" in name for name in summary)  # "Model metrics": after them, as bars


# --- what Prefect shows -------------------------------------------------------------------------


def test_the_summary_links_the_mlflow_run_or_says_how_to_open_it(tmp_path: Path) -> None:
    report = reporting.StageReport("crawl", 3, 3, 0, 0, 10, 1.0, 2, 2, {}, "/d/crawl", "c1")
    served = reporting.summary_markdown(
        [report], "p1", "http://127.0.0.1:5000", experiment_id="7", workdir=str(tmp_path)
    )
    # in MLflow's model-training view: MLflow 3.18 opens the GenAI one otherwise
    page = "http://127.0.0.1:5000/#/experiments/7/runs/p1?workflowType=machine_learning"
    assert f"[MLflow run p1]({page})" in served
    assert "| crawl | 3 | 3 | 0 | 0 | skipped (0/2) |" in served
    local = reporting.summary_markdown(
        [report], "p1", default_tracking_uri(str(tmp_path)), "7", str(tmp_path)
    )
    assert f"`llmflow ui --workdir {tmp_path}`" in local
    assert "`#/experiments/7/runs/p1?workflowType=machine_learning`" in local
    elsewhere = reporting.summary_markdown([report], "p1", "sqlite:////x/m.db", "7", "/w")
    assert "`mlflow ui --backend-store-uri sqlite:////x/m.db`" in elsewhere


@pytest.mark.server
def test_the_flow_run_url_tag_is_a_real_page_or_absent(prefect_api: str) -> None:
    @flow
    def tags() -> tuple[dict[str, str], dict[str, str]]:
        with temporary_settings(restore_defaults={PREFECT_API_URL, PREFECT_UI_URL}):
            without_ui = flow_run_tags()  # Prefect's ui_url: "None/flow-runs/flow-run/<id>"
        return without_ui, flow_run_tags()

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        without_ui, with_ui = tags()
    assert "prefect.flow_run_url" not in without_ui and without_ui["prefect.flow_run_id"]
    ui = prefect_api.removesuffix("/api")
    assert with_ui["prefect.flow_run_url"] == f"{ui}/runs/flow-run/{with_ui['prefect.flow_run_id']}"


# --- a terminal ---------------------------------------------------------------------------------

_CONTROL = re.compile(r"\x1b\[(\d*)([A-Za-z])|\x1b\[\?\d+[hl]")


def screen(output: str) -> list[str]:
    """The lines a terminal shows after ``output``: carriage returns, line feeds, cursor up
    and erase-line applied; colours and cursor visibility ignored."""
    lines, row, col = [""], 0, 0
    at = 0
    while at < len(output):
        control = _CONTROL.match(output, at)
        if control:
            number, command = control.group(1), control.group(2)
            if command == "A":
                row = max(0, row - int(number or 1))
            elif command == "K" and number == "2":
                lines[row] = ""
            at = control.end()
            continue
        char = output[at]
        at += 1
        if char == "\r":
            col = 0
        elif char == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append("")
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + char + line[col + 1 :]
            col += 1
    return lines


def test_log_lines_print_above_the_progress_bars() -> None:
    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, width=100, color_system=None)
    # Prefect's own console handler, bound to the terminal as logging.yml binds it to stderr
    handler = PrefectConsoleHandler(stream=terminal)
    handler.setFormatter(logging.Formatter("%(levelname)s | %(message)s"))
    logger = logging.getLogger("llmflow.test.bars")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        with progress.bars_on(console), progress.StepProgress("x", "crawl: units", 3) as bar:
            for i in range(3):
                time.sleep(0.25)  # the bar redraws (ten times a second) between the lines
                bar.advance()
                logger.info("unit %d of 3 done", i + 1)
    finally:
        logger.removeHandler(handler)
    shown = [line.rstrip() for line in screen(terminal.getvalue()) if line.strip()]
    assert shown[:3] == [f"INFO | unit {i} of 3 done" for i in (1, 2, 3)], shown
    assert shown[3].startswith("crawl: units") and "3/3" in shown[3], shown
    assert handler.console.file is terminal  # routed back when the bars are gone


# --- a pipeline run, twice ----------------------------------------------------------------------


def _artifacts(prefect_api: str, flow_run_id: str) -> list[dict]:
    """The artifacts of a flow run and its subflows, as the Prefect API lists them."""
    import httpx

    subflows = httpx.post(
        f"{prefect_api}/flow_runs/filter",
        json={"flow_runs": {"parent_flow_run_id": {"any_": [flow_run_id]}}},
        timeout=10,
    ).json()
    ids = [flow_run_id, *(run["id"] for run in subflows)]
    return httpx.post(
        f"{prefect_api}/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": ids}, "type": {"not_any_": ["result"]}}},
        timeout=10,
    ).json()


@pytest.mark.server
def test_a_no_op_rerun_adds_one_run_and_artifacts_come_once_in_stage_order(
    prefect_api: str, tmp_path: Path
) -> None:
    import httpx

    from llmflow.flows.config import load_config
    from llmflow.flows.pipeline import run_pipeline

    paths = []
    for i in range(2):
        paths.append(tmp_path / f"doc-{i}.txt")
        paths[-1].write_text(prose(i) + "\n")
    seeds = json.dumps([str(p) for p in paths])
    config = load_config(overrides=[f"crawl.seeds={seeds}"], workdir=str(tmp_path / "work"))
    stages = ["crawl", "normalize"]
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        first = run_pipeline(config, stages=stages)
        second = run_pipeline(config, stages=stages)

    client = MlflowClient(first["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name(config.experiment)
    runs = client.search_runs([experiment.experiment_id])
    children = {
        r.data.tags["llmflow.stage"]: r for r in runs if MLFLOW_PARENT_RUN_ID in r.data.tags
    }
    assert len(runs) == 1 + 2 + 1, [r.info.run_name for r in runs]  # the re-run: its parent only
    assert set(children) == set(stages)
    assert {s["stage"]: s["mlflow_run_id"] for s in second["stages"]} == {
        name: run.info.run_id for name, run in children.items()
    }
    redo = client.get_run(second["mlflow_run_id"])
    assert redo.data.tags["llmflow.stages_skipped"] == "crawl,normalize"
    # metrics logged once are bars (step 0); the stage ran too fast for a live count
    history = client.get_metric_history(children["normalize"].info.run_id, "counts/docs_kept")
    assert [m.step for m in history] == [0]

    # the MLflow run is named on the flow run's page (a tag), and its page on the MLflow run
    flow_run_id = redo.data.tags["prefect.flow_run_id"]
    flow_run = httpx.get(f"{prefect_api}/flow_runs/{flow_run_id}", timeout=10).json()
    assert flow_run_tag(redo.info.run_id) in flow_run["tags"]
    assert redo.data.tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")

    for result in (first, second):
        found = _artifacts(prefect_api, result["prefect_flow_run_id"])
        keys = [a["key"] for a in found]
        assert len(keys) == len(set(keys)), sorted(keys)  # each once: updated, not re-created
        contents = [json.dumps(a["data"]) for a in found if a["type"] != "progress"]
        assert len(contents) == len(set(contents))  # no two say the same
        assert set(keys) == {
            "00-pipeline-summary",
            "01-crawl-funnel",
            "01-crawl-units-of-work",
            "02-normalize-funnel",
            "02-normalize-units-of-work",
        }
        for key in keys:  # the number is the stage's place in the pipeline
            number, rest = key.split("-", 1)
            named = [s for s in GRAPH.names if rest.startswith(s.replace("_", "-"))]
            assert int(number) == (GRAPH.names.index(named[0]) + 1 if named else 0), key
        summary = next(a["data"] for a in found if a["key"] == "00-pipeline-summary")
        assert f"llmflow ui --workdir {tmp_path / 'work'}" in summary
        assert result["mlflow_run_id"] in summary
    found = _artifacts(prefect_api, second["prefect_flow_run_id"])
    funnel = next(a["data"] for a in found if a["key"] == "02-normalize-funnel")
    assert "all 2 units were already done" in funnel
    assert children["normalize"].info.run_id in funnel  # the run that recorded the work


@pytest.mark.server
def test_a_one_step_stage_that_found_its_work_done_adds_no_run(
    prefect_api: str, tmp_path: Path
) -> None:
    """The tokenizer, a stage of one step that opens its MLflow run before it knows it will
    skip: run again on the same documents, it adds no run; its report names the run that
    trained it."""
    from test_crash_resume import QUALITY_OFF

    from llmflow.deployments.pipeline_deployments import DATA_STAGES
    from llmflow.flows.config import load_config
    from llmflow.flows.pipeline import run_pipeline

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"doc-{i}.txt")
        paths[-1].write_text(prose(i) + "\n")
    overrides = [
        *QUALITY_OFF[1::2],
        f"crawl.seeds={json.dumps([str(p) for p in paths])}",
        "tokenizer.vocab_size=300",
    ]
    config = load_config(overrides=overrides, workdir=str(tmp_path / "work"))
    stages = [*DATA_STAGES, "tokenizer"]
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        first = run_pipeline(config, stages=stages)
        second = run_pipeline(config, stages=stages)
    client = MlflowClient(first["mlflow_tracking_uri"])
    experiment = client.get_experiment_by_name(config.experiment)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + len(stages) + 1, [r.info.run_name for r in runs]
    trained = {s["stage"]: s for s in first["stages"]}["tokenizer"]
    again = {s["stage"]: s for s in second["stages"]}["tokenizer"]
    assert again["units_skipped"] == 1 and trained["units_skipped"] == 0
    assert again["mlflow_run_id"] == trained["mlflow_run_id"]
    assert client.get_run(trained["mlflow_run_id"]).data.metrics["vocab_size"] > 256
