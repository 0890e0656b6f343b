"""Quality signals: what the quality stage measures about each document, before any decision.

This is the tagger half of Dolma's tagger/mixer split. Every rule of the stage (language ID, Gopher
repetition, Gopher quality, C4, FineWeb) is reduced to a measured value per document, stored as a
``quality_*`` column; :mod:`llmflow.tasks.curate.quality` then compares those values with
thresholds. Measuring is the expensive part and thresholds are what people tune, so a new
threshold re-decides from stored signals instead of measuring again.

Each signal is declared once, in :func:`signal_table`: its column name and type, how one
document's value is measured, and the removal rules that read it with their config thresholds.
The stored schema, the measuring and the decisions all read that table, so a new signal is one
entry there (plus its threshold field in :class:`~llmflow.tasks.curate.quality.QualityConfig`).

The definitions are datatrove 0.10.1's (``GopherRepetitionFilter``, ``GopherQualityFilter``,
``C4QualityFilter``, ``FineWebQualityFilter``), the public reference for FineWeb; words and C4
sentences are spaCy's English ones, as datatrove counts them
(:mod:`llmflow.tasks.curate.english_words`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from llmflow.tasks.core.stage import Rejection
from llmflow.tasks.curate.english_words import split_words
from llmflow.tasks.curate.language_id import identify_languages
from llmflow.tasks.curate.quality_measures import (
    HAS_LETTER,
    IS_WORD,
    LINES,
    PARAGRAPHS,
    WORD_LENGTH,
    C4Lines,
    c4_lines,
    duplicated_ngrams,
    duplicates,
    ratio,
    top_ngram_chars,
)

if TYPE_CHECKING:
    from llmflow.tasks.curate.quality import QualityConfig

# Bump when a signal's definition changes: stored signals made by another version are recomputed.
SIGNAL_VERSION = "1"

# ---------------------------------------------------------------------------------------------
# The declared signals: one entry per stored column.


@dataclass(frozen=True)
class Rule:
    """One removal rule on a signal: it fires when ``value <op> threshold``; ``reason`` names it.

    ``op`` is "<" or ">" (against a config threshold), "true" (a boolean signal) or "null" (no
    value: nothing was left to measure). A null value fires only "null", as datatrove skips what
    it cannot measure; with ``zero_passes`` a value of exactly 0 never fires (FineWeb's
    exclude_zero).
    """

    reason: str
    op: Literal["<", ">", "true", "null"]
    threshold: float | None = None
    zero_passes: bool = False

    def check(self, signal: str, value: Any) -> Rejection | None:
        """The rejection this rule gives a document whose ``signal`` measured ``value``, if any;
        the detail shows the value against the threshold."""
        if self.op == "null":
            if value is None:
                return Rejection(self.reason, "no lines left after the C4 line filters")
            return None
        if value is None or (self.zero_passes and value == 0):
            return None
        if self.op == "true":
            return Rejection(self.reason, f"{signal} is true") if value else None
        if not (value < self.threshold if self.op == "<" else value > self.threshold):
            return None
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        return Rejection(self.reason, f"{signal}={shown} {self.op} {self.threshold}")


def _below(reason: str, threshold: float | None, zero_passes: bool = False) -> tuple[Rule, ...]:
    """A rule firing under ``threshold``; none where the config switched it off (``None``)."""
    return () if threshold is None else (Rule(reason, "<", threshold, zero_passes),)


def _above(reason: str, threshold: float | None) -> tuple[Rule, ...]:
    """A rule firing over ``threshold``; none where the config switched it off (``None``)."""
    return () if threshold is None else (Rule(reason, ">", threshold),)


def _when(enabled: bool, rule: Rule) -> tuple[Rule, ...]:
    return (rule,) if enabled else ()


class Measured:
    """What one document's signals are measured from, each part computed on first use: the
    signals that read the same words or lines split them once."""

    def __init__(self, text: str, config: QualityConfig, language: tuple[str, float]) -> None:
        self.text = text
        self.config = config
        self.chars = len(text)
        # Identified for the whole shard at once (language_id.py), as it is fastest in batches.
        self.language = language

    @cached_property
    def paragraphs(self) -> list[str]:
        return PARAGRAPHS.split(self.text.strip())

    @cached_property
    def paragraph_repeats(self) -> tuple[int, int]:
        """Repeated paragraphs and their characters."""
        return duplicates(self.paragraphs)

    @cached_property
    def lines(self) -> list[str]:
        """Lines as GopherRepetitionFilter splits them (runs of newlines)."""
        return LINES.split(self.text)

    @cached_property
    def line_repeats(self) -> tuple[int, int]:
        """Repeated lines and their characters."""
        return duplicates(self.lines)

    @cached_property
    def split_lines(self) -> list[str]:
        """Lines as GopherQualityFilter splits them (``str.splitlines``)."""
        return self.text.splitlines()

    @cached_property
    def words(self) -> list[str]:
        return split_words(self.text)

    @cached_property
    def real_words(self) -> int:
        return sum(map(IS_WORD.__getitem__, self.words))

    @cached_property
    def repeated_ngram_chars(self) -> dict[int, int]:
        return duplicated_ngrams(self.words, self.config.rep_dup_ngram_sizes)

    @cached_property
    def c4(self) -> C4Lines:
        return c4_lines(self.text, self.config)

    @cached_property
    def fineweb_text(self) -> str:
        """The text C4 leaves, which the FineWeb rules read."""
        return "\n".join(self.c4.kept).strip()

    @cached_property
    def fineweb_lines(self) -> list[str]:
        return [line for line in self.fineweb_text.split("\n") if line.strip() != ""]


Measure = Callable[[Measured], Any]


@dataclass(frozen=True)
class Signal:
    """One stored column: its name and type, how a document's value is measured, and the
    removal rules that read it, in the order they are tried."""

    name: str
    type: pa.DataType
    measure: Measure
    rules: tuple[Rule, ...] = ()

    def check(self, value: Any) -> Rejection | None:
        """The first of this signal's rules that fires on ``value``, or None."""
        for rule in self.rules:
            if (rejection := rule.check(self.name, value)) is not None:
                return rejection
        return None


_F64, _I64 = pa.float64(), pa.int64()


def _fineweb(measure: Callable[[Measured, int], float | None]) -> Measure:
    """A FineWeb signal: measured over the lines C4 leaves, null when it leaves none."""
    return lambda m: measure(m, len(m.fineweb_lines)) if m.fineweb_lines else None


def _top_ngram(n: int, threshold: float) -> Signal:
    return Signal(
        f"quality_rep_top_{n}gram_char_frac",
        _F64,
        lambda m: top_ngram_chars(m.words, n) / m.chars,
        _above(f"gopher_rep_top_{n}gram", threshold),
    )


def _duplicated_ngram(n: int, threshold: float) -> Signal:
    return Signal(
        f"quality_rep_dup_{n}gram_char_frac",
        _F64,
        lambda m: m.repeated_ngram_chars[n] / m.chars,
        _above(f"gopher_rep_dup_{n}gram", threshold),
    )


def signal_table(config: QualityConfig) -> tuple[Signal, ...]:
    """Every stored signal, in FineWeb's pipeline order: the rules are tried in this order and
    the first that fires is the document's reason. ``lang`` and ``lang_score`` are read together
    by the stage's language rule, tried before all of these."""
    c = config
    ellipses = ("...", "…")
    stop_words, stop_chars = c.gopher_stop_words_set, c.fineweb_stop_chars_tuple
    return (
        Signal("lang", pa.string(), lambda m: m.language[0]),
        Signal("lang_score", _F64, lambda m: m.language[1]),
        # Gopher repetition (datatrove GopherRepetitionFilter)
        Signal(
            "quality_rep_dup_para_frac",
            _F64,
            lambda m: m.paragraph_repeats[0] / len(m.paragraphs),
            _above("gopher_rep_dup_para_frac", c.rep_max_dup_para_frac),
        ),
        Signal(
            "quality_rep_dup_para_char_frac",
            _F64,
            lambda m: m.paragraph_repeats[1] / m.chars,
            _above("gopher_rep_dup_para_char_frac", c.rep_max_dup_para_char_frac),
        ),
        Signal(
            "quality_rep_dup_line_frac",
            _F64,
            lambda m: m.line_repeats[0] / len(m.lines),
            _above("gopher_rep_dup_line_frac", c.rep_max_dup_line_frac),
        ),
        Signal(
            "quality_rep_dup_line_char_frac",
            _F64,
            lambda m: m.line_repeats[1] / m.chars,
            _above("gopher_rep_dup_line_char_frac", c.rep_max_dup_line_char_frac),
        ),
        *map(_top_ngram, c.rep_top_ngram_sizes, c.rep_top_ngram_max_char_frac),
        *map(_duplicated_ngram, c.rep_dup_ngram_sizes, c.rep_dup_ngram_max_char_frac),
        # Gopher quality (datatrove GopherQualityFilter)
        Signal(
            "quality_gopher_words",
            _I64,
            lambda m: m.real_words,
            _below("gopher_min_words", c.gopher_min_words)
            + _above("gopher_max_words", c.gopher_max_words),
        ),
        Signal(
            "quality_gopher_mean_word_length",
            _F64,
            lambda m: ratio(sum(map(WORD_LENGTH.__getitem__, m.words)), m.real_words),
            _below("gopher_min_mean_word_length", c.gopher_min_mean_word_length)
            + _above("gopher_max_mean_word_length", c.gopher_max_mean_word_length),
        ),
        Signal(
            "quality_gopher_hash_ratio",
            _F64,
            lambda m: ratio(m.text.count("#"), len(m.words)),
            _above("gopher_hash_ratio", c.gopher_max_symbol_word_ratio),
        ),
        Signal(
            "quality_gopher_ellipsis_ratio",
            _F64,
            lambda m: ratio(m.text.count("...") + m.text.count("…"), len(m.words)),
            _above("gopher_ellipsis_ratio", c.gopher_max_symbol_word_ratio),
        ),
        Signal(
            "quality_gopher_bullet_line_frac",
            _F64,
            lambda m: ratio(
                sum(1 for s in m.split_lines if s.lstrip().startswith(("•", "-"))),
                len(m.split_lines),
            ),
            _above("gopher_bullet_lines", c.gopher_max_bullet_line_frac),
        ),
        Signal(
            "quality_gopher_ellipsis_line_frac",
            _F64,
            lambda m: ratio(
                sum(1 for s in m.split_lines if s.rstrip().endswith(ellipses)), len(m.split_lines)
            ),
            _above("gopher_ellipsis_lines", c.gopher_max_ellipsis_line_frac),
        ),
        Signal(
            "quality_gopher_alpha_word_frac",
            _F64,
            lambda m: ratio(sum(map(HAS_LETTER.__getitem__, m.words)), len(m.words)),
            _below("gopher_alpha_words", c.gopher_min_alpha_word_frac),
        ),
        Signal(
            "quality_gopher_stop_words",
            _I64,
            lambda m: len(stop_words.intersection(m.words)),
            _below("gopher_stop_words", c.gopher_min_stop_words),
        ),
        # C4 (datatrove C4QualityFilter): whole-document checks after its line pass
        Signal(
            "quality_c4_lorem_ipsum",
            pa.bool_(),
            lambda m: m.c4.lorem_ipsum,
            _when(c.c4_filter_lorem_ipsum, Rule("c4_lorem_ipsum", "true")),
        ),
        Signal(
            "quality_c4_curly_bracket",
            pa.bool_(),
            lambda m: m.c4.curly_bracket,
            _when(c.c4_filter_curly_bracket, Rule("c4_curly_bracket", "true")),
        ),
        Signal(
            "quality_c4_sentences",
            _I64,
            lambda m: m.c4.sentences,
            _below("c4_min_sentences", c.c4_min_sentences),
        ),
        Signal("quality_c4_lines_removed", _I64, lambda m: len(m.c4.removed)),
        # FineWeb (datatrove FineWebQualityFilter) on the text C4 leaves
        Signal(
            "quality_fineweb_line_punct_ratio",
            _F64,
            _fineweb(lambda m, n: sum(1 for s in m.fineweb_lines if s.endswith(stop_chars)) / n),
            (Rule("fineweb_empty", "null"),)
            + _below(
                "fineweb_line_punct_ratio",
                c.fineweb_min_line_punct_ratio,
                zero_passes=c.fineweb_line_punct_exclude_zero,
            ),
        ),
        Signal(
            "quality_fineweb_short_line_ratio",
            _F64,
            _fineweb(
                lambda m, n: (
                    sum(1 for s in m.fineweb_lines if len(s) <= c.fineweb_short_line_length) / n
                )
            ),
            _above("fineweb_short_line_ratio", c.fineweb_max_short_line_ratio),
        ),
        Signal(
            "quality_fineweb_dup_line_char_ratio",
            _F64,
            _fineweb(
                lambda m, n: ratio(
                    duplicates(m.fineweb_lines)[1], len(m.fineweb_text.replace("\n", ""))
                )
            ),
            _above("fineweb_dup_line_char_ratio", c.fineweb_max_dup_line_char_ratio),
        ),
        Signal(
            "quality_fineweb_newline_ratio",
            _F64,
            _fineweb(lambda m, n: ratio(m.fineweb_text.count("\n"), m.c4.words)),
            _above("fineweb_newline_ratio", c.fineweb_max_newline_ratio),
        ),
    )


# Not signals but what the decision step needs to redo C4's line edits without measuring again.
EDIT_COLUMNS = (
    Signal("c4_removed_lines", pa.list_(pa.int32()), lambda m: m.c4.removed),
    Signal("c4_removed_rules", pa.list_(pa.string()), lambda m: m.c4.rules),
)


def signal_columns(config: QualityConfig) -> list[str]:
    """The names of the stored signal columns, in :func:`signal_table` order."""
    return [signal.name for signal in signal_table(config)]


def compute_signals(texts: Sequence[str | None], config: QualityConfig) -> pa.Table:
    """The signals (and C4's line edits) of a shard's documents, one row each, in order.

    Empty documents and documents over ``config.max_chars`` get null signals and no edits (the
    decision step rejects them as ``empty`` / ``too_long``): measuring a 50 MB page word by word
    is the one thing that could take minutes.
    """
    columns = (*signal_table(config), *EDIT_COLUMNS)
    measured_rows = [
        i for i, text in enumerate(texts) if text and text.strip() and len(text) <= config.max_chars
    ]
    limit = config.language_id_chars or None  # 0: the whole text
    prefixes = [str(texts[i])[:limit] for i in measured_rows]
    languages = dict(zip(measured_rows, identify_languages(prefixes), strict=True))
    blank: list[Any] = [[] if pa.types.is_list(column.type) else None for column in columns]
    values: list[list[Any]] = [[] for _ in columns]
    for i, text in enumerate(texts):
        language = languages.get(i)
        if text is None or language is None:
            row = blank
        else:
            measured = Measured(text, config, language)
            row = [column.measure(measured) for column in columns]
        for out, value in zip(values, row, strict=True):
            out.append(value)
    return pa.table(
        {
            column.name: pa.array(out, column.type)
            for column, out in zip(columns, values, strict=True)
        }
    )
