"""The hash check that skips n-gram sizes without repeats never changes a count."""

from __future__ import annotations

import random
from itertools import accumulate

import pytest

from llmflow.tasks.curate import quality_measures
from llmflow.tasks.curate.quality_measures import _duplicated_ngram_chars, duplicated_ngrams

PROSE = "the quick brown fox jumps over the lazy dog while a cat sleeps on the warm mat"


def _scanned(words: list[str], sizes: tuple[int, ...]) -> dict[int, int]:
    """datatrove's greedy scan at every size, no check first."""
    offsets = list(accumulate(map(len, words), initial=0))
    return {n: _duplicated_ngram_chars("".join(words), offsets, n) for n in sizes}


def test_duplicated_ngrams_equal_the_scan_at_every_size() -> None:
    rng = random.Random(0)
    # Few, short, overlapping words: n-grams whose words differ but whose joined text is equal
    # ("ab" + "a" == "a" + "ba"), empty and non-ASCII words; many texts repeat, some do not.
    vocabulary = ["a", "b", "ab", "ba", "aa", "é", "日本", "\ud800", "", "xyz"]
    repeated = 0
    for _ in range(3000):
        words = [rng.choice(vocabulary[: rng.randint(2, 10)]) for _ in range(rng.randint(0, 40))]
        for sizes in ((5, 6, 7, 8, 9, 10), (1, 2, 3)):
            expected = _scanned(words, sizes)
            assert duplicated_ngrams(words, sizes) == expected, words
            repeated += any(expected.values())
    assert 500 < repeated < 5500  # both paths: sizes that repeat and sizes that cannot
    assert duplicated_ngrams(["one"], (5,)) == {5: 0} and duplicated_ngrams(["x"] * 9, ()) == {}


def test_sizes_without_equal_hashes_are_never_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned: list[int] = []
    scan = quality_measures._duplicated_ngram_chars

    def counting(joined: str, offsets: list[int], n: int) -> int:
        scanned.append(n)
        return scan(joined, offsets, n)

    monkeypatch.setattr(quality_measures, "_duplicated_ngram_chars", counting)
    prose = PROSE.split()
    assert duplicated_ngrams(prose, (2, 5)) == {2: 0, 5: 0} and scanned == []
    repeat = prose[:6] + ["and"] + prose[:6]
    found = duplicated_ngrams(repeat, (5, 7))
    # The greedy scan counts the second copy's first 5-gram, then skips past the text's end.
    assert scanned == [5] and found == {5: len("".join(prose[:5])), 7: 0}
