"""toxicity: score documents with a toxicity classifier; those over a threshold are removed.

Two backends share one small interface (:class:`ToxicityScorer`). The default, ``profanity``, is
alt-profanity-check: a calibrated linear SVM over TF-IDF word features whose model ships inside
its wheel, so it runs with no network and nothing to configure, fast enough for web scale. It
catches explicit profanity, slurs and sexual language and misses hate said politely (see
bench/toxicity_eval.md). ``detoxify`` runs a fine-tuned transformer through detoxify's own model
code, from a checkpoint that must be on disk beforehand and is read without running any code in
it (:mod:`llmflow.tasks.curate.toxicity_detoxify`).

Classifiers are trained on comments and tweets, not on 50 kB web pages, and their scores dilute
over long text. A document is therefore scored in chunks of about ``chunk_chars`` characters cut on
line or space boundaries, and its score for a label is the highest over its chunks: one toxic
passage is enough. Very long documents are sampled (``max_chunks`` chunks spread evenly over the
text) so that a 50 MB document costs the same as a 64 kB one.

What is scored is kept apart from what is decided, as quality keeps its signals: every document
keeps one float column per label, ``toxicity_<label>`` (null for a document with no text to
score), on kept and rejected rows alike, and the task stores each unit's scores under
``<stage_dir>/_scores/``, keyed by the unit's texts, the fields that change scores
(:attr:`ToxicityConfig.SCORER_FIELDS`) and the code version. A run that only moves thresholds
re-decides from the stored scores without loading the classifier.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, field_validator, model_validator

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import (
    Rejection,
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    cached_table,
    put_column,
    read_unit_input,
    route,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import ShardResult
from llmflow.tasks.curate.toxicity_detoxify import DetoxifyScorer, find_detoxify_checkpoint

# detoxify and transformers decide the scores of the detoxify backend; alt-profanity-check pins
# the scikit-learn version its model was trained with, so its own version names the model.
STAGE = StageSpec(
    name="toxicity", version="1", libraries=("alt-profanity-check", "detoxify", "transformers")
)

COLUMN_PREFIX = "toxicity_"
REASON_PREFIX = "toxic_"  # a removed document's reason: toxic_<label>
SCORES_DIR = "_scores"
# The scores table's schema metadata: score_texts' counters for the unit, so a run that reuses
# the scores reports the same stats as the run that made them.
SCORE_STATS_METADATA = b"llmflow.toxicity_stats"
PROFANITY_LABEL = "profanity"
# The knee of the sweep in bench/toxicity_eval.md. From 0.5 (the model's own predict() cut) to 0.6
# false removals fall by more than half (ToxiGen neutral statements 13 -> 5 of 297, mostly text
# about lesbian and gay people; clean long documents 9 -> 4 of 230) for 1.2 points of recall on
# Davidson's toxic tweets; above 0.6 false removals barely fall while recall keeps dropping.
DEFAULT_PROFANITY_THRESHOLD = 0.6
# detoxify's labels that name a harm. Its "unbiased" model also predicts identity mentions (male,
# muslim, black, ...): those say who a text is about, not that it is toxic, and never remove.
DETOXIFY_HARM_LABELS = (
    "toxicity",
    "severe_toxicity",
    "obscene",
    "threat",
    "insult",
    "identity_attack",
    "sexual_explicit",
)
# The cut detoxify's authors use in their own examples and evaluation (a sigmoid's midpoint).
DEFAULT_DETOXIFY_THRESHOLD = 0.5
DetoxifyModel = Literal["original", "unbiased", "multilingual", "original-small", "unbiased-small"]

_SPACE = re.compile(r"\s")


class ToxicityConfig(StageConfig):
    """Which classifier scores documents, and where each label's score removes a document."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size", "device"})
    # The fields that decide a document's scores (the rest decide what the scores remove, or
    # only speed): stored scores are reused while these, the texts and the code version match.
    SCORER_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "backend",
            "chunk_chars",
            "max_chunks",
            "detoxify_model",
            "detoxify_checkpoint",
            "detoxify_model_dir",
        }
    )

    backend: Literal["profanity", "detoxify"] = Field(
        "profanity",
        description=(
            "profanity: alt-profanity-check, a linear model inside its wheel (offline, fast;"
            " explicit profanity and slurs). detoxify: a transformer classifier (needs its"
            " checkpoint on disk, see detoxify_checkpoint; slower, catches more)."
        ),
    )
    thresholds: dict[str, float] | None = Field(
        None,
        description=(
            "Per label, the score at or above which a document is removed. A label of the backend"
            " missing here is scored but never removes. Default: profanity backend"
            f" {{'{PROFANITY_LABEL}': {DEFAULT_PROFANITY_THRESHOLD}}} (chosen by the sweep in"
            " bench/toxicity_eval.md); detoxify backend"
            f" {DEFAULT_DETOXIFY_THRESHOLD} for each harm label the checkpoint has"
            f" ({', '.join(DETOXIFY_HARM_LABELS)}), identity-mention labels never remove."
        ),
    )
    chunk_chars: int = Field(
        2000,
        ge=100,
        le=100_000,
        description=(
            "Documents are scored in chunks of about this many characters, cut at a line or space;"
            " a document's score is its highest chunk's. Both models were trained on comments and"
            " tweets; 2000 characters is about 400-500 BERT tokens, inside detoxify's 512."
        ),
    )
    max_chunks: int = Field(
        32,
        ge=1,
        description=(
            "At most this many chunks per document, spread evenly over longer documents: bounds"
            " the time and memory one huge document can take (32 x 2000 = 64 kB scored)."
        ),
    )
    detoxify_model: DetoxifyModel = Field(
        "original",
        description=(
            "Which official detoxify checkpoint to look for in the torch hub cache when"
            " detoxify_checkpoint is not set (detoxify's own names)."
        ),
    )
    detoxify_checkpoint: str | None = Field(
        None,
        description=(
            "Path of a detoxify checkpoint (.ckpt). Default: the file detoxify's downloader would"
            " have saved, $TORCH_HOME/hub/checkpoints/<name from its download URL>."
        ),
    )
    detoxify_model_dir: str | None = Field(
        None,
        description=(
            "Folder with the base transformer's config.json and tokenizer files, used instead of"
            " the hub id the checkpoint names (e.g. bert-base-uncased), which would otherwise have"
            " to be in the Hugging Face cache. Nothing is downloaded."
        ),
    )
    batch_size: int = Field(
        64, ge=1, description="Chunks scored per model call; speed and memory only."
    )
    device: str = Field(
        "cpu", description="torch device for the detoxify backend (cpu, cuda, cuda:1 ...)."
    )

    @field_validator("thresholds")
    @classmethod
    def _thresholds_are_probabilities(cls, value: dict[str, float] | None) -> Any:
        if value is None:
            return value
        bad = {label: t for label, t in value.items() if not 0.0 <= t <= 1.0}
        if bad:
            raise ValueError(f"thresholds must be in [0, 1]; got {bad}")
        return value

    @model_validator(mode="after")
    def _thresholds_fit_backend(self) -> ToxicityConfig:
        """Fill the profanity default; refuse labels the profanity model does not have.

        detoxify's labels come from its checkpoint, so they are checked when it is loaded,
        still before any document is scored.
        """
        if self.backend == "profanity":
            if self.thresholds is None:
                self.thresholds = {PROFANITY_LABEL: DEFAULT_PROFANITY_THRESHOLD}
            unknown = sorted(set(self.thresholds) - {PROFANITY_LABEL})
            if unknown:
                raise ValueError(
                    f"thresholds: labels {unknown} do not exist for backend 'profanity';"
                    f" its only label is '{PROFANITY_LABEL}'"
                )
        return self


class ToxicityScorer(Protocol):
    """A classifier: for each of its labels, one probability-like score in [0, 1] per text."""

    labels: tuple[str, ...]

    def score(self, texts: list[str]) -> dict[str, list[float]]: ...


class ToxicityLabelError(ValueError):
    """Thresholds name labels the loaded classifier does not produce."""


class ProfanityScorer:
    """alt-profanity-check: TF-IDF over words and a calibrated linear SVM, shipped in its wheel."""

    labels: tuple[str, ...] = (PROFANITY_LABEL,)

    def __init__(self) -> None:
        # Importing loads the model from the wheel (about 1.5 s), so it happens once, here.
        from profanity_check import predict_prob

        self._predict_prob = predict_prob

    def score(self, texts: list[str]) -> dict[str, list[float]]:
        if not texts:
            return {PROFANITY_LABEL: []}
        return {PROFANITY_LABEL: [float(p) for p in self._predict_prob(texts)]}


def resolve_detoxify_checkpoint(config: ToxicityConfig) -> Path:
    """The detoxify checkpoint the config names (its path, else its official model's file in the
    torch hub cache), or an error saying where it was looked for and how to add it."""
    return find_detoxify_checkpoint(config.detoxify_checkpoint, config.detoxify_model)


_SCORERS: dict[tuple[Any, ...], ToxicityScorer] = {}
_SCORERS_LOCK = threading.Lock()


def load_scorer(config: ToxicityConfig) -> ToxicityScorer:
    """The config's classifier, loaded once per process and shared by the units it runs.

    Raises before any document is scored when the model is missing or the thresholds name labels
    it does not have, so a bad setup fails the first unit, not the hundredth.
    """
    if config.backend == "profanity":
        key: tuple[Any, ...] = ("profanity",)
    else:
        checkpoint = resolve_detoxify_checkpoint(config)
        key = ("detoxify", str(checkpoint.resolve()), config.detoxify_model_dir, config.device)
    with _SCORERS_LOCK:
        scorer = _SCORERS.get(key)
        if scorer is None:
            if config.backend == "profanity":
                scorer = ProfanityScorer()
            else:
                scorer = DetoxifyScorer(checkpoint, config.detoxify_model_dir, config.device)
            _SCORERS[key] = scorer
    resolve_thresholds(config, scorer.labels)
    return scorer


def resolve_thresholds(config: ToxicityConfig, labels: Sequence[str]) -> dict[str, float]:
    """The thresholds in force for a classifier with these labels (defaults filled in)."""
    if config.thresholds is None:
        if config.backend == "profanity":
            return {PROFANITY_LABEL: DEFAULT_PROFANITY_THRESHOLD}
        return {
            label: DEFAULT_DETOXIFY_THRESHOLD for label in labels if label in DETOXIFY_HARM_LABELS
        }
    unknown = sorted(set(config.thresholds) - set(labels))
    if unknown:
        raise ToxicityLabelError(
            f"toxicity.thresholds names labels {unknown} that backend '{config.backend}' does not"
            f" produce; its labels are {list(labels)}"
        )
    return dict(config.thresholds)


def text_chunks(text: str, chunk_chars: int, max_chunks: int) -> tuple[list[str], bool]:
    """The pieces of a text to score, and whether some of the text was left out (sampled).

    Pieces are cut at the last newline (else space) in the second half of each window, so words
    and usually lines stay whole; a text without spaces is cut hard. A text needing more than
    ``max_chunks`` pieces gets ``max_chunks`` windows spread evenly from its start to its end:
    the work is bounded whatever the length, and no region is systematically skipped.
    """
    n = len(text)
    if n <= chunk_chars:
        piece = text.strip()
        return ([piece] if piece else []), False
    if -(-n // chunk_chars) <= max_chunks:
        chunks: list[str] = []
        start = 0
        while start < n and len(chunks) < max_chunks:
            end = _cut(text, start, chunk_chars)
            piece = text[start:end].strip()
            if piece:
                chunks.append(piece)
            start = end
        if start >= n:
            return chunks, False
        # Cuts at spaces made the pieces short enough to overflow max_chunks: sample instead.
    chunks = []
    span = n - chunk_chars
    for i in range(max_chunks):
        start = round(i * span / (max_chunks - 1)) if max_chunks > 1 else 0
        if start and not text[start - 1].isspace():
            space = _SPACE.search(text, start, min(n, start + chunk_chars // 4))
            if space:
                start = space.end()
        piece = text[start : _cut(text, start, chunk_chars)].strip()
        if piece:
            chunks.append(piece)
    return chunks, True


def _cut(text: str, start: int, size: int) -> int:
    end = start + size
    if end >= len(text):
        return len(text)
    for sep in ("\n", " "):
        at = text.rfind(sep, start + size // 2, end)
        if at != -1:
            return at + 1
    return end


def score_texts(
    texts: Sequence[str | None],
    scorer: ToxicityScorer,
    chunk_chars: int = 2000,
    max_chunks: int = 32,
    batch_size: int = 64,
) -> tuple[dict[str, list[float | None]], Counter[str]]:
    """Each text's score per label (the highest over its chunks; None for nothing to score).

    Chunks of all texts are pooled and scored in batches of similar length, so short and long
    documents do not pad each other out. Returns the scores and counts (documents_scored,
    chunks_scored, documents_sampled, documents_empty).
    """
    owners: list[int] = []
    pieces: list[str] = []
    stats: Counter[str] = Counter()
    for i, text in enumerate(texts):
        chunks, sampled = text_chunks(text or "", chunk_chars, max_chunks)
        if not chunks:
            stats["documents_empty"] += 1
            continue
        stats["documents_scored"] += 1
        stats["documents_sampled"] += sampled
        owners.extend([i] * len(chunks))
        pieces.extend(chunks)
    stats["chunks_scored"] += len(pieces)
    scores: dict[str, list[float | None]] = {label: [None] * len(texts) for label in scorer.labels}
    order = sorted(range(len(pieces)), key=lambda k: len(pieces[k]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        result = scorer.score([pieces[k] for k in batch])
        for label in scorer.labels:
            column = scores[label]
            for k, value in zip(batch, result[label], strict=True):
                owner = owners[k]
                value = min(1.0, max(0.0, value))
                current = column[owner]
                if current is None or value > current:
                    column[owner] = value
    return scores, stats


# ---------------------------------------------------------------------------------------------
# Decisions


def toxic_rejection(
    scores: dict[str, float | None], thresholds: dict[str, float]
) -> Rejection | None:
    """A document's fate from its scores: removed for the label scoring highest among those at or
    over their threshold (ties: the label last in name order), else kept."""
    over = [
        (score, label)
        for label, threshold in thresholds.items()
        if (score := scores[label]) is not None and score >= threshold
    ]
    if not over:
        return None
    score, label = max(over)
    return Rejection(REASON_PREFIX + label, f"{label}={score:.3f} ≥ {thresholds[label]}")


def decide(table: pa.Table, scores: pa.Table, config: ToxicityConfig) -> ShardResult:
    """Keep or reject each document from its scores (one row per input row, in order: see
    :func:`compute_scores`); kept and rejected rows both get the score columns. Stats are the
    scoring counters plus ``removed_<label>`` per removing label."""
    labels = [name.removeprefix(COLUMN_PREFIX) for name in scores.column_names]
    thresholds = resolve_thresholds(config, labels)
    columns = {label: scores.column(COLUMN_PREFIX + label).to_pylist() for label in thresholds}
    decisions = [
        toxic_rejection({label: values[row] for label, values in columns.items()}, thresholds)
        for row in range(table.num_rows)
    ]
    stats: Counter[str] = Counter(json.loads(scores.schema.metadata[SCORE_STATS_METADATA]))
    stats.update(f"removed_{d.reason.removeprefix(REASON_PREFIX)}" for d in decisions if d)
    scored = table
    for name in scores.column_names:  # scored again: the new scores replace the old
        scored = put_column(scored, pa.field(name, pa.float64()), scores.column(name))
    return route(scored, decisions, stats)


def compute_scores(table: pa.Table, config: ToxicityConfig) -> pa.Table:
    """The scored side of a shard: a ``toxicity_<label>`` column per label of the classifier, one
    row per document, and :func:`score_texts`' counters in the schema metadata."""
    scorer = load_scorer(config)
    scores, stats = score_texts(
        table.column("text").to_pylist(),
        scorer,
        chunk_chars=config.chunk_chars,
        max_chunks=config.max_chunks,
        batch_size=config.batch_size,
    )
    fields = [pa.field(COLUMN_PREFIX + label, pa.float64()) for label in scorer.labels]
    metadata = {SCORE_STATS_METADATA: json.dumps(dict(stats), sort_keys=True).encode()}
    return pa.Table.from_arrays(
        [pa.array(scores[label], pa.float64()) for label in scorer.labels],
        schema=pa.schema(fields, metadata=metadata),
    )


def toxicity_documents(table: pa.Table, config: ToxicityConfig) -> ShardResult:
    """Score and decide one shard in memory (no stored scores): those at or over a label's
    threshold go to the rejected set."""
    return decide(table, compute_scores(table, config), config)


# ---------------------------------------------------------------------------------------------
# Stored scores


def score_key(table: pa.Table, config: ToxicityConfig) -> str:
    """What stored scores must match: the texts scored, the scorer fields, the code version.

    The texts themselves (length-prefixed, in order) rather than the input shard's hash: they are
    all that a score depends on, and they are in memory anyway. Thresholds are not in the key, so
    a run that only moves them finds the stored scores.
    """
    digest = hashlib.sha256()
    for text in table.column("text").to_pylist():
        data = (text or "").encode("utf-8", "surrogatepass")  # null scores as "" does
        digest.update(len(data).to_bytes(8, "little") + data)
    return unit_key(STAGE, config, digest.hexdigest(), fields=config.SCORER_FIELDS)


def toxicity_unit(unit: WorkUnit, config: ToxicityConfig, stage_dir: str) -> ShardResult:
    """One unit: its scores from ``_scores/`` when their key matches, else scored and stored (the
    shared :func:`~llmflow.tasks.core.stage.cached_table`), then decisions. Stats count documents
    whose scores were reused (``scores_reused``) or computed (``scores_computed``)."""
    table = read_unit_input(unit)
    path = shards.join(stage_dir, SCORES_DIR, f"{unit.name}.parquet")
    key = score_key(table, config)
    scores, reused = cached_table(path, key, lambda: compute_scores(table, config))
    result = decide(table, scores, config)
    result.stats["scores_reused" if reused else "scores_computed"] += table.num_rows
    return result


@task(name="toxicity-shard", cache_policy=NO_CACHE, persist_result=False)
def toxicity_shard(unit: WorkUnit, config: ToxicityConfig, stage_dir: str) -> UnitRecord:
    return run_unit(stage_dir, unit, lambda _: toxicity_unit(unit, config, stage_dir))
