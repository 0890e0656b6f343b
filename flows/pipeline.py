"""The flows: one per phase (data, train, evaluate), and the pipeline that runs them as subflows.

Wiring only. Which stages exist, in which order and phase, and what each reads is the stage
graph (:mod:`llmflow.tasks.registry`); how a stage runs is :mod:`llmflow.flows.stage_runner`;
what a run shows is :mod:`llmflow.flows.reporting`. A phase flow run on its own (a deployment) is
its own MLflow parent run and holds the data root's lock; run inside the pipeline flow, it adds
its stages' child runs to the pipeline's parent run, and the Prefect UI shows it as a subflow
with its own parameters and task runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Any, cast

from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run
from prefect.states import Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

from llmflow.flows import reporting, run_summary
from llmflow.flows.ablation import curation_ablation
from llmflow.flows.config import DataLayout, PipelineConfig, resolve_stages
from llmflow.flows.deployment_guard import check_deployment_run
from llmflow.flows.stage_runner import run_stage, task_runner
from llmflow.flows.tracking import (
    PipelineTracker,
    flatten,
    flow_run_tags,
    link_flow_run,
    resolve_tracking_uri,
)
from llmflow.tasks.core import document_versions, progress, run_charts, shards
from llmflow.tasks.core.dataset_lock import exclusive_writer
from llmflow.tasks.core.document_versions import DOCUMENTS
from llmflow.tasks.core.graph import PHASES, Phase
from llmflow.tasks.core.shards import manifest_sha256
from llmflow.tasks.registry import GRAPH


@dataclass
class _Run:
    """The MLflow parent run a flow run and its subflows share, and what their stages report."""

    config: PipelineConfig
    tracker: PipelineTracker
    parent: str
    reports: list[reporting.StageReport] = field(default_factory=list)
    documents: dict[str, Any] | None = None
    # The stages of the outermost flow: a phase flow in the pipeline sees what comes after it.
    selected: list[str] = field(default_factory=list)
    # Where the run stopped early, its data come to nothing: {"stage", "after", "cause"}.
    stopped: dict[str, Any] | None = None


_CURRENT: ContextVar[_Run | None] = ContextVar("llmflow_run", default=None)
# The run's summary artifact, keyed to sort before the stages' (NN-<stage>-...: stage_key).
SUMMARY_KEY = "00-pipeline-summary"


@contextmanager
def _flow_run(kind: str, config: PipelineConfig, selected: list[str]) -> Iterator[_Run]:
    """The run a flow belongs to: its parent flow's, or (run on its own) a new one that holds the
    data root's lock and an MLflow parent run, finished when the flow ends."""
    current = _CURRENT.get()
    if current is not None:
        yield current
        return
    check_deployment_run(config)  # a deployment run's paths: under the allowed roots, or refused
    # one writer per dataset root: refused here, before any run is recorded, if one is busy
    with exclusive_writer(config.dataset_root(), f"flow run {flow_run.name} ({flow_run.id})"):
        run = _start(kind, config, selected)
        token = _CURRENT.set(run)
        try:
            yield run
        except BaseException:
            run.tracker.finish(run.parent, ok=False)
            raise
        finally:
            _CURRENT.reset(token)
        _finish(run)


def _start(kind: str, config: PipelineConfig, selected: list[str]) -> _Run:
    tracking_uri = resolve_tracking_uri(config.mlflow_tracking_uri, config.workdir)
    tracker = PipelineTracker(
        tracking_uri, config.experiment, config.workdir, data_root=config.dataset_root()
    )
    abandoned = tracker.close_abandoned_runs()
    if abandoned:
        progress.run_logger().warning(
            "marked %d MLflow runs KILLED: an earlier run on %s was killed before finishing"
            " them (%s)",
            len(abandoned),
            config.dataset_root(),
            ", ".join(abandoned),
        )
    parent = tracker.start_parent(
        f"{kind}-{flow_run.name}",
        tags=flow_run_tags(),  # the flow run's UI page only where there is one
        params=flatten(config.model_dump(mode="json")) | {"stages": ",".join(selected)},
    )
    link_flow_run(tracker, parent)
    return _Run(config, tracker, parent)


def _finish(run: _Run) -> None:
    mapped = [asdict(r) for r in run.reports if GRAPH[r.stage].step is None]
    funnel = run_charts.data_funnel(mapped)
    if funnel is not None:
        run.tracker.log_figure(run.parent, funnel, "charts/data_funnel.png")
    # A run that found every stage done adds no stage runs (tracking.StageRun): its parent
    # still records that it ran, with what, and which stages it found complete.
    skipped = [r.stage for r in run.reports if r.units and r.units_skipped == r.units]
    if skipped:
        run.tracker.log(run.parent, tags={"llmflow.stages_skipped": ",".join(skipped)})
    run.tracker.finish(run.parent, ok=True)
    create_markdown_artifact(
        key=SUMMARY_KEY,
        markdown=reporting.summary_markdown(
            run.reports,
            run.parent,
            run.tracker.tracking_uri,
            run.tracker.experiment_id,
            run.config.workdir,
        ),
        description="Documents per stage and the MLflow run that records them",
    )


def _result(run: _Run) -> dict[str, Any] | State[dict[str, Any]]:
    """What a flow returns: the stages' reports and where the run is recorded; for a run that
    stopped early, a Failed state that carries them and says where and why it stopped (the
    flow run ends Failed with that message, and no traceback: nothing raised)."""
    result = {
        "mlflow_run_id": run.parent,
        "mlflow_tracking_uri": run.tracker.tracking_uri,
        "mlflow_experiment_id": run.tracker.experiment_id,
        "prefect_flow_run_id": str(flow_run.id),
        "stages": [asdict(r) for r in run.reports],
        "documents": run.documents,
        "last_document_stage": GRAPH.document_stages[-1],
        "stopped": run.stopped,
    }
    if run.stopped is None:
        return result
    return Failed(message=run_summary.stop_message(run.stopped), data=result)


def _selected(phase: Phase | None, stages: list[str] | None) -> list[str]:
    """The stages asked for, in graph order; a phase flow keeps those of its phase."""
    chosen = resolve_stages(",".join(stages) if stages else None)
    return [s for s in chosen if phase is None or GRAPH[s].phase == phase]


def _check_refresh(selected: list[str], refresh: bool) -> None:
    first = GRAPH.document_stages[0]
    if refresh and first not in selected:
        raise ValueError(
            f"refresh: a new documents version starts with a new {first}, but the stages"
            f" {','.join(selected)} do not include {first}"
        )


def _publish_documents(run: _Run) -> dict[str, Any]:
    """Publish the version the data phase just made and record the refresh in MLflow."""
    documents_dir = DataLayout.of(run.config).stage_dir(DOCUMENTS)
    number = document_versions.working_version(documents_dir)
    first, last = GRAPH.document_stages[0], GRAPH.document_stages[-1]
    manifest = document_versions.publish(documents_dir, number, first, last)
    refresh = manifest["refresh"]
    metrics = {"documents/version": number, "documents/kept": manifest["counts"]["kept"]}
    for key, value in refresh.items():
        if isinstance(value, dict):
            metrics |= {f"refresh/{key}/{k}": v for k, v in value.items()}
        else:
            metrics[f"refresh/{key}"] = value
    name = document_versions.version_name(number)
    tags = {
        "llmflow.documents_version": name,
        "llmflow.documents_sha256": manifest_sha256(documents_dir),
    }
    run.tracker.log(run.parent, metrics=metrics, tags=tags)
    run.tracker.log_dict(run.parent, manifest, f"documents/{name}.json")
    create_markdown_artifact(
        key=progress.stage_key("documents-version", last),
        markdown=reporting.documents_version_markdown(number, manifest),
        description="The documents version this run published: what the refresh found",
    )
    return {"version": number, "kept": manifest["counts"]["kept"], "refresh": refresh}


# MLflow keeps tag values up to 8,000 characters; a cause is cut well before.
_TAG_CHARS = 5000


def _run_phase(run: _Run, selected: list[str], refresh: bool = False) -> None:
    """Run the selected stages in order; the data phase begins and publishes a documents
    version around its stages.

    Data that comes to nothing stops the run, not a later stage's traceback: after a document
    stage that kept no documents when a later stage would read them (and no earlier version
    holds any), or before a stage that reads an empty or unpublished documents version. The
    cause goes to ``run.stopped``, the flow runs' Failed state and the MLflow parent run's
    ``llmflow.stopped`` tag (the run itself ends FINISHED: it did what its data allowed). An
    emptied version stays unpublished: a re-run resumes it, and the crawl tries a web crawl
    that met only outages again.
    """
    run.selected = run.selected or selected
    documents = [s for s in selected if s in GRAPH.document_stages]
    if documents:
        document_versions.begin(DataLayout.of(run.config).stage_dir(DOCUMENTS), refresh)
    for name in selected:
        run.stopped = _unreadable_documents(run, name)
        if run.stopped is not None:
            break
        report = run_stage(name, run.config, run.tracker)
        run.reports.append(report)
        run.stopped = _emptied(run, report)
        if run.stopped is not None:
            break
        if name == GRAPH.document_stages[-1]:
            run.documents = _publish_documents(run)
    if run.stopped is not None:  # the flow runs end Failed with this message (_result)
        message = run_summary.stop_message(run.stopped)
        run.tracker.log(run.parent, tags={"llmflow.stopped": message[:_TAG_CHARS]})


def _emptied(run: _Run, report: reporting.StageReport) -> dict[str, Any] | None:
    """Where the run stops when ``report``'s document stage kept nothing that a later stage
    needs; None when it kept some, nothing later runs, or an earlier version has documents
    (a refresh that found nothing new still publishes)."""
    name = report.stage
    later = run.selected[run.selected.index(name) + 1 :] if name in run.selected else []
    if report.kept or name not in GRAPH.document_stages or not later:
        return None
    documents_dir = DataLayout.of(run.config).stage_dir(DOCUMENTS)
    number = document_versions.working_version(documents_dir)
    previous = document_versions.previous_version(documents_dir, number)
    if previous is not None and _kept(document_versions.read_version(documents_dir, previous)):
        return None
    manifest = shards.read_manifest(report.path)
    cause = run_summary.empty_stage_cause(manifest["counts"], manifest.get("failures", []))
    return {"stage": name, "after": True, "cause": cause}


def _kept(manifest: dict[str, Any]) -> int:
    return int(manifest["counts"]["kept"])


def _unreadable_documents(run: _Run, name: str) -> dict[str, Any] | None:
    """Where the run stops when stage ``name`` reads the documents and no version of them is
    published, or the newest holds none (a train flow run on its own, as a deployment)."""
    if DOCUMENTS not in GRAPH[name].inputs:
        return None
    documents_dir = DataLayout.of(run.config).stage_dir(DOCUMENTS)
    pointer = shards.join(documents_dir, shards.MANIFEST_NAME)
    if not shards.exists(pointer):
        first, last = GRAPH.document_stages[0], GRAPH.document_stages[-1]
        cause = f"no documents version is published in {documents_dir}; run {first} … {last}"
    else:
        manifest = shards.read_json(pointer)
        if _kept(manifest):
            return None
        version = document_versions.version_name(manifest["version"])
        cause = f"the documents version {version} in {documents_dir} holds no documents"
    return {"stage": name, "after": False, "cause": cause}


# Deployment runs get this bounded pool; `llmflow run` sizes it from config.max_workers.
# The ignores: prefect types task_runner as TaskRunner[PrefectFuture[Any]], a type its own
# ThreadPoolTaskRunner does not have (TaskRunner's parameter is invariant).
@flow(name="llmflow-data", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def data(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any] | State[dict[str, Any]]:
    """The data phase: crawl to the curated documents, published as a new documents version.

    ``refresh``: a new version from what is new since the last one (an unfinished version is
    finished first); otherwise the stages re-run the newest version.
    """
    selected = _selected("data", stages)
    _check_refresh(selected, refresh)
    with _flow_run("data", config, selected) as run:
        _run_phase(run, selected, refresh)
    return _result(run)


@flow(name="llmflow-train", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def train(
    config: PipelineConfig, stages: list[str] | None = None
) -> dict[str, Any] | State[dict[str, Any]]:
    """The train phase: the tokenizer, token shards, pretraining and SFT on the documents."""
    selected = _selected("train", stages)
    with _flow_run("train", config, selected) as run:
        _run_phase(run, selected)
    return _result(run)


@flow(name="llmflow-evaluate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def evaluate(config: PipelineConfig) -> dict[str, Any] | State[dict[str, Any]]:
    """The evaluate phase: benchmarks, held-out bits per byte and chat samples of the model."""
    selected = _selected("evaluate", None)
    with _flow_run("evaluate", config, selected) as run:
        _run_phase(run, selected)
    return _result(run)


@flow(name="llmflow-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def pipeline(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any] | State[dict[str, Any]]:
    """The whole pipeline, phase by phase, each phase a subflow; ``stages`` picks a subset.

    ``refresh``: the data phase makes a new version of the documents from what is new since the
    last one; otherwise it re-runs the newest.

    A phase whose data comes to nothing ends the run there: that phase's flow run and this one
    end Failed with a message that names the stage and the cause; no later phase runs.
    """
    selected = _selected(None, stages)
    _check_refresh(selected, refresh)
    runner = None if deployment.id else task_runner(config)
    with _flow_run("pipeline", config, selected) as run:
        run.selected = selected
        for phase in PHASES:
            phase_flow = FLOWS[phase]
            chosen = [s for s in selected if GRAPH[s].phase == phase]
            if not chosen:
                continue
            subflow = phase_flow.with_options(task_runner=runner) if runner else phase_flow
            parameters: dict[str, Any] = {"config": config}
            if phase != "evaluate":
                parameters["stages"] = chosen
            if phase == "data":
                parameters["refresh"] = refresh
            # the state, not the result: a phase that stopped early ends Failed without raising
            state = cast(State[Any], subflow(**parameters, return_state=True))
            if run.stopped is not None:
                break
            state.result()  # a phase that failed fails the pipeline with the phase's error
    return _result(run)


# Every flow by name, as the deployments name them.
FLOWS: dict[str, Flow[..., Any]] = {
    "pipeline": pipeline,
    "data": data,
    "train": train,
    "evaluate": evaluate,
    "curation_ablation": curation_ablation,
}


def run_pipeline(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any]:
    """Run the pipeline flow; its phases run on the task runner the config names.

    The result of a run that stopped early has ``stopped`` set (its flow run ended Failed,
    nothing raised); a run that failed raises its error.
    """
    # prefect's overloads type a call with return_state=True by the flow's return type
    state = cast(
        State[Any], pipeline(config=config, stages=stages, refresh=refresh, return_state=True)
    )
    result = state.result(raise_on_failure=False)
    if isinstance(result, dict):
        return result
    state.result()  # raises the run's error
    raise RuntimeError(f"flow run ended {state.type.value} without a result: {state.message}")
