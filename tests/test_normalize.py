"""normalize on ftfy's real mojibake cases and on the text shapes the web produces."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import ftfy
import pyarrow as pa
import pytest

from llmflow.tasks.core.documents import DOCUMENT_SCHEMA
from llmflow.tasks.core.stage import Rejection
from llmflow.tasks.curate.normalize import (
    NormalizeConfig,
    fix_text,
    ftfy_config,
    normalize_documents,
    normalize_text,
    too_short,
)

DEFAULT = NormalizeConfig()


def _canonical(text: str) -> str:
    """What an expected ftfy result looks like after our NFC and whitespace steps."""
    only_space = NormalizeConfig(fix_mojibake=False, remove_control_chars=False)
    return normalize_text(unicodedata.normalize("NFC", text), only_space)[0]


def _cases(shared_data: Path, name: str) -> list[dict]:
    return json.loads((shared_data / "mojibake" / name).read_text(encoding="utf-8"))


def test_repairs_real_mojibake_found_in_the_wild(shared_data: Path) -> None:
    cases = _cases(shared_data, "in-the-wild.json")
    assert len(cases) >= 50
    wrong = []
    for case in cases:
        got, changes = normalize_text(case["original"], DEFAULT)
        # Our ftfy options sit between fix_encoding (no HTML unescape, no quote uncurling) and
        # fix_text's defaults; either expected form is a correct repair.
        expected = {
            _canonical(case.get("fixed-encoding", case["fixed"])),
            _canonical(case["fixed"]),
        }
        if got not in expected:
            wrong.append((case["label"], got, expected))
        if case["original"] != case["fixed"] and got != case["original"]:
            assert changes, case["label"]
    assert wrong == []


def test_leaves_text_that_only_looks_like_mojibake(shared_data: Path) -> None:
    # The expected results assume ftfy's default of straightening quotes; so does this check.
    straight = NormalizeConfig(uncurl_quotes=True)
    for case in _cases(shared_data, "negative.json"):
        got, _ = normalize_text(case["original"], straight)
        assert got == _canonical(case["fixed"]), case["label"]


# Lines ftfy changes (mojibake, entities, C1 controls, curly quotes, escapes, a lone surrogate)
# among lines it cannot; the "<" line turns entity unescaping off for every later line.
CRAFTED_LINES = [
    "Plain ASCII line, nothing to fix.",
    "The caf\u00c3\u00a9 served cr\u00c3\u00a8me br\u00c3\u00bbl\u00c3\u00a9e.",
    "Fish &amp; chips &lt;3, &eacute;t&eacute;",
    "\u201cCurly\u201d quotes and an apostrophe\u2019s tail",
    "C1 controls: \x93quoted\x94 in Windows-1252",
    "Terminal \x1b[31mred\x1b[0m text",
    "A lone surrogate \ud83d here",
    "if (a < b) { x = 1; }",
    "After the bracket: Fish &amp; chips stays escaped",
    "tabs\tand\rcarriage returns and \x0b vertical tabs",
    "",
]


@pytest.mark.parametrize("uncurl", [False, True])
def test_fix_text_equals_ftfy_on_every_line(uncurl: bool) -> None:
    fixer = ftfy_config(NormalizeConfig(uncurl_quotes=uncurl))
    texts = ["\n".join(CRAFTED_LINES), "\n".join(reversed(CRAFTED_LINES)), "ASCII & no entity"]
    texts += ["\n".join(CRAFTED_LINES[i:] + CRAFTED_LINES[:i]) for i in range(len(CRAFTED_LINES))]
    for text in texts:
        assert fix_text(text, fixer) == ftfy.fix_text(text, fixer), text
    assert fix_text(texts[0], fixer) != texts[0]  # (the crafted lines do need fixing)
    # Segments cut inside long lines, and options under which ASCII lines change too.
    short = fixer._replace(max_decode_length=7)
    assert fix_text(texts[0], short) == ftfy.fix_text(texts[0], short)
    breaks = fixer._replace(fix_line_breaks=True, remove_control_chars=True)
    assert (
        fix_text(texts[0], breaks) == ftfy.fix_text(texts[0], breaks) != fix_text(texts[0], fixer)
    )


def test_fix_text_equals_ftfy_on_real_mojibake(shared_data: Path) -> None:
    fixer = ftfy_config(DEFAULT)
    cases = _cases(shared_data, "in-the-wild.json") + _cases(shared_data, "negative.json")
    originals = [case["original"] for case in cases]
    for text in [*originals, "\n".join(originals), "\n\n".join(reversed(originals))]:
        assert fix_text(text, fixer) == ftfy.fix_text(text, fixer), text


def test_keeps_curly_quotes_unless_asked() -> None:
    text = "\u201cQuoted\u201d and it\u2019s fine"
    assert normalize_text(text, DEFAULT)[0] == text
    assert normalize_text(text, NormalizeConfig(uncurl_quotes=True))[0] == '"Quoted" and it\'s fine'


def test_composes_unicode_and_counts_the_step() -> None:
    decomposed = "Cafe\u0301 na\u0131\u0308ve"
    text, changes = normalize_text(decomposed, DEFAULT)
    assert text == "Café na\u0131\u0308ve".replace("e\u0301", "é")
    assert unicodedata.is_normalized("NFC", text)
    assert "nfc" in changes
    assert normalize_text("ﬁne ＡＢＣ", NormalizeConfig(unicode_form="NFKC"))[0] == "fine ABC"


def test_removes_controls_but_keeps_layout_and_joiners() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    text, changes = normalize_text(f"a\x00b\x07c\u200bd\ttab\n{family}", DEFAULT)
    assert text == f"abcd\ttab\n{family}".replace("\t", " ")  # tab is a space run → one space
    assert "control_chars" in changes


def test_whitespace_is_canonical() -> None:
    text, changes = normalize_text("  a\u00a0\u2003 b  \r\n\r\n\r\n\r\nc\rd  \n", DEFAULT)
    assert text == "a b\n\nc\nd"
    assert changes == ["whitespace"]


def test_shard_function_counts_changes_and_rejects_empty_documents() -> None:
    rows = [
        {"id": "1", "text": "fine text", "url": "u1", "source": "s", "fetched_at": None},
        {"id": "2", "text": "cafÃ©  au lait", "url": "u2", "source": "s", "fetched_at": None},
        {"id": "3", "text": "\u200b \x00\n", "url": "u3", "source": "s", "fetched_at": None},
    ]
    result = normalize_documents(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), DEFAULT)
    assert result.docs_in == 3
    assert result.kept.column("text").to_pylist() == ["fine text", "café au lait"]
    assert result.kept.column("id").to_pylist() == ["1", "2"]  # ids name documents, kept as is
    assert result.rejected.column("reason").to_pylist() == ["empty_after_normalize"]
    assert result.stats["changed_documents"] == 2
    assert result.stats["changed_ftfy"] == 1


@pytest.mark.parametrize("text", ["", "x"])
def test_min_chars(text: str) -> None:
    rows = [{"id": "1", "text": text, "url": None, "source": "s", "fetched_at": None}]
    table = pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)
    result = normalize_documents(table, NormalizeConfig(min_chars=2))
    assert result.kept.num_rows == 0 and result.rejected.num_rows == 1


def test_too_short_returns_the_rejection_its_row_is_routed_with() -> None:
    config = NormalizeConfig(min_chars=5)
    assert too_short("four", config) == Rejection(
        "empty_after_normalize", "4 chars after normalization, min_chars=5"
    )
    assert too_short("fives", config) is None
    rows = [
        {"id": "1", "text": "long enough", "url": None, "source": "s", "fetched_at": None},
        {"id": "2", "text": "  four\u200b ", "url": None, "source": "s", "fetched_at": None},
    ]
    result = normalize_documents(pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA), config)
    assert result.kept.column("id").to_pylist() == ["1"]
    rejected = result.rejected.to_pylist()
    assert [(r["id"], r["text"], Rejection(r["reason"], r["detail"])) for r in rejected] == [
        ("2", "four", too_short("four", config))
    ]
