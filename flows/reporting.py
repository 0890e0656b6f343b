"""What a run shows: the Prefect artifacts (tables, funnels, the summary) and the report rows.

Stages return report rows (a :class:`StageReport` per stage); this module renders them, once, as
Prefect artifacts, the same for every stage, so that the flows only wire.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from llmflow.tasks.core import document_versions, shards
from llmflow.tasks.core.graph import StepReport
from llmflow.tasks.core.progress import artifact_key
from llmflow.tasks.core.stage import UnitRecord
from llmflow.tasks.curate import pii

_REJECTED_SAMPLE = 20


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


def unit_counts(records: list[UnitRecord]) -> dict[str, float]:
    """The funnel so far, from the units finished: what MLflow shows while a stage runs."""
    kept = sum(p.rows for r in records for p in r.parts)
    rejected = sum(p.rows for r in records for p in r.rejected)
    metrics: dict[str, float] = {
        "docs_in": sum(r.docs_in for r in records),
        "docs_kept": kept,
        "docs_rejected": rejected,
        "fetch_failures": sum(len(r.failures) for r in records),
        "bytes_out": sum(p.bytes for r in records for p in r.parts),
        "units_done": len(records),
        "units_skipped": sum(r.skipped for r in records),
    }
    reasons: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    for r in records:
        reasons.update(r.reasons)
        stats.update(r.stats)
    metrics |= {f"rejected.{k}": v for k, v in reasons.items()}
    metrics |= {f"stats.{k}": v for k, v in stats.items()}
    return metrics


def stage_metrics(
    manifest: dict[str, Any], records: list[UnitRecord], seconds: float
) -> dict[str, float]:
    counts = manifest["counts"]
    metrics = unit_counts(records)
    metrics |= {
        "seconds": seconds,
        "docs_per_s": counts["docs_in"] / seconds if seconds > 0 else 0.0,
        "units": len(records),
    }
    metrics |= {f"stats.{k}": v for k, v in manifest["stats"].items()}
    metrics |= {f"stats.{k}": v for k, v in manifest.get("work", {}).items()}
    return metrics


def counts_table(name: str, metrics: dict[str, float], run_id: str, total_units: int) -> None:
    """The stage's funnel as a Prefect table artifact (re-created as units finish)."""
    rows = [
        ("documents in", metrics["docs_in"]),
        ("kept", metrics["docs_kept"]),
        ("rejected", metrics["docs_rejected"]),
        *(
            (f"rejected: {k.removeprefix('rejected.')}", v)
            for k, v in sorted(metrics.items())
            if k.startswith("rejected.")
        ),
        ("fetch failures", metrics["fetch_failures"]),
        (
            "units done (skipped) / total",
            f"{int(metrics['units_done'])} ({int(metrics['units_skipped'])}) / {total_units}",
        ),
        ("MLflow run", run_id),
    ]
    create_table_artifact(
        key=artifact_key(f"{name}-counts"),
        table=[{"count": k, "value": int(v) if isinstance(v, float) else v} for k, v in rows],
        description=f"{name}: documents in, kept and removed, updated as units finish",
    )


def funnel_markdown(name: str, counts: dict[str, Any], run_id: str) -> str:
    """The stage's data funnel as the Prefect UI shows it: in, kept, removed per reason."""
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
    lines += [
        "",
        f"Removed documents, with their reasons, are in the stage's `rejected/` set;"
        f" MLflow run `{run_id}`.",
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
    """A one-step stage's outcome as a Prefect table artifact, like the shard stages' counts."""
    table = [{"item": k, "value": v} for k, v in rows.items() if v is not None]
    create_table_artifact(
        key=artifact_key(f"{name}-summary"),
        table=[*table, {"item": "MLflow run", "value": run_id}],
        description=f"{name}: the outcome of the step and the MLflow run that records it",
    )


def summary_markdown(reports: list[StageReport], run_id: str, tracking_uri: str) -> str:
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


def shard_stage_report(
    name: str,
    stage_dir: str,
    manifest: dict[str, Any],
    records: list[UnitRecord],
    seconds: float,
    run_id: str,
) -> StageReport:
    """A mapped stage's report, and its funnel as a Prefect markdown artifact."""
    counts = manifest["counts"]
    create_markdown_artifact(
        key=artifact_key(f"{name}-funnel"),
        markdown=funnel_markdown(name, counts, run_id),
        description=f"{name}: documents in, kept, and removed per reason",
    )
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
            key=artifact_key(f"{name}-results"),
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
