"""How the flow runs any stage of the graph: one code path per shape, none per stage.

A stage that maps over units is planned, its task mapped over the units on the flow's task
runner (grouped into batches when there are many: :mod:`llmflow.flows.unit_batches`; with
progress, and live counts in MLflow and Prefect while units finish), its manifest written; a
one-step stage is handed a :class:`~llmflow.tasks.core.graph.StageContext` and runs itself. Both
open their MLflow child run the same way (:meth:`PipelineTracker.stage_run`, with the datasets
they read logged as its inputs) and report through :mod:`llmflow.flows.reporting`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from prefect import Task
from prefect.task_runners import ThreadPoolTaskRunner

from llmflow.flows import reporting
from llmflow.flows.config import DataLayout, PipelineConfig, StageLayout
from llmflow.flows.tracking import UNITS_SKIPPED, PipelineTracker, StageRun
from llmflow.flows.unit_batches import map_units, units_per_batch
from llmflow.tasks.core import document_versions, shards
from llmflow.tasks.core.document_versions import DOCUMENTS
from llmflow.tasks.core.graph import Stage, StageContext
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.progress import StepProgress, stage_key
from llmflow.tasks.core.shards import manifest_sha256
from llmflow.tasks.core.stage import UnitRecord, WorkUnit
from llmflow.tasks.registry import GRAPH

_LIVE_INTERVAL_S = 3.0
# Stages whose inputs are what the model is trained on (MLflow's dataset context "training").
_TRAINING_CONTEXT = ("pretrain", "sft")


def record_inputs(name: str, layout: StageLayout, run: StageRun) -> None:
    """The datasets a stage reads, as the MLflow run's inputs (digest: the manifest's sha256),
    and the version of the documents its output comes from (tag ``llmflow.documents_version``;
    for a model, also an input: the version's manifest, with that version's digest)."""
    context = "training" if name in _TRAINING_CONTEXT else "input"
    stage = GRAPH[name]
    for source in (*stage.inputs, *stage.side_inputs):
        source_dir = layout.stage_dir(source)
        run.log_input(source, source_dir, manifest_sha256(source_dir), context)
    if not layout.versioned:
        return
    documents_dir = layout.stage_dir(DOCUMENTS)
    version: int | None
    if name in GRAPH.document_stages:
        version = document_versions.working_version(documents_dir)
    else:
        digest = _documents_digest(layout, stage)
        version = document_versions.version_with_digest(documents_dir, digest) if digest else None
        if digest and version is not None and DOCUMENTS not in stage.inputs:
            path = document_versions.version_path(documents_dir, version)
            run.log_input(DOCUMENTS, path, digest, context)
    if version is not None:
        run.log(tags={"llmflow.documents_version": document_versions.version_name(version)})


def _documents_digest(layout: StageLayout, stage: Stage) -> str | None:
    """The digest of the documents a later stage works from: the newest version for the stages
    that read the documents; for those after them, the one the token shards were cut from (a
    model trained before a refresh names the older version)."""
    documents_dir = layout.stage_dir(DOCUMENTS)
    if DOCUMENTS in stage.inputs:
        if shards.exists(shards.join(documents_dir, shards.MANIFEST_NAME)):
            return manifest_sha256(documents_dir)
        return None
    tokenize_manifest = shards.join(layout.stage_dir("tokenize"), shards.MANIFEST_NAME)
    if shards.exists(tokenize_manifest):
        return shards.read_json(tokenize_manifest)["input_manifest_sha256"]
    return None


def stage_config(config: PipelineConfig, layout: StageLayout, name: str) -> Any:
    """A stage's config as this run uses it: the pipeline's field of that name (the stage's
    defaults when the pipeline config has none), adjusted by the stage's ``configure``."""
    stage = GRAPH[name]
    settings = getattr(config, name, None) or stage.config()
    if stage.configure is None:
        return settings
    return stage.configure(_context(name, config, layout, None), settings)


def _context(
    name: str, config: PipelineConfig, layout: StageLayout, tracker: PipelineTracker | None
) -> StageContext:
    @contextmanager
    def start_run(
        params: dict[str, Any], tags: dict[str, str], log_inputs: bool = True
    ) -> Iterator[StageRun]:
        assert tracker is not None, "a stage run needs the run's tracker"
        tags = {"llmflow.code_version": GRAPH[name].spec.code_version()} | tags
        with tracker.stage_run(name, params, tags) as run:
            if log_inputs:
                record_inputs(name, layout, run)
            yield run

    return StageContext(
        name=name,
        config=config,
        stage_dir=layout.stage_dir,
        stage_config=lambda other: stage_config(config, layout, other),
        start_run=start_run,
    )


def run_stage(
    name: str,
    config: PipelineConfig,
    tracker: PipelineTracker,
    layout: StageLayout | None = None,
) -> reporting.StageReport:
    """Run one stage of the graph, whatever its shape, and report it; its datasets live where
    ``layout`` says (default: the config's data root and documents version)."""
    stage = GRAPH[name]
    ctx = _context(name, config, layout or DataLayout.of(config), tracker)
    started = time.perf_counter()
    if stage.step is not None:
        step = stage.step(ctx)
        return reporting.step_stage_report(name, ctx.dir, step, time.perf_counter() - started)
    return _run_mapped(stage, ctx, started)


def _run_mapped(stage: Stage, ctx: StageContext, started: float) -> reporting.StageReport:
    """Plan the units, map the task over them (in batches when there are many: the prepare
    hooks' mapped steps too), write the manifest; live counts as units end."""
    assert stage.plan is not None
    name, settings, stage_dir = stage.name, ctx.settings, ctx.dir
    units, input_digest = stage.plan(ctx)

    def map_task(
        task: Task[..., Any],
        items: list[WorkUnit],
        label: str,
        on_result: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        size = ctx.config.units_per_task or units_per_batch(len(items), ctx.config.max_workers)
        results: list[Any] = []
        with StepProgress(stage_key(label, name), label, len(items)) as progress:
            for done in map_units(task, items, settings, stage_dir, size):
                results.extend(done)
                progress.advance(len(done))
                if on_result is not None:
                    on_result(results)
        return results

    params = settings.model_dump(mode="json")
    funnel = reporting.StageFunnel(name)
    with ctx.start_run(params, {"llmflow.dataset": stage_dir}) as run:
        last_live = [time.monotonic()]  # a stage done within the interval draws no curve
        live_steps = [0]

        def live(records: list[UnitRecord]) -> None:
            """Every counter in MLflow and Prefect while the stage runs, every few seconds, once
            a unit did work (units found done are counted, but open no run on their own)."""
            if len(records) == len(units) or time.monotonic() - last_live[0] < _LIVE_INTERVAL_S:
                return
            if all(r.skipped for r in records):
                return
            last_live[0] = time.monotonic()
            run.log(metrics=reporting.unit_counts(records), step=len(records))
            live_steps[0] = len(records)
            skipped = sum(r.skipped for r in records)
            link = reporting.run_link(run.run_id, run.tracking_uri, run.experiment_id)
            counts = reporting.live_counts(records)
            units_now = (len(records), skipped, len(units))
            funnel.publish(reporting.funnel_markdown(name, counts, units_now, link, done=False))

        if stage.prepare is not None:
            stage.prepare(units, settings, stage_dir, map_task)
        records: list[UnitRecord] = map_task(stage.task, units, f"{name}: units of work", live)
        if stage.finish is not None:
            manifest = stage.finish(units, settings, stage_dir, records, input_digest)
        else:
            manifest = finalize_stage(stage_dir, stage.spec, settings, records, input_digest)
        seconds = time.perf_counter() - started
        final, summary = reporting.stage_metrics(manifest, records, seconds)
        # the curve's last point where there is a curve; else values logged once (a bar)
        step = len(records) if live_steps[0] else 0
        run.log(
            metrics=final,
            tags={"llmflow.manifest_sha256": manifest_sha256(stage_dir)},
            step=step,
        )
        run.log(metrics=summary)
        run.log_dict(manifest, "manifest.json")
        if stage.report is not None:
            stage.report(run, units, settings, stage_dir)
        run.log_dict(reporting.rejected_sample(stage_dir, manifest), "rejected_sample.json")
    link = reporting.run_link(run.run_id, run.tracking_uri, run.experiment_id)
    skipped = int(summary[UNITS_SKIPPED])
    units_done = (len(records), skipped, len(units))
    funnel.publish(reporting.funnel_markdown(name, manifest["counts"], units_done, link, done=True))
    return reporting.shard_stage_report(name, stage_dir, manifest, records, seconds, run.run_id)


def task_runner(config: PipelineConfig) -> Any:
    """The task runner the config asks for, sized by ``max_workers``."""
    if config.runner == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=config.max_workers)
    if config.runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as error:
            raise ImportError(
                "runner=dask needs prefect-dask: pip install 'llmflow[dask]'"
            ) from error
        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        return DaskTaskRunner(
            cluster_kwargs={
                "n_workers": config.max_workers,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
            }
        )
    return ThreadPoolTaskRunner(max_workers=config.max_workers)
