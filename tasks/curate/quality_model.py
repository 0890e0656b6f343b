"""quality_model: a learned quality filter, trained on your own examples, applied as a signal.

The guides llmflow follows filter with a classifier trained on a small high-quality set (DCLM:
instruction data against random web text; FineWeb-Edu: a model's ratings). This stage trains
:mod:`~llmflow.tasks.curate.text_classifier` on labelled texts
(:mod:`~llmflow.tasks.curate.quality_model_labels`: by default the conversations shipped with
llmflow against a sample of the crawl being curated, as normalized; or a model's ratings of that
sample, :mod:`~llmflow.tasks.curate.quality_model_rater`), scores every document
(``quality_model_score``, the probability of the positive class) and then decides, apart from
the score, as quality's rules do: keep ``all`` (the default: score only), keep documents at or
above a ``threshold``, or keep the ``top_fraction`` of the input by score.

Three caches, so each change redoes only what it must: the model under ``_model/<key>/``
(keyed by the labelled sources' digests, the settings and the code version: a re-run trains
nothing), each shard's scores under ``_scores/`` (keyed by the shard and the model's digest: a
changed cut re-decides without scoring again), and the units' markers (keyed by the cut too).
The held-out precision, recall and ROC AUC, the threshold and the model files go to the stage's
MLflow run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, model_validator

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import (
    Rejection,
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    cached_table,
    completed_record,
    plan_shard_units,
    put_column,
    read_unit_input,
    route,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import ShardResult
from llmflow.tasks.curate.quality_model_labels import (
    Labelled,
    crawl_sample,
    reference_texts,
    user_labels,
)
from llmflow.tasks.curate.quality_model_rater import (
    RATINGS_VERSION,
    RatedLabels,
    prompt_of,
    rater_labels,
)
from llmflow.tasks.curate.text_classifier import (
    ClassifierSettings,
    TextClassifier,
    held_out_metrics,
    load_model,
    train_classifier,
)
from llmflow.tasks.ingest.embedded_data import INSTRUCTIONS_FILE

STAGE = StageSpec(name="quality_model", version="1", libraries=("scikit-learn",))
SCORES = StageSpec(name="quality_model-scores", version="1", libraries=("scikit-learn",))
MODEL_DIR = "_model"
SCORES_DIR = "_scores"
METRICS_JSON = "metrics.json"
SCORE_FIELD = pa.field("quality_model_score", pa.float32())
REASON = "quality_model_score"
log = logging.getLogger(__name__)


class QualityModelConfig(StageConfig):
    """Where the labels come from, how the classifier learns, and which documents are kept."""

    DECISION_FIELDS: ClassVar[frozenset[str]] = frozenset({"keep", "threshold", "top_fraction"})
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"rater_device"})

    labels: Literal["reference", "user", "model"] = Field(
        "reference",
        description="reference: `reference` texts against a sample of the crawl (DCLM's recipe);"
        " user: a `labels_file` of text and label; model: a `rater` model's ratings of a sample"
        " of the crawl (FineWeb-Edu's recipe).",
    )
    reference: str | None = Field(
        None,
        description="Positives for labels=reference: an llmflow dataset, instruction files (chat,"
        " Alpaca or prompt/response) or documents in any format the crawl reads. None: the"
        " conversations shipped with llmflow.",
    )
    negatives: int = Field(
        20_000, ge=10, description="Crawl documents sampled as negatives (labels=reference)."
    )
    labels_file: str | None = Field(
        None, description="labels=user: a file (JSONL, CSV or Parquet) of `text` and `label` (1/0)."
    )
    rater: str | None = Field(
        None,
        description="labels=model: the rating causal LM (a Hugging Face folder, a .gguf file or"
        " an llmflow run folder).",
    )
    rater_prompt: str | None = Field(
        None,
        description="The rater's prompt, with {text} for the document. None: educational"
        " value on an additive 0-5 scale (FineWeb-Edu's).",
    )
    rater_cut: float = Field(3.0, ge=0, le=5, description="Ratings >= this are positives.")
    rater_documents: int = Field(2_000, ge=10, description="Crawl documents the rater rates.")
    rater_max_chars: int = Field(2_000, ge=100, description="Characters of each the rater reads.")
    rater_device: str = Field("cpu", description="torch device for the rater (cpu, cuda, ...).")
    model: str | None = Field(
        None, description="A model folder saved by this stage, applied instead of training one."
    )
    classifier: ClassifierSettings = Field(default_factory=ClassifierSettings)
    keep: Literal["all", "threshold", "top_fraction"] = Field(
        "all",
        description="all: score only; threshold: keep scores >= threshold; top_fraction: keep"
        " the best-scored fraction of the input.",
    )
    threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="The cut for keep=threshold, and where held-out precision"
        " and recall are measured.",
    )
    top_fraction: float = Field(0.9, gt=0, le=1, description="Kept share for keep=top_fraction.")

    @model_validator(mode="after")
    def _labels_given(self) -> QualityModelConfig:
        if self.labels == "user" and self.labels_file is None and self.model is None:
            raise ValueError("quality_model.labels is 'user': set quality_model.labels_file")
        if self.labels == "model" and self.rater is None and self.model is None:
            raise ValueError("quality_model.labels is 'model': set quality_model.rater")
        if self.rater_prompt is not None and "{text}" not in self.rater_prompt:
            raise ValueError("quality_model.rater_prompt: no {text}, where the document goes")
        return self


# --- the model -----------------------------------------------------------------------------------


def _source_digest(path: str) -> str:
    """A digest of what a path holds: a dataset's manifest, or every file under it."""
    if shards.exists(shards.join(path, shards.MANIFEST_NAME)):
        return shards.manifest_sha256(path)
    fs, root = shards.filesystem(path)
    files = sorted(fs.find(root)) if fs.isdir(root) else [root]
    h = hashlib.sha256()
    for file in files:
        with fs.open(file, "rb") as f:
            h.update(
                file.removeprefix(root).encode() + b"\0" + hashlib.file_digest(f, "sha256").digest()
            )
    return h.hexdigest()


def model_key(config: QualityModelConfig, negatives_dir: str) -> str:
    """The model's identity from what it is learned from, read cheaply: digests of the label
    sources (the crawl sample's dataset by its manifest), the settings and the code version."""
    if config.model is not None:
        sources = {"model": _source_digest(config.model)}
    elif config.labels == "user":
        assert config.labels_file is not None
        sources = {"labels_file": _source_digest(config.labels_file)}
    elif config.labels == "model":
        assert config.rater is not None
        sources = {
            "rater": _source_digest(config.rater),
            "rating": RATINGS_VERSION,
            "prompt": prompt_of(config),
            "cut": str(config.rater_cut),
            "negatives": shards.manifest_sha256(negatives_dir),
            "count": str(config.rater_documents),
            "rater_max_chars": str(config.rater_max_chars),
        }
    else:
        reference = config.reference or str(INSTRUCTIONS_FILE)
        sources = {
            "reference": _source_digest(reference),
            "negatives": shards.manifest_sha256(negatives_dir),
            "count": str(config.negatives),
        }
    fields = frozenset({"labels", "classifier"})
    return unit_key(STAGE, config, json.dumps(sources, sort_keys=True), fields=fields)


def model_dir(stage_dir: str, key: str) -> str:
    return shards.join(stage_dir, MODEL_DIR, key[:16])


def labelled_texts(config: QualityModelConfig, negatives_dir: str, stage_dir: str) -> Labelled:
    limit = config.classifier.max_chars
    if config.labels == "model":
        assert config.rater is not None
        return rater_labels(config, negatives_dir, stage_dir, _source_digest(config.rater))
    if config.labels == "user":
        assert config.labels_file is not None
        return user_labels(config.labels_file, limit)
    positives, skipped = reference_texts(config.reference, limit)
    negatives = crawl_sample(negatives_dir, config.negatives, limit)
    return Labelled(positives, negatives, skipped)


def ensure_model(
    config: QualityModelConfig, stage_dir: str, unit: WorkUnit
) -> TextClassifier | None:
    """The unit's model: loaded from ``_model/`` when trained already, else trained and saved
    with its held-out metrics (a user's model is checked and copied in).

    None when there is nothing to learn from (no text of a class: a crawl of a handful of
    pages) and nothing is to be cut: the documents pass with no score, and ``metrics.json``
    says why. With a cut asked for, that is an error instead.
    """
    folder = unit.source["model_dir"]
    metrics_path = shards.join(folder, METRICS_JSON)
    if shards.exists(metrics_path):
        return None if "untrained" in shards.read_json(metrics_path) else load_model(folder)
    if config.model is not None:
        classifier = load_model(config.model)
        metrics: dict[str, Any] = {"given": config.model}
    else:
        labelled = labelled_texts(config, unit.source["negatives_dir"], stage_dir)
        metrics = {
            "labelled_positives": len(labelled.positives),
            "labelled_negatives": len(labelled.negatives),
            "skipped": dict(labelled.skipped),
        }
        if isinstance(labelled, RatedLabels):
            metrics |= labelled.details
        try:
            classifier, held_out = train_classifier(
                labelled.positives, labelled.negatives, config.classifier, config.threshold
            )
        except ValueError as e:
            if config.keep != "all":
                raise ValueError(f"quality_model: cannot train a model to cut by: {e}") from e
            log.warning("quality_model: no model, documents pass unscored: %s", e)
            shards.write_json_atomic(metrics_path, metrics | {"untrained": str(e)})
            return None
        if held_out is None:
            metrics["heldout"] = "too few texts to hold some out of each class"
        else:
            scored = {"labels": list(held_out.labels), "scores": list(held_out.scores)}
            metrics |= held_out.as_dict() | {"heldout": scored}
    classifier.save(folder, {k: v for k, v in metrics.items() if isinstance(v, int)})
    shards.write_json_atomic(metrics_path, metrics)  # written last
    return classifier


# --- scores, cut and decisions -------------------------------------------------------------------


def scores_for(
    unit: WorkUnit, config: QualityModelConfig, stage_dir: str, table: pa.Table | None = None
) -> tuple[pa.Table, bool]:
    """The unit's ``id`` and score columns from ``_scores/`` when stored for this shard and
    model, else scored and stored. Returns them and whether they were reused."""
    shard = unit.source["shard"]["sha256"]
    key = unit_key(SCORES, config, f"{shard}:{unit.source['model_key']}", fields=frozenset())
    path = shards.join(stage_dir, SCORES_DIR, f"{unit.name}.parquet")

    def compute() -> pa.Table:
        source = table if table is not None else read_unit_input(unit, ["id", "text"])
        classifier = ensure_model(config, stage_dir, unit)
        if classifier is None:
            scores = pa.nulls(source.num_rows, pa.float32())
        else:
            texts = [t or "" for t in source.column("text").to_pylist()]
            scores = pa.array(classifier.score(texts), pa.float32())
        return pa.table({"id": source.column("id"), SCORE_FIELD.name: scores})

    return cached_table(path, key, compute)


def _cut_path(unit: WorkUnit) -> str:
    return shards.join(unit.source["model_dir"], f"cut-{unit.source['cut_key'][:16]}.json")


def compute_cut(units: list[WorkUnit], config: QualityModelConfig, stage_dir: str) -> float:
    """The score at which ``top_fraction`` of the whole input is kept (stored beside the model,
    keyed by the input and the fraction)."""
    scores = np.concatenate(
        [scores_for(u, config, stage_dir)[0].column(SCORE_FIELD.name).to_numpy() for u in units]
        or [np.zeros(0, np.float32)]
    )
    cut = (
        float(np.quantile(scores, 1 - config.top_fraction, method="lower")) if scores.size else 0.0
    )
    shards.write_json_atomic(_cut_path(units[0]), {"cut": cut, "documents": int(scores.size)})
    return cut


def decide(
    table: pa.Table, scores: pa.Table, config: QualityModelConfig, cut: float
) -> ShardResult:
    if not scores.column("id").equals(table.column("id")):
        raise ValueError("quality_model: stored scores do not match the shard's documents")
    column = scores.column(SCORE_FIELD.name)
    values = column.to_numpy()
    table = put_column(table, SCORE_FIELD, column)
    if config.keep == "all":
        return route(table, [None] * table.num_rows)
    label = f"top {config.top_fraction:.0%}" if config.keep == "top_fraction" else "threshold"
    decisions = [
        None if v >= cut else Rejection(REASON, f"{v:.4f} < {cut:.4f} ({label})") for v in values
    ]
    return route(table, decisions)


def quality_model_unit(unit: WorkUnit, config: QualityModelConfig, stage_dir: str) -> ShardResult:
    table = read_unit_input(unit)
    scores, reused = scores_for(unit, config, stage_dir, table)
    cut = config.threshold
    if config.keep == "top_fraction":
        cut = float(shards.read_json(_cut_path(unit))["cut"])
    result = decide(table, scores, config, cut)
    result.stats["scores_reused" if reused else "scores_computed"] += table.num_rows
    return result


@task(name="quality_model-scores", cache_policy=NO_CACHE, persist_result=False)
def score_shard(unit: WorkUnit, config: QualityModelConfig, stage_dir: str) -> bool:
    return scores_for(unit, config, stage_dir)[1]


@task(name="quality_model-shard", cache_policy=NO_CACHE, persist_result=False)
def quality_model_shard(unit: WorkUnit, config: QualityModelConfig, stage_dir: str) -> UnitRecord:
    return run_unit(stage_dir, unit, lambda _: quality_model_unit(unit, config, stage_dir))


# --- the stage's hooks ---------------------------------------------------------------------------


def plan_units(
    config: QualityModelConfig, input_dir: str, negatives_dir: str, stage_dir: str
) -> tuple[list[WorkUnit], str]:
    """One unit per input shard, keyed by the model's key (and, for top_fraction, the whole
    input, since every shard moves the cut)."""
    key = model_key(config, negatives_dir)
    input_digest = shards.manifest_sha256(input_dir)
    cut_key = hashlib.sha256(f"{key}:{input_digest}:{config.top_fraction}".encode()).hexdigest()
    context = key if config.keep != "top_fraction" else f"{key}:{input_digest}"
    source = {
        "model_key": key,
        "model_dir": model_dir(stage_dir, key),
        "negatives_dir": negatives_dir,
        "cut_key": cut_key,
    }
    units, _ = plan_shard_units(STAGE, config, input_dir, context=context, source=source)
    return units, input_digest


def prepare(
    units: list[WorkUnit],
    config: QualityModelConfig,
    stage_dir: str,
    map_task: Callable[..., list[Any]],
) -> None:
    """Train (or find) the model; for top_fraction, score every shard first (mapped) and fix
    the cut, which the units then count as reused scores. Skipped when every unit is complete."""
    if not units or all(completed_record(stage_dir, u) is not None for u in units):
        return
    ensure_model(config, stage_dir, units[0])
    if config.keep == "top_fraction":
        map_task(score_shard, units, "quality_model: scores")
        compute_cut(units, config, stage_dir)


def report(run: Any, units: list[WorkUnit], config: QualityModelConfig, stage_dir: str) -> None:
    """The model's held-out metrics (precision and recall at the decision threshold), label
    counts and files in the stage's MLflow run."""
    if not units:
        return
    folder = units[0].source["model_dir"]
    metrics = shards.read_json(shards.join(folder, METRICS_JSON))
    heldout = metrics.get("heldout")
    if isinstance(heldout, dict):
        labels, scores = np.array(heldout["labels"]), np.array(heldout["scores"])
        metrics |= held_out_metrics(labels, scores, config.threshold).as_dict()
    numbers = {f"model.{k}": float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    counts: Counter[str] = Counter(metrics.get("skipped", {}))
    numbers |= {f"model.skipped.{k}": float(v) for k, v in counts.items()}
    histogram = metrics.get("rater_histogram", {})
    numbers |= {f"model.rater_histogram.{k}": float(v) for k, v in histogram.items()}
    tags = {"llmflow.quality_model": folder}
    if "rater" in metrics:
        tags["llmflow.quality_model.rater"] = str(metrics["rater"])
        rater = {k: metrics[k] for k in ("rater", "rater_prompt", "rater_cut", "rater_histogram")}
        run.log_dict(rater, "quality_model/rater.json")
    if "untrained" in metrics:
        tags["llmflow.quality_model.untrained"] = str(metrics["untrained"])[:500]
    run.log(metrics=numbers, tags=tags)
    if shards.is_local(folder):
        run.log_artifacts(shards.local_path(folder, "the quality model"), "quality_model")
