"""Language identification with py3langid's model, many documents at a time.

py3langid walks each document's UTF-8 bytes through its tokenizer's automaton one byte at a time in
Python, then scores the features it met against a float16 table: about 2 CPU-ms per 2 KB document,
a third of the quality stage. The answers here are py3langid's own, bit for bit
(``tests/test_language_id.py`` compares them with ``LanguageIdentifier.classify``); only the order
of work changes:

- the automaton steps every document of a batch at once (one numpy gather per byte position over
  documents sorted by length), so the Python loop runs once per position, not once per byte;
- the feature table is kept as float32, the type numpy converts float16 to for the product anyway,
  so it is converted once rather than on every document.

Short batches (a few very long documents, when ``language_id_chars`` is 0) gain nothing from
stepping together and walk through py3langid's own loop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

# A batch is at most this many (documents × byte positions) cells: 4M int32 features = 16 MB.
BATCH_CELLS = 1 << 22
# At most this many documents step together; fewer than MIN_BATCH walk one by one.
MAX_BATCH = 512
MIN_BATCH = 16


class _Model:
    """py3langid's model (from its wheel, probabilities normalized) in the arrays the batch uses."""

    def __init__(self) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.identifier: Any = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        ident = self.identifier
        self.next_move = np.asarray(ident.tk_nextmove, dtype=np.int32)
        self.row_base = np.asarray(ident._rowbase, dtype=np.int64)
        self.output = np.asarray(ident.tk_output, dtype=np.int32)
        self.feature_scores = np.asarray(ident.nb_ptc, dtype=np.float32)
        self.class_scores = ident.nb_pc
        self.classes: list[str] = list(ident.nb_classes)
        self.aliases: list[tuple[int, int]] = list(ident._alias_pairs)


@cache
def _model() -> _Model:
    return _Model()


def language_labels() -> list[str]:
    """The language codes py3langid can answer."""
    return list(_model().identifier.labels)


def identify_languages(texts: Sequence[str]) -> list[tuple[str, float]]:
    """The most likely language of each text and its probability, as py3langid's ``classify``."""
    model = _model()
    encoded = [model.identifier._encode(text) for text in texts]
    answers: list[tuple[str, float]] = [("", 0.0)] * len(texts)
    for batch in _batches(encoded):
        for row, features in zip(batch, _features(model, [encoded[i] for i in batch]), strict=True):
            answers[row] = _decide(model, features, len(encoded[row]))
    return answers


def _batches(encoded: list[bytes]) -> list[list[int]]:
    """Row numbers in batches of similar length, each within BATCH_CELLS and MAX_BATCH."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches: list[list[int]] = []
    batch: list[int] = []
    for i in order:
        longest = len(encoded[i])  # rows arrive shortest first: the newest row is the longest
        if batch and ((len(batch) + 1) * longest > BATCH_CELLS or len(batch) == MAX_BATCH):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def _features(model: _Model, texts: list[bytes]) -> list[np.ndarray]:
    """Each text's feature ids in the order the automaton emits them (py3langid's walk)."""
    if len(texts) < MIN_BATCH:
        return [_walk_one(model, text) for text in texts]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    width = int(lengths.max())
    columns = np.zeros((len(texts), width), dtype=np.uint8)
    for row, text in enumerate(texts):
        columns[row, : len(text)] = np.frombuffer(text, dtype=np.uint8)
    by_position = np.ascontiguousarray(columns.T, dtype=np.int64)
    emitted = np.empty((width, len(texts)), dtype=np.int32)
    state = np.zeros(len(texts), dtype=np.int64)
    next_move, row_base, output = model.next_move, model.row_base, model.output
    for position in range(width):
        state = next_move[row_base[state] + by_position[position]]
        emitted[position] = output[state]
    per_text = emitted.T
    found = []
    for row, length in enumerate(lengths.tolist()):
        features = per_text[row, :length]
        found.append(features[features >= 0])
    return found


def _walk_one(model: _Model, text: bytes) -> np.ndarray:
    from py3langid.langid import visit_counts

    ident = model.identifier
    visits = visit_counts(ident.tk_nextmove, ident._rowbase, ident.tk_output, text)
    if not visits:
        return np.empty(0, dtype=np.int32)
    # A Counter lists its keys in first-seen order: repeat each by its count to rebuild an
    # emission sequence whose first occurrences are in that order.
    return np.repeat(
        np.fromiter(visits.keys(), dtype=np.int32, count=len(visits)),
        np.fromiter(visits.values(), dtype=np.int64, count=len(visits)),
    )


def _decide(model: _Model, features: np.ndarray, n_bytes: int) -> tuple[str, float]:
    """py3langid's ``_decide`` and ``classify`` (norm_probs, no min_confidence) on features."""
    if features.size:
        ids, first, counts = np.unique(features, return_index=True, return_counts=True)
        seen = np.argsort(first, kind="stable")  # first-seen order, as the Counter py3langid sums
        scores = (
            np.log1p(counts[seen].astype(np.float32)) @ model.feature_scores[ids[seen]]
            + model.class_scores
        )
    else:
        scores = np.full(len(model.classes), 0.0, dtype=np.float32)
    scores *= 1.0 / math.sqrt(n_bytes or 1)
    np.exp(scores - scores.max(), out=scores)
    scores /= scores.sum()
    for i, j in model.aliases:
        scores[i] += scores[j]
        scores[j] = 0.0
    best = int(scores.argmax())
    return model.classes[best], float(scores[best])
