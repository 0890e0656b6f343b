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
from typing import Any

from prefect import Flow, flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from llmflow.flows import reporting
from llmflow.flows.ablation import curation_ablation
from llmflow.flows.config import DataLayout, PipelineConfig, resolve_stages
from llmflow.flows.deployment_guard import check_deployment_run
from llmflow.flows.stage_runner import run_stage, task_runner
from llmflow.flows.tracking import PipelineTracker, flatten, link_flow_run, resolve_tracking_uri
from llmflow.tasks.core import document_versions, progress, run_charts
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


_CURRENT: ContextVar[_Run | None] = ContextVar("llmflow_run", default=None)


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
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if flow_run.ui_url:
        tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    parent = tracker.start_parent(
        f"{kind}-{flow_run.name}",
        tags=tags,
        params=flatten(config.model_dump(mode="json")) | {"stages": ",".join(selected)},
    )
    link_flow_run(tracker, parent)
    return _Run(config, tracker, parent)


def _finish(run: _Run) -> None:
    mapped = [asdict(r) for r in run.reports if GRAPH[r.stage].step is None]
    funnel = run_charts.data_funnel(mapped)
    if funnel is not None:
        run.tracker.log_figure(run.parent, funnel, "charts/data_funnel.png")
    run.tracker.finish(run.parent, ok=True)
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=reporting.summary_markdown(run.reports, run.parent, run.tracker.tracking_uri),
        description="Documents per stage and the MLflow run that records them",
    )


def _result(run: _Run) -> dict[str, Any]:
    return {
        "mlflow_run_id": run.parent,
        "mlflow_tracking_uri": run.tracker.tracking_uri,
        "prefect_flow_run_id": str(flow_run.id),
        "stages": [asdict(r) for r in run.reports],
        "documents": run.documents,
    }


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
        key="documents-version",
        markdown=reporting.documents_version_markdown(number, manifest),
        description="The documents version this run published: what the refresh found",
    )
    return {"version": number, "kept": manifest["counts"]["kept"], "refresh": refresh}


def _run_phase(run: _Run, selected: list[str], refresh: bool = False) -> None:
    """Run the selected stages in order; the data phase begins and publishes a documents
    version around its stages."""
    documents = [s for s in selected if s in GRAPH.document_stages]
    if documents:
        document_versions.begin(DataLayout.of(run.config).stage_dir(DOCUMENTS), refresh)
    for name in selected:
        run.reports.append(run_stage(name, run.config, run.tracker))
        if name == GRAPH.document_stages[-1]:
            run.documents = _publish_documents(run)


# Deployment runs get this bounded pool; `llmflow run` sizes it from config.max_workers.
# The ignores: prefect types task_runner as TaskRunner[PrefectFuture[Any]], a type its own
# ThreadPoolTaskRunner does not have (TaskRunner's parameter is invariant).
@flow(name="llmflow-data", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def data(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any]:
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
def train(config: PipelineConfig, stages: list[str] | None = None) -> dict[str, Any]:
    """The train phase: the tokenizer, token shards, pretraining and SFT on the documents."""
    selected = _selected("train", stages)
    with _flow_run("train", config, selected) as run:
        _run_phase(run, selected)
    return _result(run)


@flow(name="llmflow-evaluate", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def evaluate(config: PipelineConfig) -> dict[str, Any]:
    """The evaluate phase: benchmarks, held-out bits per byte and chat samples of the model."""
    selected = _selected("evaluate", None)
    with _flow_run("evaluate", config, selected) as run:
        _run_phase(run, selected)
    return _result(run)


@flow(name="llmflow-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def pipeline(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any]:
    """The whole pipeline, phase by phase, each phase a subflow; ``stages`` picks a subset.

    ``refresh``: the data phase makes a new version of the documents from what is new since the
    last one; otherwise it re-runs the newest.
    """
    selected = _selected(None, stages)
    _check_refresh(selected, refresh)
    runner = None if deployment.id else task_runner(config)
    with _flow_run("pipeline", config, selected) as run:
        for phase in PHASES:
            phase_flow = FLOWS[phase]
            chosen = [s for s in selected if GRAPH[s].phase == phase]
            if not chosen:
                continue
            subflow = phase_flow.with_options(task_runner=runner) if runner else phase_flow
            if phase == "data":
                subflow(config=config, stages=chosen, refresh=refresh)
            elif phase == "train":
                subflow(config=config, stages=chosen)
            else:
                subflow(config=config)
    return _result(run)


# Every flow by name, as the deployments name them.
FLOWS: dict[str, Flow[..., dict[str, Any]]] = {
    "pipeline": pipeline,
    "data": data,
    "train": train,
    "evaluate": evaluate,
    "curation_ablation": curation_ablation,
}


def run_pipeline(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any]:
    """Run the pipeline flow; its phases run on the task runner the config names."""
    return pipeline(config=config, stages=stages, refresh=refresh)
