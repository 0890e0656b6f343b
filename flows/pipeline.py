"""The pipeline flow: which stage runs after which, on which task runner, tracked where.

Wiring only. A stage's work lives in its ``tasks/`` module; how units are skipped, written and
counted lives in ``tasks/core/stage.py``; this file plans each stage's units, maps the stage's task
over
them, and records the outcome in MLflow (a child run per stage) and Prefect (artifacts).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prefect import Task, flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import unmapped

from llmflow.flows import run_charts
from llmflow.flows.config import (
    DOCUMENT_STAGES,
    STAGES,
    PipelineConfig,
    resolve_stages,
    stage_inputs,
)
from llmflow.flows.deployment_guard import check_deployment_run
from llmflow.flows.tracking import PipelineTracker, flatten, resolve_tracking_uri
from llmflow.tasks.core import document_versions, progress, shards
from llmflow.tasks.core.dataset_lock import exclusive_writer
from llmflow.tasks.core.progress import StepProgress, artifact_key, progress_per_task
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    finalize_stage,
    manifest_sha256,
    plan_shard_units,
    unit_key,
)
from llmflow.tasks.curate import dedup, normalize, pii, quality, toxicity
from llmflow.tasks.evaluate import evaluation
from llmflow.tasks.ingest import crawl
from llmflow.tasks.train import bpe_tokenizer, pretrain, sft, tokenize
from llmflow.tasks.train.train_config import TrainJob
from llmflow.tasks.train.train_metrics import read_metrics

_REJECTED_SAMPLE = 20
_LIVE_INTERVAL_S = 3.0


TaskMapper = Callable[[Task[..., Any], list[WorkUnit], str], list[Any]]


@dataclass(frozen=True)
class StageWiring:
    """What the flow needs to know of a stage: its identity, its task and how to plan its units.

    ``prepare`` runs before the units when a stage needs a step over all of its input first
    (dedup: signatures, then the global resolve); ``finish`` replaces the plain manifest step
    when a stage has more to record (dedup: the resolve counts and the persistent index).
    """

    spec: StageSpec
    task: Task[..., UnitRecord]
    plan: Callable[[PipelineConfig], tuple[list[WorkUnit], str | None]]
    prepare: Callable[[list[WorkUnit], Any, str, TaskMapper], None] | None = None
    # finish gets the input manifest's digest; None for a source stage (crawl reads no manifest)
    finish: Callable[[list[WorkUnit], Any, str, list[UnitRecord], str | None], dict] | None = None


def _previous(stage: str) -> str:
    return STAGES[STAGES.index(stage) - 1]


def _plan_tokenize(config: PipelineConfig) -> tuple[list[WorkUnit], str]:
    """Token shards are cut from the documents' newest version with the tokenizer trained on it."""
    return tokenize.plan_tokenize_units(
        config.tokenize,
        config.stage_dir(document_versions.DOCUMENTS),
        config.stage_dir("tokenizer"),
    )


def _stage_config(config: PipelineConfig, name: str) -> Any:
    """A stage's config as the pipeline runs it: dedup's index defaults to one folder shared by
    every version of the documents, so each refresh is checked against all that was kept."""
    stage_config = getattr(config, name)
    if name == "dedup" and stage_config.index_dir is None:
        index_dir = shards.join(
            config.stage_dir(document_versions.DOCUMENTS), document_versions.INDEX_DIR
        )
        stage_config = stage_config.model_copy(update={"index_dir": index_dir})
    return stage_config


def _plan_crawl(config: PipelineConfig) -> tuple[list[WorkUnit], None]:
    """A refresh plans only what may be new: the web again, files that changed."""
    previous = crawl.previous_crawl(config.stage_dir("crawl"))
    return crawl.plan_crawl_units(config.crawl, previous), None


def _plan_dedup(config: PipelineConfig) -> tuple[list[WorkUnit], str]:
    """Checked against the shared index, less the documents this version withdraws."""
    return dedup.plan_dedup_units(
        _stage_config(config, "dedup"),
        config.stage_dir(_previous("dedup")),
        config.stage_dir("dedup"),
        withdrawn=shards.join(config.stage_dir("crawl"), document_versions.WITHDRAWN_NAME),
    )


def _plan_after(stage: str) -> Callable[[PipelineConfig], tuple[list[WorkUnit], str]]:
    def plan(config: PipelineConfig) -> tuple[list[WorkUnit], str]:
        spec = WIRING[stage].spec
        return plan_shard_units(spec, getattr(config, stage), config.stage_dir(_previous(stage)))

    return plan


def _prepare_dedup(
    units: list[WorkUnit], config: dedup.DedupConfig, stage_dir: str, map_task: TaskMapper
) -> None:
    """dedup's steps over the whole input: signatures per shard (mapped), then one resolve."""
    if dedup.all_complete(units, stage_dir):
        return
    reused = map_task(dedup.signatures_shard, units, "dedup: signatures")
    dedup.resolve_task(units, config, stage_dir, sum(bool(r) for r in reused))


def _plan_toxicity(config: PipelineConfig) -> tuple[list[WorkUnit], str]:
    """A detoxify checkpoint that is not on disk is an error before any work is fanned out."""
    if config.toxicity.backend == "detoxify":
        toxicity.resolve_detoxify_checkpoint(config.toxicity)
    return _plan_after("toxicity")(config)


WIRING: dict[str, StageWiring] = {
    "crawl": StageWiring(crawl.STAGE, crawl.crawl_unit, _plan_crawl, finish=crawl.finish),
    "normalize": StageWiring(normalize.STAGE, normalize.normalize_shard, _plan_after("normalize")),
    "quality": StageWiring(quality.STAGE, quality.quality_shard, _plan_after("quality")),
    "dedup": StageWiring(
        dedup.STAGE,
        dedup.dedup_shard,
        _plan_dedup,
        prepare=_prepare_dedup,
        finish=dedup.finish,
    ),
    "toxicity": StageWiring(toxicity.STAGE, toxicity.toxicity_shard, _plan_toxicity),
    "pii": StageWiring(pii.STAGE, pii.pii_shard, _plan_after("pii")),
    "tokenize": StageWiring(
        tokenize.STAGE, tokenize.tokenize_shard, _plan_tokenize, finish=tokenize.finish
    ),
}


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


def _unit_counts(records: list[UnitRecord]) -> dict[str, float]:
    """The funnel so far, from the units finished: what MLflow shows while a stage runs."""
    kept = sum(r.shard.rows for r in records)
    rejected = sum(r.rejected.rows for r in records if r.rejected)
    metrics: dict[str, float] = {
        "docs_in": sum(r.docs_in for r in records),
        "docs_kept": kept,
        "docs_rejected": rejected,
        "fetch_failures": sum(len(r.failures) for r in records),
        "bytes_out": sum(r.shard.bytes for r in records),
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


def _stage_metrics(
    manifest: dict[str, Any], records: list[UnitRecord], seconds: float
) -> dict[str, float]:
    counts = manifest["counts"]
    metrics = _unit_counts(records)
    metrics |= {
        "seconds": seconds,
        "docs_per_s": counts["docs_in"] / seconds if seconds > 0 else 0.0,
        "units": len(records),
    }
    metrics |= {f"stats.{k}": v for k, v in manifest["stats"].items()}
    metrics |= {f"stats.{k}": v for k, v in manifest.get("work", {}).items()}
    return metrics


def _counts_table(name: str, metrics: dict[str, float], run_id: str, total_units: int) -> None:
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
        key=f"{name}-counts",
        table=[{"count": k, "value": int(v) if isinstance(v, float) else v} for k, v in rows],
        description=f"{name}: documents in, kept and removed, updated as units finish",
    )


def _funnel_markdown(name: str, counts: dict[str, Any], run_id: str) -> str:
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


def _rejected_sample(stage_dir: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
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


def _log_inputs(name: str, config: PipelineConfig, tracker: PipelineTracker, run_id: str) -> None:
    """The datasets a stage reads, as the MLflow run's inputs (digest: the manifest's sha256),
    and the version of the documents its output comes from (tag ``llmflow.documents_version``;
    for a model, also an input: the version's manifest, with that version's digest)."""
    context = "training" if name in ("pretrain", "sft") else "input"
    sources = stage_inputs(name)
    for source in sources:
        source_dir = config.stage_dir(source)
        tracker.log_input(run_id, source, source_dir, manifest_sha256(source_dir), context)
    documents_dir = config.stage_dir(document_versions.DOCUMENTS)
    version: int | None
    if name in DOCUMENT_STAGES:
        version = document_versions.working_version(documents_dir)
    else:
        digest = _documents_digest(config, name)
        version = document_versions.version_with_digest(documents_dir, digest) if digest else None
        if digest and version is not None and document_versions.DOCUMENTS not in sources:
            path = document_versions.version_path(documents_dir, version)
            tracker.log_input(run_id, document_versions.DOCUMENTS, path, digest, context)
    if version is not None:
        tag = document_versions.version_name(version)
        tracker.log(run_id, tags={"llmflow.documents_version": tag})


def _documents_digest(config: PipelineConfig, name: str) -> str | None:
    """The digest of the documents a later stage works from: the newest version for the
    tokenizer and token shards; for training and evaluation the one the token shards were cut
    from (a model trained before a refresh names the older version)."""
    documents_dir = config.stage_dir(document_versions.DOCUMENTS)
    if name in ("tokenizer", "tokenize"):
        if shards.exists(shards.join(documents_dir, shards.MANIFEST_NAME)):
            return manifest_sha256(documents_dir)
        return None
    tokenize_manifest = shards.join(config.stage_dir("tokenize"), shards.MANIFEST_NAME)
    if shards.exists(tokenize_manifest):
        return shards.read_json(tokenize_manifest)["input_manifest_sha256"]
    return None


def run_stage(name: str, config: PipelineConfig, tracker: PipelineTracker) -> StageReport:
    """Plan, run and record one stage."""
    wiring = WIRING[name]
    stage_config: StageConfig = _stage_config(config, name)
    stage_dir = config.stage_dir(name)
    units, input_digest = wiring.plan(config)
    run_id = tracker.start_child(
        name,
        params=flatten(stage_config.model_dump(mode="json")),
        tags={"llmflow.code_version": wiring.spec.code_version(), "llmflow.dataset": stage_dir},
    )
    started = time.perf_counter()
    _log_inputs(name, config, tracker, run_id)

    def map_task(
        task: Task[..., Any],
        items: list[WorkUnit],
        label: str,
        on_result: Callable[[list[Any]], None] | None = None,
    ) -> list[Any]:
        futures = task.map(items, unmapped(stage_config), unmapped(stage_dir))
        results: list[Any] = []
        with StepProgress(artifact_key(label), label, len(items)) as progress:
            for future in as_completed(futures):
                results.append(future.result())
                progress.advance()
                if on_result is not None:
                    on_result(results)
        return results

    last_live = [0.0]

    def live(records: list[UnitRecord]) -> None:
        """Every counter in MLflow and Prefect while the stage runs, at most every few seconds."""
        if len(records) < len(units) and time.monotonic() - last_live[0] >= _LIVE_INTERVAL_S:
            last_live[0] = time.monotonic()
            metrics = _unit_counts(records)
            tracker.log(run_id, metrics=metrics, step=len(records))
            _counts_table(name, metrics, run_id, len(units))

    try:
        if wiring.prepare is not None:
            wiring.prepare(units, stage_config, stage_dir, map_task)
        records: list[UnitRecord] = map_task(wiring.task, units, f"{name}: units of work", live)
        if wiring.finish is not None:
            manifest = wiring.finish(units, stage_config, stage_dir, records, input_digest)
        else:
            manifest = finalize_stage(stage_dir, wiring.spec, stage_config, records, input_digest)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    seconds = time.perf_counter() - started
    metrics = _stage_metrics(manifest, records, seconds)
    tracker.log(
        run_id,
        metrics=metrics,
        tags={"llmflow.manifest_sha256": manifest_sha256(stage_dir)},
        step=len(records),
    )
    tracker.log_dict(run_id, manifest, "manifest.json")
    tracker.log_dict(run_id, _rejected_sample(stage_dir, manifest), "rejected_sample.json")
    tracker.finish(run_id, ok=True)
    _counts_table(name, metrics, run_id, len(units))
    counts = manifest["counts"]
    create_markdown_artifact(
        key=f"{name}-funnel",
        markdown=_funnel_markdown(name, counts, run_id),
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
        # tokenize's manifest counts tokens per split too
        summary=", ".join(
            f"{n:,} {split} tokens" for split, n in manifest.get("tokens", {}).items()
        ),
    )


def _step_report(
    name: str, config: PipelineConfig, run_id: str, seconds: float, skipped: bool, **fields: Any
) -> StageReport:
    """A report for a stage that is one step over its whole input (no units, no rejections)."""
    base: dict[str, Any] = {
        "docs_in": 0,
        "kept": 0,
        "rejected": 0,
        "fetch_failures": 0,
        "bytes": 0,
        "rejected_by_reason": {},
    }
    return StageReport(
        stage=name,
        seconds=round(seconds, 2),
        units=1,
        units_skipped=int(skipped),
        path=config.stage_dir(name),
        mlflow_run_id=run_id,
        **(base | fields),
    )


def _step_table(name: str, rows: dict[str, Any], run_id: str) -> None:
    """A one-step stage's outcome as a Prefect table artifact, like the shard stages' counts."""
    table = [{"item": k, "value": v} for k, v in rows.items() if v is not None]
    create_table_artifact(
        key=f"{name}-summary",
        table=[*table, {"item": "MLflow run", "value": run_id}],
        description=f"{name}: the outcome of the step and the MLflow run that records it",
    )


def run_tokenizer(name: str, config: PipelineConfig, tracker: PipelineTracker) -> StageReport:
    """Train the BPE tokenizer on the final documents' training split, once per input."""
    stage_dir = config.stage_dir(name)
    run_id = tracker.start_child(
        name,
        params=flatten(config.tokenizer.model_dump(mode="json"))
        | {"val_fraction": str(config.tokenize.val_fraction)},
        tags={
            "llmflow.code_version": bpe_tokenizer.STAGE.code_version(),
            "llmflow.dataset": stage_dir,
        },
    )
    started = time.perf_counter()
    _log_inputs(name, config, tracker, run_id)
    try:
        manifest, skipped = bpe_tokenizer.tokenizer_train(
            config.stage_dir(document_versions.DOCUMENTS),
            stage_dir,
            config.tokenizer,
            config.tokenize.val_fraction,
        )
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    tracker.log(
        run_id,
        metrics={
            "vocab_size": manifest["vocab_size"],
            "bytes_per_token": manifest["bytes_per_token"],
            "docs_used": manifest["docs_used"],
            "chars_used": manifest["chars_used"],
            "heldout_docs": manifest["heldout_docs"],
            "units": 1,
            "units_skipped": int(skipped),
        },
        tags={"llmflow.compression_on": manifest["compression_on"]},
    )
    tracker.log_dict(run_id, manifest, "manifest.json")
    for file in bpe_tokenizer.HF_TOKENIZER_FILES:
        tracker.log_artifacts(run_id, shards.join(stage_dir, file), "tokenizer")
    tracker.finish(run_id, ok=True)
    _step_table(
        name,
        {
            "vocabulary": manifest["vocab_size"],
            "bytes per token": manifest["bytes_per_token"],
            "measured on": f"{manifest['compression_on']} documents",
            "documents trained on": manifest["docs_used"],
            "documents held out": manifest["heldout_docs"],
        },
        run_id,
    )
    size = sum(
        len(shards.read_bytes(shards.join(stage_dir, f))) for f in bpe_tokenizer.HF_TOKENIZER_FILES
    )
    return _step_report(
        name,
        config,
        run_id,
        time.perf_counter() - started,
        skipped,
        docs_in=manifest["docs_used"] + manifest["heldout_docs"],
        kept=manifest["docs_used"],
        bytes=size,
        summary=(
            f"vocab {manifest['vocab_size']}, {manifest['bytes_per_token']:.2f} bytes/token on"
            f" {manifest['compression_on']} documents"
        ),
    )


def _run_training(
    name: str,
    config: PipelineConfig,
    tracker: PipelineTracker,
    job: TrainJob,
    key: str,
    spec: StageSpec,
    train: Task[..., dict[str, Any]],
    params: dict[str, str],
    dataset: str,
    extra: dict[str, Any] | None = None,
    data_input: tuple[str, str, str] | None = None,
    data_record: tuple[dict[str, float], dict[str, str]] | None = None,
) -> tuple[dict[str, Any], str, bool, float]:
    """Train (or resume, or skip) one run; record its curves, checkpoint and export in MLflow.

    Pretraining and SFT differ in their job (data, starting weights), not in this bookkeeping.
    ``data_record`` (metrics, tags) describes the training data, logged before training starts.
    ``data_input`` (name, URI, digest) is a training input that is no pipeline stage (SFT's
    conversations). Returns the run's manifest, the MLflow run id, whether it was skipped and
    the seconds taken.
    """
    stage_dir = config.stage_dir(name)
    run_id = tracker.start_child(
        name,
        params=params | flatten(job.decoder.model_dump(mode="json"), "decoder."),
        tags={
            "llmflow.code_version": spec.code_version(),
            "llmflow.dataset": dataset,
            "llmflow.run_dir": job.run_dir,
        }
        | ({"llmflow.init_checkpoint": job.init_checkpoint} if job.init_checkpoint else {}),
    )
    started = time.perf_counter()
    _log_inputs(name, config, tracker, run_id)
    if data_input is not None:
        tracker.log_input(run_id, *data_input, "training")
    if data_record is not None:
        tracker.log(run_id, metrics=data_record[0], tags=data_record[1])
    try:
        manifest = pretrain.completed(stage_dir, key)
        skipped = manifest is not None
        if manifest is None:
            job = job.model_copy(
                update={"tracking_uri": tracker.tracking_uri, "mlflow_run_id": run_id}
            )
            result = train(job, pretrain.processes(job.config))
            run_dir = Path(job.run_dir)
            checkpoint = Path(result["checkpoint"])
            export = pretrain.export_hf(checkpoint, job.tokenizer_dir, run_dir / pretrain.HF_DIR)
            tracker.log_artifacts(run_id, checkpoint, "checkpoint")
            tracker.log_artifacts(run_id, export, "hf_model")
            for file in bpe_tokenizer.HF_TOKENIZER_FILES:
                tracker.log_artifacts(run_id, Path(job.tokenizer_dir) / file, "tokenizer")
            tracker.log_artifacts(run_id, run_dir / "metrics.jsonl", "")
            curves = run_charts.training_curves(
                read_metrics(run_dir), f"{name}: {result['steps']} steps"
            )
            if curves is not None:
                tracker.log_figure(run_id, curves, "charts/training_curves.png")
            manifest = pretrain.write_manifest(stage_dir, key, job, result, spec, extra)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    result = manifest["result"]
    final = {k: result[k] for k in ("val_loss", "val_bpb", "unigram_entropy") if result.get(k)}
    tracker.log(
        run_id,
        metrics={f"final_{k}": v for k, v in final.items()}
        | {"units": 1, "units_skipped": int(skipped)},
        step=result["steps"],
    )
    tracker.log_dict(run_id, manifest, "manifest.json")
    tracker.finish(run_id, ok=True)
    return manifest, run_id, skipped, time.perf_counter() - started


def _loss_summary(result: dict[str, Any]) -> str:
    summary = f"{result['steps']} steps, {result['parameters']:,} parameters"
    if result.get("val_loss") is not None:
        summary += (
            f"; val loss {result['val_loss']:.3f} nats/token ({result['val_bpb']:.3f} bits/byte)"
        )
    return summary


def run_pretrain(name: str, config: PipelineConfig, tracker: PipelineTracker) -> StageReport:
    """Train (or resume, or skip) the model on the token shards; record curves and artifacts."""
    tokens_dir, tokenizer_dir = config.stage_dir("tokenize"), config.stage_dir("tokenizer")
    job, key = pretrain.plan_job(config.pretrain, tokens_dir, tokenizer_dir, config.stage_dir(name))
    params = flatten(config.pretrain.model_dump(mode="json"))
    manifest, run_id, skipped, seconds = _run_training(
        name, config, tracker, job, key, pretrain.STAGE, pretrain.pretrain_task, params, tokens_dir
    )
    result = manifest["result"]
    _step_table(
        name,
        {
            "steps": result["steps"],
            "parameters": result["parameters"],
            "training tokens": result["train_tokens"],
            "validation loss (nats/token)": result.get("val_loss"),
            "validation bits per byte": result.get("val_bpb"),
            "unigram entropy (nats/token)": result["unigram_entropy"],
            "checkpoint": result["checkpoint"],
        },
        run_id,
    )
    tokens = shards.read_manifest(tokens_dir)
    summary = _loss_summary(result)
    if result.get("val_loss") is not None:
        summary += f" vs unigram entropy {result['unigram_entropy']:.3f}"
    export = pretrain.manifest_run_dir(config.stage_dir(name), manifest) / pretrain.HF_DIR
    return _step_report(
        name,
        config,
        run_id,
        seconds,
        skipped,
        docs_in=tokens["counts"]["kept"],
        kept=tokens["counts"]["kept"],
        bytes=(export / "model.safetensors").stat().st_size,
        summary=f"{summary}; export {export}",
    )


def run_sft(name: str, config: PipelineConfig, tracker: PipelineTracker) -> StageReport:
    """Fine-tune the pretrained model on the conversations, assistant tokens only."""
    job, key, data = sft.plan_job(
        config.sft,
        config.stage_dir("pretrain"),
        config.stage_dir("tokenizer"),
        config.stage_dir(name),
    )
    params = flatten(config.sft.model_dump(mode="json")) | {"data_source": data.source}
    manifest, run_id, skipped, seconds = _run_training(
        name,
        config,
        tracker,
        job,
        key,
        sft.STAGE,
        sft.sft_task,
        params,
        data.source,
        {"data": asdict(data)},
        ("instructions", data.source, data.sha256),
        (
            {
                "conversations": data.conversations,
                "conversations_skipped": sum(data.skipped.values()),
                "train_conversations": data.train_conversations,
                "val_conversations": data.val_conversations,
                "train_rows": data.train_rows,
                "padding_fraction": data.padding_fraction,
                "truncated": data.truncated,
                "dropped": data.dropped,
            },
            {"llmflow.sft_data": data.source, "llmflow.sft_data_sha256": data.sha256},
        ),
    )
    result = manifest["result"]
    _step_table(
        name,
        {
            "instruction data": data.source,
            "conversations (train / held out)": (
                f"{data.train_conversations} / {data.val_conversations}"
            ),
            "records skipped": ", ".join(f"{n} {r}" for r, n in data.skipped.items()) or "none",
            "packed rows": data.train_rows,
            "padding": f"{data.padding_fraction:.1%}",
            "steps": result["steps"],
            "assistant tokens trained on": result["train_tokens"],
            "validation loss (nats/assistant token)": result.get("val_loss"),
            "checkpoint": result["checkpoint"],
        },
        run_id,
    )
    export = pretrain.manifest_run_dir(config.stage_dir(name), manifest) / pretrain.HF_DIR
    return _step_report(
        name,
        config,
        run_id,
        seconds,
        skipped,
        docs_in=data.conversations + sum(data.skipped.values()),
        kept=data.conversations,
        rejected=sum(data.skipped.values()),
        rejected_by_reason=data.skipped,
        bytes=(export / "model.safetensors").stat().st_size,
        summary=(
            f"{data.train_conversations} conversations; {_loss_summary(result)} on held-out replies"
        ),
    )


def _evaluation_inputs(config: PipelineConfig) -> tuple[str, str | None, list[str], str]:
    """(model path, our tokenizer dir or None, held-out token shards, digest of both)."""
    settings = config.evaluate
    if settings.model is not None:  # someone else's model: its own tokenizer, no bits per byte
        # the files' names, sizes and times stand for the model: re-hashing GBs of weights on
        # every run to decide whether to skip would cost more than most evaluations
        path = Path(settings.model).resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        return settings.model, None, [], hashlib.sha256(repr(stamp).encode()).hexdigest()
    tokens_dir = config.stage_dir("tokenize")
    val_shards = [str(p) for p in tokenize.token_shard_paths(tokens_dir, "val")]
    sft_dir = config.stage_dir("sft")
    base = shards.read_json(shards.join(sft_dir, shards.MANIFEST_NAME))
    model_path = str(pretrain.manifest_run_dir(sft_dir, base) / pretrain.HF_DIR)
    digest = manifest_sha256(sft_dir) + manifest_sha256(tokens_dir)
    return model_path, config.stage_dir("tokenizer"), val_shards, digest


def _register_sft_model(
    config: PipelineConfig,
    tracker: PipelineTracker,
    outcome: dict[str, Any],
    metrics: dict[str, float],
) -> str | None:
    """Register the evaluated SFT model (the export its training run logged) with its scores as
    tags; returns ``name/version``, or None when that run's export is not in MLflow."""
    name = config.evaluate.registered_model
    trained = shards.read_json(shards.join(config.stage_dir("sft"), shards.MANIFEST_NAME))
    source_run = trained.get("mlflow_run_id")
    if not name or not source_run:
        return None
    tags = {k: f"{v:.6g}" for k, v in metrics.items() if not k.endswith("_stderr")}
    tags |= {"llmflow.sft_key": trained["key"], "llmflow.eval_tasks": ",".join(outcome["results"])}
    version = tracker.register_model(name, source_run, "hf_model", tags, outcome["key"])
    return f"{name}/{version}"


def run_evaluate(name: str, config: PipelineConfig, tracker: PipelineTracker) -> StageReport:
    """Score the instruction-tuned model: benchmarks, held-out bits per byte, chat samples."""
    settings = config.evaluate
    stage_dir = config.stage_dir(name)
    model_path, tokenizer_dir, val_shards, inputs_sha = _evaluation_inputs(config)
    key = unit_key(evaluation.STAGE, settings, inputs_sha)
    run_id = tracker.start_child(
        name,
        params=flatten(settings.model_dump(mode="json")) | {"model_path": model_path},
        tags={"llmflow.code_version": evaluation.STAGE.code_version(), "llmflow.model": model_path},
    )
    started = time.perf_counter()
    if settings.model is None:
        _log_inputs(name, config, tracker, run_id)
    results_path = shards.join(stage_dir, shards.MANIFEST_NAME)
    try:
        previous = shards.read_json(results_path) if shards.exists(results_path) else None
        outcome: dict[str, Any]
        skipped = previous is not None and previous.get("key") == key
        if previous is not None and skipped:
            outcome = previous
        else:
            with progress_per_task("evaluate") as on_task:
                outcome = evaluation.run_evaluation(
                    settings, model_path, tokenizer_dir, val_shards, on_task
                )
            outcome |= {
                "format": shards.MANIFEST_FORMAT,
                "stage": name,
                "code_version": evaluation.STAGE.code_version(),
                "key": key,
            }
            shards.write_json_atomic(results_path, outcome)
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    rows = evaluation.results_rows(outcome)
    metrics: dict[str, float] = {}
    for row in rows:
        metric_name = f"eval/{row['task']}/{row['metric']}"
        metrics[metric_name] = row["value"]
        if row["stderr"] is not None:
            metrics[f"{metric_name}_stderr"] = row["stderr"]
    heldout = outcome.get("heldout")
    if heldout:
        metrics |= {"eval/heldout/bpb": heldout["bpb"], "eval/heldout/loss": heldout["loss"]}
    tracker.log(run_id, metrics=metrics | {"units": 1, "units_skipped": int(skipped)})
    tracker.log_table(run_id, rows, "eval_results.json")
    tracker.log_dict(run_id, outcome, "eval_outcome.json")
    if settings.registered_model and settings.model is None:
        version = _register_sft_model(config, tracker, outcome, metrics)
        if version is not None:
            tracker.log(run_id, tags={"llmflow.registered_model": version})
    tracker.finish(run_id, ok=True)
    create_markdown_artifact(
        key="evaluate-results",
        markdown=evaluation.results_markdown(outcome, run_id),
        description="Benchmark scores, held-out bits per byte and chat samples of the model",
    )
    headline = []
    for task, result in outcome["results"].items():
        metric = "acc_norm" if "acc_norm" in result["metrics"] else "acc"
        headline.append(f"{task} {metric} {result['metrics'][metric]:.3f}")
    summary = ", ".join(headline)
    if heldout:
        summary = f"held-out {heldout['bpb']:.3f} bits/byte; {summary}"
    items = sum(r["items"] for r in outcome["results"].values())
    return _step_report(
        name,
        config,
        run_id,
        time.perf_counter() - started,
        skipped,
        docs_in=items,
        kept=items,
        summary=summary,
    )


StepRunner = Callable[[str, PipelineConfig, PipelineTracker], StageReport]
# Stages that are one step over their whole input, not a map over shards.
STEPS: dict[str, StepRunner] = {
    "tokenizer": run_tokenizer,
    "pretrain": run_pretrain,
    "sft": run_sft,
    "evaluate": run_evaluate,
}
assert set(WIRING) | set(STEPS) == set(STAGES), "every stage in STAGES needs its wiring"


def _link_flow_run_to_mlflow(tracker: PipelineTracker, run_id: str, attempts: int = 4) -> bool:
    """Labels on the Prefect flow run naming its MLflow parent run (and the run's page when
    MLflow is a server): the other half of the MLflow run's ``prefect.flow_run_*`` tags.

    A convenience, so it never ends a run: a busy API (a 503 past the client's own retries, a
    dropped connection) is tried again a few times, then given up with a warning; the MLflow run
    still names the flow run. Returns whether the labels were written.
    """
    from prefect.client.orchestration import get_client

    labels: dict[str, bool | int | float | str] = {
        "mlflow.run_id": run_id,
        "mlflow.experiment_id": tracker.experiment_id,
    }
    url = tracker.run_url(run_id)
    if url is not None:
        labels["mlflow.run_url"] = url
    for attempt in range(1, attempts + 1):
        try:
            with get_client(sync_client=True) as client:
                client.update_flow_run_labels(flow_run.id, labels)
            return True
        except (httpx.HTTPError, OSError) as error:
            if attempt == attempts:
                progress.run_logger().warning(
                    "could not label the flow run with its MLflow run %s after %d attempts"
                    " (%s); the run goes on, and its MLflow run names the flow run",
                    run_id,
                    attempts,
                    error,
                )
                return False
            time.sleep(2.0 * attempt)
    return False


# Deployment runs get this bounded pool; `llmflow run` sizes it from config.max_workers.
# The ignore: prefect types task_runner as TaskRunner[PrefectFuture[Any]], a type its own
# ThreadPoolTaskRunner does not have (TaskRunner's parameter is invariant).
@flow(name="llmflow-pipeline", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=2))  # type: ignore[arg-type]
def pipeline(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any]:
    """Run the pipeline's stages in order on ``config``; ``stages`` picks a subset.

    ``refresh``: the document stages make a new version of the documents from what is new since
    the last one (an unfinished version is finished first); otherwise they re-run the newest.
    """
    check_deployment_run(config)  # a deployment run's paths: under the allowed roots, or refused
    selected = resolve_stages(",".join(stages) if stages else None)
    # one writer per dataset root: refused here, before any run is recorded, if one is busy
    with exclusive_writer(config.dataset_root(), f"flow run {flow_run.name} ({flow_run.id})"):
        return _run_stages(config, selected, refresh)


def _publish_documents(config: PipelineConfig, tracker: PipelineTracker, parent: str) -> dict:
    """Publish the version the document stages just made and record the refresh in MLflow."""
    documents_dir = config.stage_dir(document_versions.DOCUMENTS)
    number = document_versions.working_version(documents_dir)
    manifest = document_versions.publish(documents_dir, number)
    refresh = manifest["refresh"]
    metrics = {"documents/version": number, "documents/kept": manifest["counts"]["kept"]}
    for key, value in refresh.items():
        if isinstance(value, dict):
            metrics |= {f"refresh/{key}/{k}": v for k, v in value.items()}
        else:
            metrics[f"refresh/{key}"] = value
    tracker.log(
        parent,
        metrics=metrics,
        tags={
            "llmflow.documents_version": document_versions.version_name(number),
            "llmflow.documents_sha256": manifest_sha256(documents_dir),
        },
    )
    tracker.log_dict(parent, manifest, f"documents/{document_versions.version_name(number)}.json")
    removed = ", ".join(f"{k} {v}" for k, v in refresh["removed_by_reason"].items()) or "none"
    create_markdown_artifact(
        key="documents-version",
        markdown="\n".join(
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
        ),
        description="The documents version this run published: what the refresh found",
    )
    return {"version": number, "kept": manifest["counts"]["kept"], "refresh": refresh}


def _run_stages(config: PipelineConfig, selected: list[str], refresh: bool) -> dict[str, Any]:
    if refresh and "crawl" not in selected:
        raise ValueError(
            f"refresh: a new documents version starts with a new crawl, but the stages"
            f" {','.join(selected)} do not include crawl"
        )
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
        f"pipeline-{flow_run.name}",
        tags=tags,
        params=flatten(config.model_dump(mode="json")) | {"stages": ",".join(selected)},
    )
    _link_flow_run_to_mlflow(tracker, parent)
    if any(name in DOCUMENT_STAGES for name in selected):
        document_versions.begin(config.stage_dir(document_versions.DOCUMENTS), refresh)
    reports: list[StageReport] = []
    documents: dict[str, Any] | None = None
    try:
        for name in selected:
            run = STEPS.get(name, run_stage)
            reports.append(run(name, config, tracker))
            if name == DOCUMENT_STAGES[-1]:
                documents = _publish_documents(config, tracker, parent)
    except BaseException:
        tracker.finish(parent, ok=False)
        raise
    funnel = run_charts.data_funnel([asdict(r) for r in reports if r.stage in WIRING])
    if funnel is not None:
        tracker.log_figure(parent, funnel, "charts/data_funnel.png")
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
        "documents": documents,
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


def run_pipeline(
    config: PipelineConfig, stages: list[str] | None = None, refresh: bool = False
) -> dict[str, Any]:
    """Run the flow on the task runner the config names."""
    flow_with_runner = pipeline.with_options(task_runner=task_runner(config))
    return flow_with_runner(config=config, stages=stages, refresh=refresh)
