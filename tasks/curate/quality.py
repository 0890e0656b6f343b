"""quality: language ID, then the Gopher, C4 and FineWeb rules, in FineWeb's order.

What each document measures (its signals) is kept apart from what is decided (Dolma's
tagger/mixer split): :mod:`llmflow.tasks.curate.quality_signals` declares and measures each
signal with the rules that read it, :func:`decide` applies those rules. Every output row, kept or
rejected, carries its ``quality_*`` signals, ``lang`` and ``lang_score``, so anyone can see how
far a document was from each threshold. The task stores each unit's signals under
``<stage_dir>/_signals/``, keyed by the input shard, the fields that change signals
(:attr:`QualityConfig.SIGNAL_FIELDS`) and the signal code version: a run that only moves
thresholds re-decides from them without measuring again.

Rules, definitions and defaults are datatrove 0.10.1's FineWeb pipeline (``LanguageFilter``,
``GopherRepetitionFilter``, ``GopherQualityFilter``, ``C4QualityFilter(filter_no_terminal_punct=
False)``, ``FineWebQualityFilter``); the first rule that fires, in that order, is the reason.
Language ID is py3langid (offline, its model in the wheel), not fastText's lid.176 that FineWeb
uses, so ``lang_score`` is py3langid's probability.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, ClassVar

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
from llmflow.tasks.curate.english_words import TERMINAL_PUNCTUATION
from llmflow.tasks.curate.quality_measures import C4_LINE_RULES, apply_c4_edits
from llmflow.tasks.curate.quality_signals import (
    EDIT_COLUMNS,
    SIGNAL_VERSION,
    compute_signals,
    signal_columns,
    signal_table,
)

STAGE = StageSpec(name="quality", version="1", libraries=("py3langid",))
SIGNALS_DIR = "_signals"

_GOPHER = "Gopher (Rae et al. 2021, Table A1)"
_DT = "datatrove 0.10.1"
_DT_REP = f"{_GOPHER}; {_DT} GopherRepetitionFilter default"
_DT_QUAL = f"Gopher (Rae et al. 2021, App. A); {_DT} GopherQualityFilter default"
_DT_C4 = f"C4 (Raffel et al. 2020, sec. 2.2); {_DT} C4QualityFilter default"
_DT_FW = f"FineWeb (Penedo et al. 2024); {_DT} FineWebQualityFilter default"
# datatrove's GopherQualityFilter STOP_WORDS (Gopher's list)
GOPHER_STOP_WORDS = ["the", "be", "to", "of", "and", "that", "have", "with"]


def _fraction(description: str, default: float | None) -> Any:
    return Field(default, ge=0, le=1, description=description)


class QualityConfig(StageConfig):
    """Which documents are good enough to train on: thresholds, and how signals are measured.

    A threshold set to ``None`` switches its rule off (datatrove switches off with a falsy value).
    """

    SIGNAL_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "max_chars",
            "language_id_chars",
            "rep_top_ngram_sizes",
            "rep_dup_ngram_sizes",
            "gopher_stop_words",
            "c4_remove_citations",
            "c4_filter_no_terminal_punct",
            "c4_min_words_per_line",
            "c4_max_word_length",
            "c4_filter_javascript",
            "c4_filter_policy",
            "fineweb_stop_chars",
            "fineweb_short_line_length",
        }
    )
    """Fields that change what is measured; every other field only changes decisions."""

    max_chars: int = Field(
        1_000_000,
        ge=1,
        description=(
            "Documents longer than this (characters) are rejected as too_long before anything is"
            " measured, with null signals: a 50 MB page must not stall a shard. 1M characters is"
            " ~170k words, past Gopher's 100k-word maximum, so no document this removes would"
            " have passed anyway (guard of this stage, not in datatrove)."
        ),
    )
    # Language ID
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        description=(
            "Languages kept (py3langid ISO 639 codes); empty keeps every language (the"
            " min_lang_score rule still applies, as in datatrove's LanguageFilter with"
            " languages=None). English by default: the Gopher stop words and the word splitter"
            " are English ones."
        ),
    )
    language_id_chars: int = Field(
        2000,
        ge=0,
        description=(
            "Language ID reads this many characters from the start of a document; 0 reads the"
            " whole text. py3langid's cost grows with the text while its answer settles within"
            " a few sentences: on the curation benchmark corpus the first 2,000 characters gave"
            " the whole text's keep/reject decision for every document (bench/curation.md)."
            " A language that changes after the prefix is not seen (guard of this stage, not"
            " in datatrove)."
        ),
    )
    min_lang_score: float = _fraction(
        "A document is kept only if its top language's probability exceeds this. 0.65 is"
        f" FineWeb's value ({_DT} LanguageFilter default language_threshold). Must be >= 0.5:"
        " then 'the top language is allowed and above the threshold' is exactly datatrove's"
        " 'some allowed language is above the threshold'.",
        0.65,
    )
    # Gopher repetition
    rep_max_dup_line_frac: float | None = _fraction(
        f"Max fraction of lines that repeat an earlier line. 0.30: {_DT_REP}.", 0.3
    )
    rep_max_dup_para_frac: float | None = _fraction(
        f"Max fraction of paragraphs that repeat an earlier one. 0.30: {_DT_REP}.", 0.3
    )
    rep_max_dup_line_char_frac: float | None = _fraction(
        f"Max fraction of characters in repeated lines. 0.20: {_DT_REP}.", 0.2
    )
    rep_max_dup_para_char_frac: float | None = _fraction(
        f"Max fraction of characters in repeated paragraphs. 0.20: {_DT_REP}.", 0.2
    )
    rep_top_ngram_sizes: list[int] = Field(
        default_factory=lambda: [2, 3, 4],
        description=f"n of the 'top n-gram character fraction' signals. 2, 3, 4: {_DT_REP}.",
    )
    rep_top_ngram_max_char_frac: list[float] = Field(
        default_factory=lambda: [0.2, 0.18, 0.16],
        description=(
            "Max fraction of characters covered by the most frequent n-gram, one per"
            f" rep_top_ngram_sizes. 0.20, 0.18, 0.16: {_DT_REP}."
        ),
    )
    rep_dup_ngram_sizes: list[int] = Field(
        default_factory=lambda: [5, 6, 7, 8, 9, 10],
        description=f"n of the 'duplicated n-gram character fraction' signals. 5..10: {_DT_REP}.",
    )
    rep_dup_ngram_max_char_frac: list[float] = Field(
        default_factory=lambda: [0.15, 0.14, 0.13, 0.12, 0.11, 0.10],
        description=(
            "Max fraction of characters inside repeated n-grams, one per rep_dup_ngram_sizes."
            f" 0.15 down to 0.10: {_DT_REP}."
        ),
    )
    # Gopher quality
    gopher_min_words: int | None = Field(
        50, ge=0, description=f"Min words (not counting punctuation-only ones). 50: {_DT_QUAL}."
    )
    gopher_max_words: int | None = Field(
        100_000, ge=0, description=f"Max words (not counting punctuation). 100,000: {_DT_QUAL}."
    )
    gopher_min_mean_word_length: float | None = Field(
        3, ge=0, description=f"Min mean word length, characters. 3: {_DT_QUAL}."
    )
    gopher_max_mean_word_length: float | None = Field(
        10, ge=0, description=f"Max mean word length, characters. 10: {_DT_QUAL}."
    )
    gopher_max_symbol_word_ratio: float | None = Field(
        0.1,
        ge=0,
        description=f"Max ratio of '#' to words, and of '...'/'…' to words. 0.1: {_DT_QUAL}.",
    )
    gopher_max_bullet_line_frac: float | None = _fraction(
        f"Max fraction of lines starting with a bullet ('•' or '-'). 0.9: {_DT_QUAL}.", 0.9
    )
    gopher_max_ellipsis_line_frac: float | None = _fraction(
        f"Max fraction of lines ending with an ellipsis. 0.3: {_DT_QUAL}.", 0.3
    )
    gopher_min_alpha_word_frac: float | None = _fraction(
        "Min fraction of words holding a letter (datatrove calls it max_non_alpha_words_ratio)."
        f" 0.8: {_DT_QUAL}.",
        0.8,
    )
    gopher_min_stop_words: int | None = Field(
        2,
        ge=0,
        description=f"Min distinct stop words present (case-sensitive). 2: {_DT_QUAL}.",
    )
    gopher_stop_words: list[str] = Field(
        default_factory=lambda: list(GOPHER_STOP_WORDS),
        description=f"The stop words: Gopher's eight ('the', 'be', 'to', ...), {_DT} STOP_WORDS.",
    )
    # C4
    c4_remove_citations: bool = Field(
        True, description=f"Remove Wikipedia-style citations ('[1]', '[edit]'). {_DT_C4}."
    )
    c4_filter_no_terminal_punct: bool = Field(
        False,
        description=(
            "Drop lines not ending in terminal punctuation. C4 and datatrove default to True;"
            " FineWeb runs C4QualityFilter(filter_no_terminal_punct=False), since dropping those"
            " lines removed too much good web text; we follow FineWeb (its own line-punctuation"
            " ratio rule covers such pages)."
        ),
    )
    c4_min_words_per_line: int = Field(
        3, description=f"Drop lines with fewer whitespace-separated words. 3: {_DT_C4}."
    )
    c4_max_word_length: int = Field(
        1000,
        ge=-1,
        description=f"Drop lines holding a longer word; -1 disables. 1000: {_DT_C4} (C4 code).",
    )
    c4_filter_javascript: bool = Field(
        True, description=f"Drop lines mentioning 'javascript'. {_DT_C4}."
    )
    c4_filter_policy: bool = Field(
        True,
        description=(
            f"Drop lines with 'terms of use', 'privacy policy', cookie notices. {_DT_C4} (C4 code)."
        ),
    )
    c4_filter_lorem_ipsum: bool = Field(
        True, description=f"Reject documents containing 'lorem ipsum'. {_DT_C4}."
    )
    c4_filter_curly_bracket: bool = Field(
        True, description=f"Reject documents containing '{{' (code, not prose). {_DT_C4}."
    )
    c4_min_sentences: int = Field(
        5,
        ge=-1,
        description=(
            "Reject documents with fewer sentences left after the line filters (spaCy"
            f" sentencizer); -1 disables. 5: {_DT_C4}."
        ),
    )
    # FineWeb
    fineweb_min_line_punct_ratio: float = _fraction(
        f"Min fraction of lines ending in terminal punctuation. 0.12: {_DT_FW}.", 0.12
    )
    fineweb_line_punct_exclude_zero: bool = Field(
        False,
        description=f"Keep documents where no line ends in punctuation at all. False: {_DT_FW}.",
    )
    fineweb_stop_chars: str | None = Field(
        None,
        description=(
            "Characters that end a line 'with punctuation'; None is Unicode's Sentence_Terminal"
            f" set ({_DT} TERMINAL_PUNCTUATION, the FineWebQualityFilter default)."
        ),
    )
    fineweb_short_line_length: int = Field(
        30, ge=0, description=f"A line of at most this many characters is short. 30: {_DT_FW}."
    )
    fineweb_max_short_line_ratio: float = _fraction(
        f"Max fraction of short lines. 0.67: {_DT_FW}.", 0.67
    )
    fineweb_max_dup_line_char_ratio: float = _fraction(
        f"Max fraction of characters in repeated lines. 0.01: {_DT_FW}.", 0.01
    )
    fineweb_max_newline_ratio: float = Field(
        0.3, ge=0, description=f"Max newlines per word (list-like pages). 0.3: {_DT_FW}."
    )

    @field_validator("languages")
    @classmethod
    def _known_languages(cls, value: list[str]) -> list[str]:
        from llmflow.tasks.curate.language_id import language_labels

        unknown = sorted(set(value) - set(language_labels()))
        if unknown:
            raise ValueError(
                f"unknown language code(s) {unknown}: py3langid knows {sorted(language_labels())}"
            )
        return value

    @field_validator("min_lang_score")
    @classmethod
    def _top_language_rule(cls, value: float) -> float:
        if value < 0.5:
            raise ValueError(
                "must be >= 0.5: below that, two languages can both pass and the rule on the top"
                " language no longer matches datatrove's"
            )
        return value

    @field_validator("rep_top_ngram_sizes", "rep_dup_ngram_sizes")
    @classmethod
    def _ngram_sizes(cls, value: list[int]) -> list[int]:
        if any(n < 1 for n in value) or len(set(value)) != len(value):
            raise ValueError(f"n-gram sizes must be distinct and >= 1, got {value}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> QualityConfig:
        for sizes, limits in (
            ("rep_top_ngram_sizes", "rep_top_ngram_max_char_frac"),
            ("rep_dup_ngram_sizes", "rep_dup_ngram_max_char_frac"),
        ):
            if len(getattr(self, sizes)) != len(getattr(self, limits)):
                raise ValueError(f"{limits} needs one value per entry of {sizes}")
        low, high = self.gopher_min_mean_word_length, self.gopher_max_mean_word_length
        if low is not None and high is not None and low > high:
            raise ValueError(
                "gopher_min_mean_word_length must not exceed gopher_max_mean_word_length"
            )
        return self

    @property
    def gopher_stop_words_set(self) -> frozenset[str]:
        return frozenset(self.gopher_stop_words)

    @property
    def fineweb_stop_chars_tuple(self) -> tuple[str, ...]:
        chars = TERMINAL_PUNCTUATION if self.fineweb_stop_chars is None else self.fineweb_stop_chars
        return tuple(sorted(chars))


# ---------------------------------------------------------------------------------------------
# Decisions


def text_rule(text: str | None, config: QualityConfig) -> Rejection | None:
    """Nothing to measure (``empty``), or too much to measure safely (``too_long``)."""
    if not text or not text.strip():
        return Rejection("empty", "no text")
    if len(text) > config.max_chars:
        return Rejection("too_long", f"{len(text)} chars > max_chars {config.max_chars}")
    return None


def language_rule(lang: str | None, score: float | None, config: QualityConfig) -> Rejection | None:
    """datatrove's LanguageFilter on the stored ``lang`` and ``lang_score``: the top language
    must be allowed and its probability above ``min_lang_score``."""
    allowed = set(config.languages)
    if (
        lang is None
        or (allowed and lang not in allowed)
        or score is None
        or not score > config.min_lang_score
    ):
        return Rejection(
            "lang",
            f"{lang} {score or 0:.3f} (keep {sorted(allowed) or 'any'}"
            f" above {config.min_lang_score})",
        )
    return None


def decide(table: pa.Table, attributes: pa.Table, config: QualityConfig) -> ShardResult:
    """Keep or reject each document from its stored signals; apply C4's line edits to kept ones.

    ``attributes`` holds one row per input row, in order (see :func:`compute_attributes`). The
    first rule that fires is the reason: :func:`text_rule`, :func:`language_rule`, then each
    signal's rules in :func:`~llmflow.tasks.curate.quality_signals.signal_table` order. Both
    sides carry ``lang``, ``lang_score`` and the ``quality_*`` signals; rejected rows keep their
    original text. Stats count, among kept documents, those C4 edited (``c4_docs_edited``) and
    the lines it removed per rule (``c4_lines_removed_<rule>``).
    """
    texts = table.column("text").to_pylist()
    signals = signal_table(config)
    judged = [(s, attributes.column(s.name).to_pylist()) for s in signals if s.rules]
    langs = attributes.column("lang").to_pylist()
    scores = attributes.column("lang_score").to_pylist()
    decisions: list[Rejection | None] = []
    for i, text in enumerate(texts):
        decision = text_rule(text, config) or language_rule(langs[i], scores[i], config)
        for signal, values in judged:
            if decision is not None:
                break
            decision = signal.check(values[i])
        decisions.append(decision)

    stats: Counter[str] = Counter()
    removed_lines = attributes.column("c4_removed_lines").to_pylist()
    removed_rules = attributes.column("c4_removed_rules").to_pylist()
    for i, decision in enumerate(decisions):
        if decision is None:
            edited = apply_c4_edits(texts[i], removed_lines[i], config)
            if edited != texts[i]:
                stats["c4_docs_edited"] += 1
                texts[i] = edited
            stats.update(f"c4_lines_removed_{r}" for r in removed_rules[i])
    for rule_name in C4_LINE_RULES:
        stats[f"c4_lines_removed_{rule_name}"] += 0

    for signal in signals:
        column = attributes.column(signal.name)
        table = put_column(table, pa.field(signal.name, column.type), column)
    table = put_column(table, table.schema.field("text"), pa.array(texts, pa.string()))
    return route(table, decisions, stats)


def compute_attributes(table: pa.Table, config: QualityConfig) -> pa.Table:
    """The measured side of a shard: id, every signal, and C4's line edits, one row per document."""
    signals = compute_signals(table.column("text").to_pylist(), config)
    return signals.add_column(0, pa.field("id", pa.string()), table.column("id"))


def quality_documents(table: pa.Table, config: QualityConfig) -> ShardResult:
    """Measure and decide one shard in memory (no stored signals)."""
    return decide(table, compute_attributes(table, config), config)


# ---------------------------------------------------------------------------------------------
# Stored signals


# The signals' own identity: stored signals are reused across stage versions while it holds.
SIGNALS = StageSpec(name="quality-signals", version=SIGNAL_VERSION, libraries=("py3langid",))


def signal_key(unit: WorkUnit, table: pa.Table, config: QualityConfig) -> str:
    """What stored signals must match: input content, signal fields, signal code version.

    Thresholds are not in it, so a run that only moves thresholds finds the stored signals.
    """
    shard = unit.source.get("shard") or {}
    content = shard.get("sha256")
    if content is None:  # a unit not planned from a shard: hash what it holds
        digest = hashlib.sha256()
        for column in ("id", "text"):
            for value in table.column(column).to_pylist():
                digest.update((value or "").encode("utf-8", "surrogatepass") + b"\0")
        content = digest.hexdigest()
    return unit_key(SIGNALS, config, content, fields=config.SIGNAL_FIELDS)


def load_or_compute_attributes(
    stage_dir: str, unit: WorkUnit, table: pa.Table, config: QualityConfig
) -> tuple[pa.Table, bool]:
    """The unit's signals from ``_signals/`` when their key matches, else measured and stored
    (the shared :func:`~llmflow.tasks.core.stage.cached_table`). Returns them and whether reused."""
    path = shards.join(stage_dir, SIGNALS_DIR, f"{unit.name}.parquet")
    key = signal_key(unit, table, config)
    attributes, reused = cached_table(path, key, lambda: compute_attributes(table, config))
    needed = ["id", *signal_columns(config), *(column.name for column in EDIT_COLUMNS)]
    if reused and not (
        set(needed) <= set(attributes.column_names)
        and attributes.column("id").equals(table.column("id"))
    ):
        shards.remove(path)  # stored under the right key but not for this table: measure again
        attributes, reused = cached_table(path, key, lambda: compute_attributes(table, config))
    return attributes, reused


def quality_unit(unit: WorkUnit, config: QualityConfig, stage_dir: str) -> ShardResult:
    """One unit: stored or fresh signals, then decisions. Stats count documents whose signals
    were reused (``signals_reused``) or measured (``signals_computed``)."""
    table = read_unit_input(unit)
    attributes, reused = load_or_compute_attributes(stage_dir, unit, table, config)
    result = decide(table, attributes, config)
    result.stats["signals_reused" if reused else "signals_computed"] += table.num_rows
    return result


@task(name="quality-shard", cache_policy=NO_CACHE, persist_result=False)
def quality_shard(unit: WorkUnit, config: QualityConfig, stage_dir: str) -> UnitRecord:
    return run_unit(stage_dir, unit, lambda _: quality_unit(unit, config, stage_dir))
