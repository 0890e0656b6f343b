"""The quality classifier: learns, is deterministic with a seed, and loads only plain data."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from document_datasets import junk_texts

from llmflow.tasks.curate.text_classifier import (
    MODEL_JSON,
    WEIGHTS,
    ClassifierSettings,
    HeldOutMetrics,
    TextClassifier,
    held_out,
    load_model,
    train_classifier,
)

INSTRUCTIONS = (
    Path(__file__).resolve().parents[1]
    / "tasks/ingest/embedded/instructions/llmflow_instructions.jsonl"
)
SETTINGS = ClassifierSettings(n_features=2**16, seed=0)
Trained = tuple[TextClassifier, HeldOutMetrics]


def answers() -> list[str]:
    """The assistant turns of the conversations shipped with llmflow: the positives."""
    texts = []
    for line in INSTRUCTIONS.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        texts.append(" ".join(m["content"] for m in messages if m["role"] == "assistant"))
    return texts


@pytest.fixture(scope="module")
def trained() -> Trained:
    classifier, metrics = train_classifier(answers(), junk_texts(600, 1), SETTINGS)
    assert metrics is not None
    return classifier, metrics


def test_it_learns_the_labels(trained: Trained) -> None:
    classifier, metrics = trained
    assert metrics.positives > 20 and metrics.negatives > 50  # ~20% of each, held out
    assert metrics.roc_auc > 0.99
    assert metrics.precision > 0.9 and metrics.recall > 0.9
    good = "A list keeps its items in order; a set keeps each item once and has no order."
    bad = "Home | Login | Share | Menu | Cookies cheap free casino bonus win sale offer buy"
    scores = classifier.score([good, bad])
    assert scores.dtype == np.float32 and scores[0] > 0.5 > scores[1]


def test_same_seed_same_model_other_seed_other_model() -> None:
    pos, neg = answers(), junk_texts(300, 2)
    first, m1 = train_classifier(pos, neg, SETTINGS)
    again, m2 = train_classifier(pos, neg, SETTINGS)
    other, _ = train_classifier(pos, neg, SETTINGS.model_copy(update={"seed": 1}))
    assert first.digest() == again.digest() and m1 == m2
    np.testing.assert_array_equal(first.weights, again.weights)
    assert other.digest() != first.digest()


def test_saved_model_scores_the_same(tmp_path: Path, trained: Trained) -> None:
    classifier = trained[0]
    classifier.save(str(tmp_path), {"positives": 1, "negatives": 2})
    loaded = load_model(str(tmp_path))
    texts = answers()[:50] + junk_texts(50, 3)
    np.testing.assert_array_equal(loaded.score(texts), classifier.score(texts))
    assert loaded.digest() == classifier.digest()
    assert json.loads((tmp_path / MODEL_JSON).read_text())["trained_on"]["negatives"] == 2


def _saved(tmp_path: Path, trained: Trained) -> Path:
    trained[0].save(str(tmp_path), {})
    return tmp_path


def _write_array(path: Path, array: np.ndarray, allow_pickle: bool = False) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=allow_pickle)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.array([{"x": 1}], dtype=object), "not a plain array"),  # a pickle inside .npy
        (np.zeros(10, np.float32), "expected float32"),
        (np.zeros(2**16, np.float64), "expected float32"),
        (np.full(2**16, np.nan, np.float32), "not all finite"),
    ],
)
def test_crafted_weights_are_refused(
    tmp_path: Path, trained: Trained, weights: np.ndarray, message: str
) -> None:
    folder = _saved(tmp_path, trained)
    _write_array(folder / WEIGHTS, weights, allow_pickle=weights.dtype == object)
    with pytest.raises(ValueError, match=message) as error:
        load_model(str(folder))
    assert str(folder) in str(error.value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d | {"extra": 1}, "extra"),
        (lambda d: d | {"format": 99}, "format"),
        (lambda d: d | {"settings": d["settings"] | {"n_features": 2**40}}, "n_features"),
        (lambda d: d | {"intercept": "high"}, "intercept"),
    ],
)
def test_crafted_model_json_is_refused(
    tmp_path: Path, trained: Trained, edit: Callable[[dict[str, Any]], dict[str, Any]], message: str
) -> None:
    folder = _saved(tmp_path, trained)
    data = json.loads((folder / MODEL_JSON).read_text())
    (folder / MODEL_JSON).write_text(json.dumps(edit(data)))
    with pytest.raises(ValueError, match=f"(?s){MODEL_JSON} is not valid.*{message}"):
        load_model(str(folder))


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"no {MODEL_JSON}"):
        load_model(str(tmp_path))


def test_no_text_to_train_on_names_the_side_and_no_held_out_gives_no_metrics() -> None:
    held = [t for t in answers() if held_out(t)][:5]
    with pytest.raises(ValueError, match="no positive text to train on .5 given"):
        train_classifier(held, junk_texts(300, 4), SETTINGS)
    trained = [t for t in answers() if not held_out(t)][:5]  # none held out: nothing to measure
    classifier, metrics = train_classifier(trained, junk_texts(300, 4), SETTINGS)
    assert metrics is None and classifier.score(trained).shape == (5,)


def test_held_out_share_is_about_a_fifth() -> None:
    texts = [f"text number {i}" for i in range(5000)]
    share = sum(held_out(t) for t in texts) / len(texts)
    assert 0.17 < share < 0.23
