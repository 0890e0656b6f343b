"""normalize: repair mojibake with ftfy, compose Unicode (NFC), drop control characters, tidy space.

Text from the web arrives double-encoded ("cafÃ©"), decomposed ("e" + combining accent), with
stray control bytes and every flavour of space. Later stages (quality rules, MinHash shingles, the
tokenizer) count characters and words, so they should all see one canonical form of the same text.
The document ``id`` is kept from the crawl: it names the document, not its current spelling.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from collections import Counter
from typing import Literal

import ftfy
import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field

from llmflow.tasks.core.stage import (
    Rejection,
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    put_column,
    read_unit_input,
    route,
    run_unit,
)
from llmflow.tasks.core.unit_output import ShardResult

STAGE = StageSpec(name="normalize", version="1", libraries=("ftfy",))

# Characters of category Cc/Cf that carry no text, except line breaks and tab (layout: the
# whitespace step turns CR and CRLF into LF) and
# the joiners that change how emoji and Indic scripts render (ZWJ U+200D, ZWNJ U+200C).
_KEEP_CONTROLS = {"\n", "\r", "\t", "\u200c", "\u200d"}
_SPACES = re.compile(r"[^\S\n]+")  # any run of whitespace other than newline
_BLANK_LINES = re.compile(r"\n{3,}")


class NormalizeConfig(StageConfig):
    """How text is repaired and made canonical."""

    fix_mojibake: bool = Field(
        True, description="Repair text decoded with the wrong codec, with ftfy (fix_encoding)."
    )
    uncurl_quotes: bool = Field(
        False,
        description=(
            "Turn curly quotes into straight ones. Off: curly quotes are real typography a model"
            " should learn to read and write (ftfy's default turns this on)."
        ),
    )
    unicode_form: Literal["NFC", "NFKC", "none"] = Field(
        "NFC",
        description=(
            "Unicode normalization. NFC composes characters without changing meaning; NFKC also"
            " folds compatibility forms (full-width letters, ligatures, superscripts), losing some."
        ),
    )
    remove_control_chars: bool = Field(
        True,
        description="Remove control and format characters other than newline, tab and joiners.",
    )
    normalize_whitespace: bool = Field(
        True,
        description=(
            "CRLF/CR to LF, every run of spaces (incl. no-break and other Unicode spaces) to one"
            " space, trailing spaces removed, at most one blank line in a row, text stripped."
        ),
    )
    min_chars: int = Field(
        1, ge=1, description="Documents shorter than this after normalization are rejected."
    )


def ftfy_config(config: NormalizeConfig) -> ftfy.TextFixerConfig:
    """ftfy's options, each decided for text extracted from web pages.

    unescape_html stays "auto" (text still containing entities such as &amp; is unescaped, text
    with real angle brackets is not); fix_encoding and its helpers do the mojibake repair; C1
    controls that are really Windows-1252 characters are mapped back. Normalization, control-char
    removal and line breaks are left to this stage so that each change is counted on its own;
    ligatures and full-width characters are left alone (that is NFKC's job, when asked for).
    """
    return ftfy.TextFixerConfig(
        unescape_html="auto",
        remove_terminal_escapes=True,
        fix_encoding=config.fix_mojibake,
        restore_byte_a0=True,
        replace_lossy_sequences=True,
        decode_inconsistent_utf8=True,
        fix_c1_controls=True,
        fix_latin_ligatures=False,
        fix_character_width=False,
        uncurl_quotes=config.uncurl_quotes,
        fix_line_breaks=False,
        fix_surrogates=True,
        remove_control_chars=False,
        normalization=None,
        explain=False,
    )


def _ftfy_cannot_change(segment: str) -> bool:
    """Whether ftfy, with options that leave ASCII controls and line breaks alone, returns the
    segment as it is: its fixes act on non-ASCII characters (mojibake, C1 controls, curly
    quotes, surrogates, ligatures, widths), on "&" (HTML entities) and on ESC (terminal escapes)
    only. Three scans in C instead of ftfy's dozen fixer calls per line."""
    return segment.isascii() and "&" not in segment and "\x1b" not in segment


def fix_text(text: str, fixer: ftfy.TextFixerConfig) -> str:
    """``ftfy.fix_text(text, fixer)``, skipping the lines ftfy cannot change.

    ftfy fixes a text line by line (segments of at most ``max_decode_length``) with a dozen calls
    per line, most of them on plain ASCII lines it returns unchanged: 80% of this stage. This is
    ftfy 6.3's loop with those lines passed through; ``tests/test_normalize.py`` compares the
    results with ftfy's own on real and crafted text.
    """
    if fixer.remove_control_chars or fixer.fix_line_breaks:
        return ftfy.fix_text(text, fixer)  # (they change ASCII: no line may be skipped)
    if _ftfy_cannot_change(text):
        return text
    out = []
    pos = 0
    while pos < len(text):
        end = min(text.find("\n", pos) + 1 or len(text), pos + fixer.max_decode_length)
        segment = text[pos:end]
        if fixer.unescape_html == "auto" and "<" in segment:
            fixer = fixer._replace(unescape_html=False)  # for this and every later line, as ftfy
        out.append(
            segment if _ftfy_cannot_change(segment) else ftfy.fix_and_explain(segment, fixer).text
        )
        pos = end
    return "".join(out)


_CONTROL_CATEGORIES = ("Cc", "Cf", "Cs", "Co")


@functools.cache
def _controls() -> re.Pattern[str]:
    """Every code point of a removed category (control, format, surrogate, private use) but the
    kept ones, as one character class of ranges: a regex scan in C rather than a category lookup
    per character in Python (that was 40% of the stage). Built once per process, from the same
    ``unicodedata`` tables, so it removes exactly the same characters."""
    ranges: list[tuple[int, int]] = []
    for code in range(sys.maxunicode + 1):
        ch = chr(code)
        if ch in _KEEP_CONTROLS or unicodedata.category(ch) not in _CONTROL_CATEGORIES:
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    parts = (
        re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
        for a, b in ranges
    )
    return re.compile("[" + "".join(parts) + "]+")


def _strip_controls(text: str) -> str:
    return _controls().sub("", text)


def _tidy_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip(" ") for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip()


def normalize_text(text: str, config: NormalizeConfig) -> tuple[str, list[str]]:
    """The canonical form of one text, and which steps changed it (for the stage's counts)."""
    changes = []
    fixer = ftfy_config(config)
    steps = [
        ("ftfy", config.fix_mojibake or config.uncurl_quotes, lambda t: fix_text(t, fixer)),
        (
            config.unicode_form.lower(),
            config.unicode_form != "none",
            lambda t: (
                t
                if config.unicode_form == "none"
                else unicodedata.normalize(config.unicode_form, t)
            ),
        ),
        ("control_chars", config.remove_control_chars, _strip_controls),
        ("whitespace", config.normalize_whitespace, _tidy_whitespace),
    ]
    for name, enabled, step in steps:
        if enabled:
            new = step(text)
            if new != text:
                changes.append(name)
                text = new
    return text, changes


def too_short(text: str, config: NormalizeConfig) -> Rejection | None:
    """Text that normalization left shorter than ``min_chars`` (often nothing at all)."""
    if len(text) < config.min_chars:
        return Rejection(
            "empty_after_normalize",
            f"{len(text)} chars after normalization, min_chars={config.min_chars}",
        )
    return None


def normalize_documents(table: pa.Table, config: NormalizeConfig) -> ShardResult:
    """Normalize every document of a shard; those left too short go to the rejected set."""
    stats: Counter[str] = Counter()
    new_texts: list[str] = []
    for text in table.column("text").to_pylist():
        new, changes = normalize_text(text, config)
        stats.update(f"changed_{c}" for c in changes)
        stats["changed_documents"] += bool(changes)
        new_texts.append(new)
    updated = put_column(table, table.schema.field("text"), pa.array(new_texts, pa.string()))
    return route(updated, [too_short(text, config) for text in new_texts], stats)


@task(name="normalize-shard", cache_policy=NO_CACHE, persist_result=False)
def normalize_shard(unit: WorkUnit, config: NormalizeConfig, stage_dir: str) -> UnitRecord:
    return run_unit(stage_dir, unit, lambda _: normalize_documents(read_unit_input(unit), config))
