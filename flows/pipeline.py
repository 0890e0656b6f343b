"""The pipeline flow: which stage runs after which, on which task runner, tracked where.

Wiring only. A stage's work lives in its ``tasks/`` module; how units are skipped, written and
counted lives in ``tasks/stage.py``; this file plans each stage's units, maps the stage's task over
them, and records the outcome in MLflow (a child run per stage) and Prefect (artifacts).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from prefect import Task, flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from llmflow.flows.config import STAGES, PipelineConfig, resolve_stages
from llmflow.flows.tracking import PipelineTracker, flatten, resolve_tracking_uri
from llmflow.tasks import crawl, datasets, normalize
from llmflow.tasks.progress import StepProgress
from llmflow.tasks.stage import (
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    finalize_stage,
    manifest_sha256,
    plan_shard_units,
)

_REJECTED_SAMPLE = 20


@dataclass(frozen=True)
class StageWiring:
    """What the flow needs to know of a stage: its identity, its task and how to plan its units."""

    spec: StageSpec
    task: Task[..., UnitRecord]
    plan: Callable[[PipelineConfig], tuple[list[WorkUnit], str | None]]


def _plan_after(
    previous: str, stage: str
) -> Callable[[PipelineConfig], tuple[list[WorkUnit], str]]:
    def plan(config: PipelineConfig) -> tuple[list[WorkUnit], str]:
        spec = WIRING[stage].spec
        return plan_shard_units(spec, getattr(config, stage), config.stage_dir(previous))

    return plan


WIRING: dict[str, StageWiring] = {
    "crawl": StageWiring(
        crawl.STAGE, crawl.crawl_unit, lambda c: (crawl.plan_crawl_units(c.crawl), None)
    ),
    "normalize": StageWiring(
        normalize.STAGE, normalize.normalize_shard, _plan_after("crawl", "normalize")
    ),
}
assert tuple(WIRING) == STAGES, "every stage in STAGES needs its wiring, in the same order"


@dataclass
class StageReport:
    """One stage's outcome, for the summary table and the flow's return value."""

    stage: str
    docs_in: int
    kept: int
    rejected: int
    fetch_failures: int
    bytes: int
    seconds: float
    units: int
    units_skipped: int
    rejected_by_reason: dict[str, int]
    path: str
    mlflow_run_id: str


def _stage_metrics(
    manifest: dict[str, Any], records: list[UnitRecord], seconds: float
) -> dict[str, float]:
    counts = manifest["counts"]
    metrics: dict[str, float] = {
        "docs_in": counts["docs_in"],
        "docs_kept": counts["kept"],
        "docs_rejected": counts["rejected"],
        "fetch_failures": counts["fetch_failures"],
        "bytes_out": counts["bytes"],
        "seconds": seconds,
        "docs_per_s": counts["docs_in"] / seconds if seconds > 0 else 0.0,
        "units": len(records),
        "units_skipped": sum(r.skipped for r in records),
    }
    metrics |= {f"rejected.{k}": v for k, v in counts["rejected_by_reason"].items()}
    metrics |= {f"stats.{k}": v for k, v in manifest["stats"].items()}
    return metrics


def _rejected_sample(stage_dir: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    sample: list[dict[str, Any]] = []
    for shard in datasets.manifest_shards(manifest, "rejected_shards"):
        for row in datasets.read_shard(stage_dir, shard).slice(0, _REJECTED_SAMPLE).to_pylist():
            row["text"] = row["text"][:500]
            sample.append(row)
            if len(sample) >= _REJECTED_SAMPLE:
                return sample
    return sample


def run_stage(name: str, config: PipelineConfig, tracker: PipelineTracker) -> StageReport:
    """Plan, run and record one stage."""
    wiring = WIRING[name]
    stage_config: StageConfig = getattr(config, name)
    stage_dir = config.stage_dir(name)
    units, input_digest = wiring.plan(config)
    run_id = tracker.start_child(
        name,
        params=flatten(stage_config.model_dump(mode="json")),
        tags={"llmflow.code_version": wiring.spec.code_version(), "llmflow.dataset": stage_dir},
    )
    started = time.perf_counter()
    try:
        futures = wiring.task.map(units, unmapped(stage_config), unmapped(stage_dir))
        records: list[UnitRecord] = []
        with StepProgress(f"{name}-units", f"{name}: units of work", len(units)) as progress:
            for future in as_completed(futures):
                records.append(future.result())
                progress.advance()
        manifest = finalize_stage(stage_dir, wiring.spec, stage_config, records, input_digest)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    seconds = time.perf_counter() - started
    tracker.log(
        run_id,
        metrics=_stage_metrics(manifest, records, seconds),
        tags={"llmflow.manifest_sha256": manifest_sha256(stage_dir)},
    )
    tracker.log_dict(run_id, manifest, "manifest.json")
    tracker.log_dict(run_id, _rejected_sample(stage_dir, manifest), "rejected_sample.json")
    tracker.finish(run_id, ok=True)
    counts = manifest["counts"]
    report = StageReport(
        stage=name,
        docs_in=counts["docs_in"],
        kept=counts["kept"],
        rejected=counts["rejected"],
        fetch_failures=counts["fetch_failures"],
        bytes=counts["bytes"],
        seconds=round(seconds, 2),
        units=len(records),
        units_skipped=sum(r.skipped for r in records),
        rejected_by_reason=counts["rejected_by_reason"],
        path=stage_dir,
        mlflow_run_id=run_id,
    )
    create_table_artifact(
        key=f"{name}-counts",
        table=[
            {"count": k, "value": v}
            for k, v in [
                ("documents in", report.docs_in),
                ("kept", report.kept),
                ("rejected", report.rejected),
                *((f"rejected: {r}", n) for r, n in report.rejected_by_reason.items()),
                ("fetch failures", report.fetch_failures),
                (
                    "units done / skipped",
                    f"{report.units - report.units_skipped} / {report.units_skipped}",
                ),
                ("MLflow run", run_id),
            ]
        ],
        description=f"{name}: documents in, kept and removed (dataset {stage_dir})",
    )
    return report


@flow(name="llmflow-pipeline", log_prints=True)
def pipeline(config: PipelineConfig, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline's stages in order on ``config``; ``stages`` picks a subset."""
    selected = resolve_stages(",".join(stages) if stages else None)
    tracking_uri = resolve_tracking_uri(config.mlflow_tracking_uri, config.workdir)
    tracker = PipelineTracker(tracking_uri, config.experiment, config.workdir)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    if flow_run.ui_url:
        tags["prefect.flow_run_url"] = str(flow_run.ui_url)
    parent = tracker.start_parent(
        f"pipeline-{flow_run.name}",
        tags=tags,
        params=flatten(config.model_dump(mode="json")) | {"stages": ",".join(selected)},
    )
    reports: list[StageReport] = []
    try:
        for name in selected:
            reports.append(run_stage(name, config, tracker))
    except BaseException:
        tracker.finish(parent, ok=False)
        raise
    tracker.finish(parent, ok=True)
    create_markdown_artifact(
        key="pipeline-summary",
        markdown=_summary_markdown(reports, parent, tracking_uri),
        description="Documents per stage and the MLflow run that records them",
    )
    return {
        "mlflow_run_id": parent,
        "mlflow_tracking_uri": tracking_uri,
        "prefect_flow_run_id": str(flow_run.id),
        "stages": [asdict(r) for r in reports],
    }


def _summary_markdown(reports: list[StageReport], run_id: str, tracking_uri: str) -> str:
    rows = [
        f"| {r.stage} | {r.docs_in} | {r.kept} | {r.rejected} | {r.fetch_failures} |"
        f" {r.units - r.units_skipped}/{r.units} | `{r.path}` |"
        for r in reports
    ]
    return "\n".join(
        [
            "# llmflow pipeline",
            "",
            "| stage | in | kept | rejected | fetch failures | units run | dataset |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"MLflow parent run `{run_id}` on `{tracking_uri}`.",
        ]
    )


def run_pipeline(config: PipelineConfig, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the flow with a task runner sized by the config (threads; Dask comes later)."""
    runner = ThreadPoolTaskRunner(max_workers=config.max_workers)
    return pipeline.with_options(task_runner=runner)(config=config, stages=stages)
