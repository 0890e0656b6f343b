"""How datatrove 0.10.1 measures a text for FineWeb's rules: repetition, words, C4's line pass.

The pieces :mod:`llmflow.tasks.curate.quality_signals` builds its signals from, each a pure
function of a text (or its words) with datatrove's definition: duplicated paragraphs and lines
(``find_duplicates``), the top and the duplicated n-grams (``find_top_duplicate``,
``find_all_duplicate``), Gopher's "words" (tokens not made only of punctuation) and the line
filters of ``C4QualityFilter``. Kept apart from the signal table so that each file reads in one
sitting.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import numpy as np

from llmflow.tasks.curate.english_words import (
    SPACE,
    TERMINAL_PUNCTUATION,
    TokenProperty,
    count_sentences,
    line_tokens,
)

if TYPE_CHECKING:
    from llmflow.tasks.curate.quality import QualityConfig

# datatrove's PUNCTUATION (utils/text.py): a word made only of these (or of TERMINAL_PUNCTUATION)
# is a "symbol".
_DT_PUNCTUATION = (
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))
)
PUNCTUATION_SET = frozenset(_DT_PUNCTUATION) | TERMINAL_PUNCTUATION


def _is_word(token: str) -> bool:
    """datatrove's Gopher "word": not made only of punctuation."""
    return any(ch not in PUNCTUATION_SET for ch in token)


IS_WORD = TokenProperty(lambda t: int(_is_word(t)))
WORD_LENGTH = TokenProperty(lambda t: len(t) if _is_word(t) else 0)
HAS_LETTER = TokenProperty(lambda t: int(any(ch.isalpha() for ch in t)))

PARAGRAPHS = re.compile(r"\n{2,}")
LINES = re.compile(r"\n+")
CITATION_REGEX = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
_END_PUNCTUATION = (".", "?", "!", '"', "'")
POLICY_SUBSTRINGS = (
    "terms of use",
    "privacy policy",
    "cookie policy",
    "uses cookies",
    "use of cookies",
    "use cookies",
)
# Why a C4 line was dropped; counted per rule in the stage's stats.
C4_LINE_RULES = ("too_long_word", "no_terminal_punct", "too_few_words", "javascript", "policy")


def duplicates(items: list[str]) -> tuple[int, int]:
    """datatrove's find_duplicates: repeated elements and their characters, first copies free."""
    counts = Counter(items)
    repeated = len(items) - len(counts)
    if not repeated:
        return 0, 0
    return repeated, sum(len(x) * (c - 1) for x, c in counts.items() if c > 1)


def top_ngram_chars(words: list[str], n: int) -> int:
    """Characters covered by the most frequent n-gram (datatrove's find_top_duplicate)."""
    grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    if not grams:
        return 0
    # Tokens hold no spaces, so tuples compare exactly as datatrove's " "-joined strings; ties go
    # to the n-gram seen first, as Counter.most_common does.
    top, count = grams.most_common(1)[0]
    return (sum(map(len, top)) + n - 1) * count


def _duplicated_ngram_chars(joined: str, offsets: list[int], n: int) -> int:
    """Characters in repeated n-grams, scanning greedily (datatrove's find_all_duplicate).

    An n-gram is its words joined without spaces, as datatrove joins them: here the slice of
    ``joined`` (all words, no spaces) between word offsets ``i`` and ``i + n``.
    """
    grams = list(map(joined.__getitem__, map(slice, offsets, offsets[n:])))
    if len(set(grams)) == len(grams):
        return 0
    unique: set[str] = set()
    repeated = 0
    idx = 0
    while idx < len(grams):
        gram = grams[idx]
        if gram in unique:
            repeated += len(gram)
            idx += n
        else:
            unique.add(gram)
            idx += 1
    return repeated


def duplicated_ngrams(words: list[str], sizes: Sequence[int]) -> dict[int, int]:
    """``_duplicated_ngram_chars`` for every size, skipping sizes where no n-gram repeats.

    Building every n-gram string of six sizes is most of the cost, and in most documents no
    n-gram repeats. So each n-gram is first reduced to a polynomial hash of its characters
    (numpy, no strings built): equal n-grams have equal hashes, so a size whose hashes are all
    distinct has no repeat and scores 0 exactly. Only a size with equal hashes (a repeat, or a
    rare collision) is scanned with the strings. A crafted text can force the scan, never a
    wrong count.
    """
    if not sizes:
        return {}
    offsets = list(accumulate(map(len, words), initial=0))
    joined = "".join(words)
    found = dict.fromkeys(sizes, 0)
    if len(words) - min(sizes) + 1 >= 2:
        keys = _NgramKeys(joined, offsets)
        for n in sizes:
            if keys.may_repeat(n):
                found[n] = _duplicated_ngram_chars(joined, offsets, n)
    return found


# Odd, so powers of it never reach 0 modulo 2**64 (numpy's uint64 arithmetic wraps).
_HASH_BASE = np.uint64(0x9E3779B97F4A7C15)
_base_powers = np.ones(1, dtype=np.uint64)


class _NgramKeys:
    """Hashes of a text's substrings between word offsets: ``key(a, b)`` is the sum of
    ``char[j] * BASE**(j - a + N)`` over ``a <= j < b`` (N: the text's length), mod 2**64, so it
    depends only on the substring's characters and not on where it sits."""

    def __init__(self, joined: str, offsets: list[int]) -> None:
        global _base_powers
        codes = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        length = len(codes)
        powers = _base_powers
        if len(powers) < 2 * length + 1:
            grown = np.full(2 * length + 1, _HASH_BASE, dtype=np.uint64)
            grown[0] = 1
            powers = _base_powers = np.cumprod(grown)  # (replaced whole: safe between threads)
        self.prefix = np.zeros(length + 1, dtype=np.uint64)
        np.cumsum(codes.astype(np.uint64) * powers[:length], out=self.prefix[1:])
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.shift = powers[length - self.offsets]

    def may_repeat(self, n: int) -> bool:
        """Whether two n-grams (n words each) could be equal: False means they are all distinct."""
        starts, ends = self.offsets[:-n], self.offsets[n:]
        keys = (self.prefix[ends] - self.prefix[starts]) * self.shift[:-n]
        keys.sort()
        return bool((keys[1:] == keys[:-1]).any())


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class C4Lines:
    """What C4QualityFilter's line pass (split_paragraph=True) leaves of a document."""

    kept: list[str]  # kept lines, stripped, citations removed
    removed: list[int]  # indexes (in text.splitlines()) of removed lines
    rules: list[str]  # why each was removed (C4_LINE_RULES)
    lorem_ipsum: bool  # a line reaching that check mentions lorem ipsum
    curly_bracket: bool  # a line reaching that check holds "{"
    sentences: int  # sentences of the kept lines (spaCy sentencizer, line by line)
    words: int  # words of the kept lines: those of the text C4 leaves


def c4_lines(text: str, config: QualityConfig) -> C4Lines:
    """C4QualityFilter's line pass, as datatrove runs it.

    datatrove stops at the first lorem-ipsum or curly-bracket line (the document is dropped); here
    the pass goes on, so the counts are also right when those rules are switched off.
    """
    result = C4Lines([], [], [], False, False, 0, 0)
    max_word = config.c4_max_word_length
    for index, raw in enumerate(text.splitlines()):
        line = raw.strip()
        words = line.split()
        rule = None
        if max_word != -1 and words and max(map(len, words)) > max_word:
            rule = "too_long_word"
        else:
            if config.c4_remove_citations and "[" in line:
                line = CITATION_REGEX.sub("", line)
            if config.c4_filter_no_terminal_punct and (
                not line.endswith(_END_PUNCTUATION) or line.endswith("...")
            ):
                rule = "no_terminal_punct"
            elif len(words) < config.c4_min_words_per_line:
                rule = "too_few_words"
            else:
                lowered = line.lower()
                if "lorem ipsum" in lowered:
                    result.lorem_ipsum = True
                if config.c4_filter_javascript and "javascript" in lowered:
                    rule = "javascript"
                else:
                    if "{" in line:
                        result.curly_bracket = True
                    if config.c4_filter_policy and any(p in lowered for p in POLICY_SUBSTRINGS):
                        rule = "policy"
        if rule is None:
            result.kept.append(line)
            tokens = line_tokens(line)
            result.sentences += count_sentences(tokens)
            result.words += len(tokens) - tokens.count(SPACE)
        else:
            result.removed.append(index)
            result.rules.append(rule)
    return result


def apply_c4_edits(text: str, removed: Sequence[int], config: QualityConfig) -> str:
    """The text C4 leaves: lines not removed, stripped, citations removed, joined, stripped."""
    dropped = set(removed)
    lines = []
    for index, raw in enumerate(text.splitlines()):
        if index in dropped:
            continue
        line = raw.strip()
        if config.c4_remove_citations and "[" in line:
            line = CITATION_REGEX.sub("", line)
        lines.append(line)
    return "\n".join(lines).strip()
