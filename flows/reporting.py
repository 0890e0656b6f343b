"""What a run shows: the Prefect artifacts (funnels, tables, the summary), the report rows, and the
names of the counts MLflow charts.

Stages return report rows (a :class:`StageReport` per stage); this module renders them, once, as
Prefect artifacts, the same for every stage, so that the flows only wire. One artifact per
purpose per stage, keyed ``NN-<stage>-<purpose>`` (NN: the stage's place in the pipeline) so that
keys sort in stage order: a mapped stage's funnel (updated in place while it runs) and progress,
a one-step stage's summary table (evaluation's results too), and the run's ``00-pipeline-summary``.
"""

from __future__ import annotations

import logging
import shlex
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast
from uuid import UUID

import httpx
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llmflow.flows.tracking import UNITS, UNITS_SKIPPED, default_tracking_uri, mlflow_page
from llmflow.tasks.core import document_versions, shards
from llmflow.tasks.core.graph import StepReport
from llmflow.tasks.core.progress import stage_key
from llmflow.tasks.core.stage import UnitRecord
from llmflow.tasks.curate import pii

_REJECTED_SAMPLE = 20
log = logging.getLogger(__name__)


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
    summary: str = ""


def live_counts(records: list[UnitRecord]) -> dict[str, Any]:
    """The funnel so far, from the units finished, shaped as a manifest's ``counts``."""
    reasons: Counter[str] = Counter()
    for r in records:
        reasons.update(r.reasons)
    rejected = sum(p.rows for r in records for p in r.rejected)
    return {
        "docs_in": sum(r.docs_in for r in records),
        "kept": sum(p.rows for r in records for p in r.parts),
        "rejected": rejected,
        "bytes": sum(p.bytes for r in records for p in r.parts),
        "rejected_by_reason": dict(reasons),
        "fetch_failures": sum(len(r.failures) for r in records),
    }


def unit_counts(records: list[UnitRecord]) -> dict[str, float]:
    """The funnel so far as MLflow metrics, logged at step = units finished while a stage runs.

    Named for MLflow 3's charts, which come in sections by name prefix, the prefixed sections
    in alphabetical order before the unprefixed ones: ``counts/`` (the funnel) first, then
    ``rejected/<reason>`` and ``stats/<counter>``; a stage's one-value summary
    (:func:`stage_metrics`) is unprefixed, after them.
    """
    counts = live_counts(records)
    metrics: dict[str, float] = {
        "counts/docs_in": counts["docs_in"],
        "counts/docs_kept": counts["kept"],
        "counts/docs_rejected": counts["rejected"],
        "counts/fetch_failures": counts["fetch_failures"],
        "counts/bytes_out": counts["bytes"],
    }
    stats: Counter[str] = Counter()
    for r in records:
        stats.update(r.stats)
    metrics |= {f"rejected/{k}": v for k, v in counts["rejected_by_reason"].items()}
    metrics |= {f"stats/{k}": v for k, v in stats.items()}
    return metrics


def stage_metrics(
    manifest: dict[str, Any], records: list[UnitRecord], seconds: float
) -> tuple[dict[str, float], dict[str, float]]:
    """A finished stage's metrics: its counts (the last point of the live curves) and its
    summary, values logged once (``units`` and ``units_skipped`` as every stage logs them)."""
    counts = manifest["counts"]
    final = unit_counts(records)
    final |= {f"stats/{k}": v for k, v in manifest["stats"].items()}
    final |= {f"stats/{k}": v for k, v in manifest.get("work", {}).items()}
    summary = {
        UNITS: len(records),
        UNITS_SKIPPED: sum(r.skipped for r in records),
        "seconds": seconds,
        "docs_per_s": counts["docs_in"] / seconds if seconds > 0 else 0.0,
    }
    return final, summary


def run_link(run_id: str, tracking_uri: str, experiment_id: str) -> str:
    """An MLflow run as markdown: a link to its page when MLflow is a server, else its id."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"[MLflow run {run_id}]({mlflow_page(tracking_uri, experiment_id, run_id)})"
    return f"MLflow run `{run_id}`"


class StageFunnel:
    """A mapped stage's data funnel as one Prefect markdown artifact (``NN-<stage>-funnel``):
    created at the first count and updated in place as units finish, so that the flow run
    lists it once, not once per update."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._id: UUID | None = None

    def publish(self, markdown: str) -> None:
        if self._id is None:
            # prefect's sync_compatible type says "or a coroutine"; called sync, a UUID
            self._id = cast(
                UUID,
                create_markdown_artifact(
                    key=stage_key(f"{self.name}-funnel", self.name),
                    markdown=markdown,
                    description=f"{self.name}: documents in, kept, and removed per reason",
                ),
            )
            return
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactUpdate

        try:
            with get_client(sync_client=True) as client:
                client.update_artifact(self._id, ArtifactUpdate(data=markdown))
        except (httpx.HTTPError, OSError) as error:  # a live count is not worth a failed stage
            log.warning("%s: could not update its funnel artifact: %s", self.name, error)


def funnel_markdown(
    name: str, counts: dict[str, Any], units: tuple[int, int, int], run: str, done: bool
) -> str:
    """The stage's data funnel as the Prefect UI shows it: in, kept, removed per reason (most
    first), the units done of ``units`` = (done, skipped, total), and the MLflow run (``run``,
    markdown) that records it."""
    total = counts["docs_in"] or 1
    lines = [
        f"# {name}: data funnel",
        "",
        "| | documents | share |",
        "|---|---:|---:|",
        f"| in | {counts['docs_in']:,} | 100% |",
        f"| kept | {counts['kept']:,} | {counts['kept'] / total:.1%} |",
    ]
    reasons = sorted(counts.get("rejected_by_reason", {}).items(), key=lambda kv: -kv[1])
    lines += [f"| removed: {reason} | {n:,} | {n / total:.1%} |" for reason, n in reasons]
    if counts.get("fetch_failures"):
        lines.append(f"| fetch failures | {counts['fetch_failures']:,} | |")
    finished, skipped, planned = units
    if not done:
        state = f"Running: {finished} of {planned} units finished ({skipped} found already done)"
    elif planned and skipped == planned:
        state = f"Nothing to do: all {planned} units were already done, as recorded in {run}."
    else:
        state = f"{finished} units: {finished - skipped} run, {skipped} found already done."
    if not (done and planned and skipped == planned):
        state += f" Recorded in {run}." if done else f"; {run}."
    lines += [
        "",
        state,
        "Removed documents, with their reasons, are in the stage's `rejected/` set.",
    ]
    return "\n".join(lines)


def rejected_sample(stage_dir: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The first rejected rows, for MLflow's ``rejected_sample.json``: the stages before pii
    store raw text, so every free-text field (text, url, detail, ...; not the id or the reason)
    leaves redacted as the pii stage would redact it, the text cut to 500 characters."""
    sample: list[dict[str, Any]] = []
    for shard in shards.manifest_shards(manifest, "rejected_shards"):
        for row in shards.read_shard(stage_dir, shard).slice(0, _REJECTED_SAMPLE).to_pylist():
            lang = row.get("lang")
            for name, value in row.items():
                if isinstance(value, str) and name not in ("id", "reason"):
                    limit = 500 if name == "text" else len(value)
                    row[name] = pii.redact_excerpt(value, limit, lang=lang)
            sample.append(row)
            if len(sample) >= _REJECTED_SAMPLE:
                return sample
    return sample


def step_table(name: str, rows: dict[str, Any], run_id: str) -> None:
    """A one-step stage's outcome as a Prefect table artifact, like the shard stages' funnel."""
    table = [{"item": k, "value": v} for k, v in rows.items() if v is not None]
    create_table_artifact(
        key=stage_key(f"{name}-summary", name),
        table=[*table, {"item": "MLflow run", "value": run_id}],
        description=f"{name}: the outcome of the step and the MLflow run that records it",
    )


def summary_markdown(
    reports: list[StageReport], run_id: str, tracking_uri: str, experiment_id: str, workdir: str
) -> str:
    """The pipeline summary: a row per stage, and the MLflow parent run: a link when MLflow is a
    server, else its id and the command that serves its page."""
    rows = []
    for r in reports:
        ran = f"{r.units - r.units_skipped}/{r.units}"
        if r.units and r.units_skipped == r.units:
            ran = f"skipped ({ran})"
        rows.append(
            f"| {r.stage} | {r.docs_in} | {r.kept} | {r.rejected} | {r.fetch_failures} | {ran} |"
            f" `{r.path}` |"
        )
    if tracking_uri.startswith(("http://", "https://")):
        where = f"The MLflow parent run: {run_link(run_id, tracking_uri, experiment_id)}."
    else:
        if tracking_uri == default_tracking_uri(workdir):
            serve = f"llmflow ui --workdir {shlex.quote(workdir)}"
        else:
            serve = f"mlflow ui --backend-store-uri {shlex.quote(tracking_uri)}"
        page = mlflow_page("", experiment_id, run_id).lstrip("/")
        where = (
            f"MLflow parent run `{run_id}` in `{tracking_uri}`: open it with `{serve}`, then"
            f" `{page}` on the MLflow address it prints."
        )
    return "\n".join(
        [
            "# llmflow pipeline",
            "",
            "| stage | in | kept | rejected | fetch failures | units run | dataset |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            where,
        ]
    )


def shard_stage_report(
    name: str,
    stage_dir: str,
    manifest: dict[str, Any],
    records: list[UnitRecord],
    seconds: float,
    run_id: str,
) -> StageReport:
    """A mapped stage's report (its funnel artifact is the stage runner's: :class:`StageFunnel`)."""
    counts = manifest["counts"]
    return StageReport(
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
        # a stage's own line (decontaminate's), or tokenize's tokens per split
        summary=manifest.get("summary")
        or ", ".join(f"{n:,} {split} tokens" for split, n in manifest.get("tokens", {}).items()),
    )


def step_stage_report(name: str, stage_dir: str, step: StepReport, seconds: float) -> StageReport:
    """A one-step stage's report, and its outcome as Prefect artifacts (a table, and the
    step's own markdown when it has one)."""
    if step.table:
        step_table(name, step.table, step.run_id)
    if step.markdown is not None:
        create_markdown_artifact(
            key=stage_key(f"{name}-results", name),
            markdown=step.markdown,
            description=step.markdown_description,
        )
    return StageReport(
        stage=name,
        docs_in=step.docs_in,
        kept=step.kept,
        rejected=step.rejected,
        fetch_failures=0,
        bytes=step.bytes,
        seconds=round(seconds, 2),
        units=1,
        units_skipped=int(step.skipped),
        rejected_by_reason=step.rejected_by_reason,
        path=stage_dir,
        mlflow_run_id=step.run_id,
        summary=step.summary,
    )


def documents_version_markdown(number: int, manifest: dict[str, Any]) -> str:
    """What a published documents version holds and what its refresh found."""
    refresh = manifest["refresh"]
    removed = ", ".join(f"{k} {v}" for k, v in refresh["removed_by_reason"].items()) or "none"
    return "\n".join(
        [
            f"# documents {document_versions.version_name(number)}",
            "",
            "| fetched | unchanged | new or changed | added | removed |",
            "|---|---|---|---|---|",
            f"| {refresh['fetched']} | {refresh['unchanged']} | {refresh['new_or_changed']}"
            f" | {refresh['added']} | {refresh['removed']} |",
            "",
            f"Removed: {removed}. {manifest['counts']['kept']} documents in this version.",
        ]
    )
