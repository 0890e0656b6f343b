"""A learned quality classifier: word unigrams and bigrams, hashed, into a logistic regression.

DCLM's filter is this shape of model (a bigram fastText classifier, instruction data against web
text). ``bench/quality_classifier.py`` measured fastText against scikit-learn's hashed n-grams
on the same splits: equal on DCLM's task (ROC AUC 0.9994 against 0.9998), better on clean
against junk text (0.973 against 0.918), a third of the training time, a 4 MB model against
815 MB, and no dependency llmflow does not already have (the toxicity backend installs
scikit-learn). So scikit-learn: ``HashingVectorizer`` (stateless: nothing to fit or store but
its settings) and ``SGDClassifier(loss="log_loss")``, trained single-threaded with a seed, so the
same texts and seed give the same weights.

The saved model is plain data, never a pickle: ``model.json`` (the settings, the intercept, the
versions) and ``weights.npy`` (one float32 weight per hashed feature), read back with
``allow_pickle=False`` and checked (:func:`load_model`), since a model path is something a user
can hand in. Scoring needs scikit-learn's vectorizer only; the weights are applied as a sparse
matrix product.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmflow.tasks.core import shards

__all__ = [
    "ClassifierSettings",
    "HeldOutMetrics",
    "TextClassifier",
    "held_out",
    "load_model",
    "train_classifier",
]

MODEL_JSON = "model.json"
WEIGHTS = "weights.npy"
FORMAT = 1
# The share of labelled texts held out (by a hash of the text, so the split does not depend on
# the order they were read in) to measure precision, recall and ROC AUC.
HELD_OUT_PERCENT = 20


class ClassifierSettings(BaseModel):
    """How texts become features and how the model learns: part of a scored unit's key."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n_features: int = Field(
        2**20, ge=2**10, le=2**24, description="Hashed feature slots (weights kept: 4 B each)."
    )
    max_ngram: int = Field(2, ge=1, le=3, description="Word n-grams up to this length.")
    max_chars: int = Field(
        10_000, ge=100, description="Only the first characters of a text are read."
    )
    alpha: float = Field(1e-6, gt=0, le=1, description="L2 regularization strength.")
    epochs: int = Field(20, ge=1, le=1000, description="Passes over the training texts.")
    seed: int = 0


@dataclass(frozen=True)
class HeldOutMetrics:
    """How the model did on the texts held out of training, at ``threshold``; ``labels`` and
    ``scores`` are kept so that another threshold can be measured without the texts
    (:func:`held_out_metrics`)."""

    positives: int
    negatives: int
    precision: float
    recall: float
    roc_auc: float
    threshold: float
    labels: tuple[int, ...] = ()
    scores: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, float]:
        return {
            "heldout_positives": self.positives,
            "heldout_negatives": self.negatives,
            "heldout_precision": self.precision,
            "heldout_recall": self.recall,
            "heldout_roc_auc": self.roc_auc,
            "threshold": self.threshold,
        }


class _ModelFile(BaseModel):
    """``model.json``: validated on load, so a crafted file fails with its field named."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    format: int = Field(FORMAT, ge=FORMAT, le=FORMAT)
    settings: ClassifierSettings
    intercept: float
    libraries: dict[str, str]
    trained_on: dict[str, int]


class TextClassifier:
    """A trained classifier: ``score(texts)`` is each text's probability of the positive class."""

    def __init__(self, settings: ClassifierSettings, weights: np.ndarray, intercept: float) -> None:
        if weights.shape != (settings.n_features,):
            raise ValueError(f"{weights.shape[0]} weights for {settings.n_features} features")
        self.settings = settings
        self.weights = weights.astype(np.float32, copy=False)
        self.intercept = float(intercept)
        self._vectorizer = _vectorizer(settings)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Probabilities (float32) that each text is of the positive class."""
        if not texts:
            return np.zeros(0, np.float32)
        limit = self.settings.max_chars
        features = self._vectorizer.transform([t[:limit] for t in texts])
        logits = features @ self.weights + self.intercept
        return (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).astype(np.float32)

    def digest(self) -> str:
        """A hash of the model: the scores' cache key depends on it, not on where it lies."""
        h = hashlib.sha256(self.settings.model_dump_json().encode())
        h.update(np.float64(self.intercept).tobytes())
        h.update(self.weights.tobytes())
        return h.hexdigest()

    def save(self, directory: str, trained_on: dict[str, int]) -> None:
        """``model.json`` and ``weights.npy`` in ``directory``, each written atomically."""
        model = _ModelFile(
            settings=self.settings,
            intercept=self.intercept,
            libraries={lib: version(lib) for lib in ("scikit-learn", "numpy")},
            trained_on=trained_on,
        )
        buffer = io.BytesIO()
        np.save(buffer, self.weights, allow_pickle=False)
        shards.write_bytes_atomic(shards.join(directory, WEIGHTS), buffer.getvalue())
        shards.write_json_atomic(shards.join(directory, MODEL_JSON), model.model_dump(mode="json"))


def _vectorizer(settings: ClassifierSettings) -> Any:
    from sklearn.feature_extraction.text import HashingVectorizer

    return HashingVectorizer(
        ngram_range=(1, settings.max_ngram),
        n_features=settings.n_features,
        alternate_sign=False,
        dtype=np.float32,
    )


def held_out(text: str) -> bool:
    """Whether a labelled text is held out of training (a fixed ~20% of texts, by content)."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()[0] * 100 < (
        HELD_OUT_PERCENT * 256
    )


def train_classifier(
    positives: Sequence[str],
    negatives: Sequence[str],
    settings: ClassifierSettings,
    threshold: float = 0.5,
) -> tuple[TextClassifier, HeldOutMetrics | None]:
    """Train on the texts not held out; measure on those held out (at ``threshold``), or give
    no metrics when a class has no held-out text (a few dozen texts of each are enough).

    Classes are weighted by their inverse frequency (a few hundred reference texts against
    thousands of crawled ones is the usual case). Raises ValueError, naming the side, when a
    class has no text to train on.
    """
    from sklearn.linear_model import SGDClassifier

    texts = [*positives, *negatives]
    labels = np.array([1] * len(positives) + [0] * len(negatives), np.int8)
    held = np.array([held_out(t) for t in texts], bool)
    for name, label in (("positive", 1), ("negative", 0)):
        if not ((labels == label) & ~held).any():
            count = int((labels == label).sum())
            raise ValueError(
                f"no {name} text to train on ({count} given, {HELD_OUT_PERCENT}% are held out"
                " by a hash of the text)"
            )
    vectorizer = _vectorizer(settings)
    limit = settings.max_chars
    features = vectorizer.transform([t[:limit] for t in texts])
    model = SGDClassifier(
        loss="log_loss",
        alpha=settings.alpha,
        max_iter=settings.epochs,
        tol=None,
        class_weight="balanced",
        random_state=settings.seed,
    )
    model.fit(features[~held], labels[~held])
    classifier = TextClassifier(
        settings, model.coef_[0].astype(np.float32), float(model.intercept_[0])
    )
    if len(set(labels[held].tolist())) < 2:
        return classifier, None
    scores = classifier.score([t for t, h in zip(texts, held, strict=True) if h])
    return classifier, held_out_metrics(labels[held], scores, threshold)


def held_out_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> HeldOutMetrics:
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    predicted = (scores >= threshold).astype(np.int8)
    return HeldOutMetrics(
        positives=int(labels.sum()),
        negatives=int((labels == 0).sum()),
        precision=float(precision_score(labels, predicted, zero_division=0.0)),
        recall=float(recall_score(labels, predicted, zero_division=0.0)),
        roc_auc=float(roc_auc_score(labels, scores)),
        threshold=threshold,
        labels=tuple(int(v) for v in labels),
        scores=tuple(float(v) for v in scores),
    )


def load_model(directory: str) -> TextClassifier:
    """A model saved by :meth:`TextClassifier.save`, checked: ValueError names what is wrong."""
    try:
        model = _ModelFile.model_validate_json(
            shards.read_bytes(shards.join(directory, MODEL_JSON))
        )
    except FileNotFoundError as e:
        raise ValueError(f"quality model {directory}: no {MODEL_JSON}") from e
    except ValidationError as e:
        raise ValueError(f"quality model {directory}: {MODEL_JSON} is not valid: {e}") from e
    try:
        data = shards.read_bytes(shards.join(directory, WEIGHTS))
    except FileNotFoundError as e:
        raise ValueError(f"quality model {directory}: no {WEIGHTS}") from e
    try:
        weights = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # a pickled, truncated or malformed array
        raise ValueError(f"quality model {directory}: {WEIGHTS} is not a plain array: {e}") from e
    expected = (model.settings.n_features,)
    if weights.dtype != np.float32 or weights.shape != expected:
        raise ValueError(
            f"quality model {directory}: {WEIGHTS} holds {weights.dtype} {weights.shape},"
            f" expected float32 {expected}"
        )
    if not np.isfinite(weights).all() or not math.isfinite(model.intercept):
        raise ValueError(f"quality model {directory}: weights are not all finite")
    return TextClassifier(model.settings, weights, model.intercept)
