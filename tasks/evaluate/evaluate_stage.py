"""The evaluate stage: which model it scores, when it can skip, what it records.

The scoring itself is :func:`~llmflow.tasks.evaluate.evaluation.run_evaluation`, run as the
Prefect task ``evaluate`` (:func:`evaluate_task`, a node of the flow-run graph); this module is
the stage around it: it finds the SFT model (or the user's own ``evaluate.model``), keys the
evaluation on the model and the held-out tokens, skips when the stored results carry the same
key, logs the scores to the stage's MLflow run and registers the evaluated SFT model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import task as prefect_task
from prefect.cache_policies import NO_CACHE

from llmflow.tasks.core import shards
from llmflow.tasks.core.document_versions import DOCUMENTS
from llmflow.tasks.core.graph import RunRecorder, StageContext, StepReport
from llmflow.tasks.core.progress import progress_per_task, run_logger
from llmflow.tasks.core.shards import manifest_sha256
from llmflow.tasks.core.steps import run_step, step_key
from llmflow.tasks.curate.decontaminate import Contamination, training_contamination
from llmflow.tasks.evaluate import evaluation
from llmflow.tasks.evaluate.evaluate_config import EvaluateConfig
from llmflow.tasks.evaluate.evaluation import METRIC_PREFIX
from llmflow.tasks.evaluate.summary_scores import clean_result, core_score
from llmflow.tasks.train import pretrain, tokenize

STAGE = evaluation.STAGE


def evaluation_inputs(ctx: StageContext) -> tuple[str, str | None, list[str], str]:
    """(model path, our tokenizer dir or None, held-out token shards, digest of both)."""
    settings: EvaluateConfig = ctx.settings
    if settings.model is not None:  # someone else's model: its own tokenizer, no bits per byte
        # the files' names, sizes and times stand for the model: re-hashing GBs of weights on
        # every run to decide whether to skip would cost more than most evaluations
        path = Path(settings.model).resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        stamp = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        return settings.model, None, [], hashlib.sha256(repr(stamp).encode()).hexdigest()
    tokens_dir = ctx.stage_dir("tokenize")
    val_shards = [str(p) for p in tokenize.token_shard_paths(tokens_dir, "val")]
    sft_dir = ctx.stage_dir("sft")
    base = shards.read_json(shards.join(sft_dir, shards.MANIFEST_NAME))
    model_path = str(pretrain.manifest_run_dir(sft_dir, base) / pretrain.HF_DIR)
    digest = manifest_sha256(sft_dir) + manifest_sha256(tokens_dir)
    return model_path, ctx.stage_dir("tokenizer"), val_shards, digest


def model_contamination(ctx: StageContext) -> Contamination | None:
    """The benchmark items the pipeline's model saw: those its documents version still holds
    (flagged, not removed) and those its SFT conversations held. None for a model from
    elsewhere, or documents that were never checked."""
    if ctx.settings.model is not None:
        return None
    found = training_contamination(ctx.stage_dir(DOCUMENTS))
    if found is not None:
        trained = shards.read_json(shards.join(ctx.stage_dir("sft"), shards.MANIFEST_NAME))
        found.add(trained.get("data", {}).get("benchmark_items", []))
    return found


def contamination_metrics(
    outcome: dict[str, Any], found: Contamination | None
) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """``eval/<task>/clean/<metric>`` and ``eval/<task>/contaminated_items`` for every task the
    decontaminate stage checked, and the clean results themselves."""
    metrics: dict[str, float] = {}
    clean: dict[str, dict[str, Any]] = {}
    if found is None:
        return metrics, clean
    for task, result in outcome["results"].items():
        if task not in found.checked_tasks:
            continue
        clean[task] = clean_result(result, found.items.get(task, set()))
        metrics[f"eval/{task}/contaminated_items"] = clean[task]["contaminated"]
        metrics[f"eval/{task}/clean_items"] = clean[task]["items"]
        for metric, value in clean[task]["metrics"].items():
            metrics[f"eval/{task}/clean/{metric}"] = value
    return metrics, clean


def _register_sft_model(
    ctx: StageContext, run: RunRecorder, outcome: dict[str, Any], metrics: dict[str, float]
) -> str | None:
    """Register the evaluated SFT model (the export its training run logged) with its scores as
    tags; returns ``name/version``, or None when that run's export is not in MLflow."""
    name = ctx.settings.registered_model
    trained = shards.read_json(shards.join(ctx.stage_dir("sft"), shards.MANIFEST_NAME))
    source_run = trained.get("mlflow_run_id")
    if not name or not source_run:
        return None
    tags = {k: f"{v:.6g}" for k, v in metrics.items() if k.startswith(f"{METRIC_PREFIX}/")}
    tags |= {"llmflow.sft_key": trained["key"], "llmflow.eval_tasks": ",".join(outcome["results"])}
    tags["llmflow.core_tasks"] = ",".join(outcome.get("core", {}).get("tasks", {}))
    version = run.register_model(name, source_run, "hf_model", tags, outcome["key"])
    return f"{name}/{version}"


@prefect_task(name="evaluate", cache_policy=NO_CACHE, persist_result=False)
def evaluate_task(
    settings: EvaluateConfig, model_path: str, tokenizer_dir: str | None, val_shards: list[str]
) -> dict[str, Any]:
    """The scoring as a Prefect task, as training is one: the flow-run graph shows it where it
    would otherwise show a gap, with its state and duration; its progress bar and Prefect
    progress artifact count each benchmark's items as they are scored."""
    logger = run_logger()

    with progress_per_task("evaluate") as bar_for:

        def on_task(task_name: str, items: int) -> Callable[[], None]:
            logger.info("evaluate: scoring %s (%d items)", task_name, items)
            return bar_for(task_name, items)

        return evaluation.run_evaluation(settings, model_path, tokenizer_dir, val_shards, on_task)


def _score(ctx: StageContext, key: str, inputs: tuple[str, str | None, list[str]]) -> tuple:
    """The stored outcome when it has this key, else a new evaluation (its manifest written
    last); returns (outcome, skipped)."""

    def evaluate() -> tuple[list[str], dict[str, Any]]:
        return [], evaluate_task(ctx.settings, *inputs)

    return run_step(ctx.dir, STAGE, key, evaluate)


def evaluate_step(ctx: StageContext) -> StepReport:
    """Score the instruction-tuned model: benchmarks, held-out bits per byte, chat samples."""
    settings: EvaluateConfig = ctx.settings
    model_path, tokenizer_dir, val_shards, inputs_sha = evaluation_inputs(ctx)
    key = step_key(STAGE, settings, {"model": inputs_sha})
    params = settings.model_dump(mode="json") | {"model_path": model_path}
    tags = {"llmflow.code_version": STAGE.code_version(), "llmflow.model": model_path}
    with ctx.start_run(params, tags, log_inputs=settings.model is None) as run:
        outcome, skipped = _score(ctx, key, (model_path, tokenizer_dir, val_shards))
        # in the configured order, also when read back from the manifest (whose keys are
        # sorted): the summary, and the tags a skipped re-run is matched on, do not change
        results = outcome["results"]
        order = [t for t in settings.tasks if t in results] + sorted(
            set(results) - set(settings.tasks)
        )
        outcome["results"] = {task: results[task] for task in order}
        core, centred = core_score(outcome["results"])
        outcome["core"] = {"value": core, "tasks": centred}
        contamination_found, outcome["clean"] = contamination_metrics(
            outcome, model_contamination(ctx)
        )
        rows = evaluation.results_rows(outcome)
        metrics = evaluation.results_metrics(outcome) | contamination_found
        heldout = outcome.get("heldout")
        if heldout:
            metrics |= {"eval/heldout/bpb": heldout["bpb"], "eval/heldout/loss": heldout["loss"]}
        run.log(
            metrics=metrics | {"units": 1, "units_skipped": int(skipped)},
            tags={"llmflow.core_tasks": ",".join(centred)},
        )
        run.log_table(rows, "eval_results.json")
        run.log_dict(outcome, "eval_outcome.json")
        if settings.registered_model and settings.model is None:
            version = _register_sft_model(ctx, run, outcome, metrics)
            if version is not None:
                run.log(tags={"llmflow.registered_model": version})
    headline = []
    for task, result in outcome["results"].items():
        metric = "acc_norm" if "acc_norm" in result["metrics"] else "acc"
        headline.append(f"{task} {metric} {result['metrics'][metric]:.3f}")
    summary = f"CORE {core:.3f}; " + ", ".join(headline)
    seen = {t: c["contaminated"] for t, c in outcome["clean"].items() if c["contaminated"]}
    if outcome["clean"]:
        summary += "; contaminated items: " + (
            ", ".join(f"{t} {n}" for t, n in seen.items()) or "none"
        )
    if heldout:
        summary = f"held-out {heldout['bpb']:.3f} bits/byte; {summary}"
    items = sum(r["items"] for r in outcome["results"].values())
    return StepReport(
        run_id=run.run_id,
        skipped=skipped,
        table={},
        docs_in=items,
        kept=items,
        summary=summary,
        markdown=evaluation.results_markdown(outcome, run.run_id),
        markdown_description=(
            "Benchmark scores, held-out bits per byte and chat samples of the model"
        ),
    )
