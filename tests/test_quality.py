"""quality: language ID and the Gopher / C4 / FineWeb rules, signals kept apart from decisions."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import Document
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import (
    Rejection,
    StageConfig,
    StageSpec,
    WorkUnit,
    plan_shard_units,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import documents_result
from llmflow.tasks.curate import quality, quality_signals
from llmflow.tasks.curate.language_id import identify_languages
from llmflow.tasks.curate.quality import STAGE, QualityConfig, quality_documents
from llmflow.tasks.curate.quality_signals import EDIT_COLUMNS, Rule, signal_table

CLEAN = (
    "The old library at the end of our street opens early on Saturday mornings. "
    "Volunteers sort the returned books and put fresh flowers on the front desk. "
    "Children gather near the window to hear a story before their parents collect them. "
    "Most visitors stay for an hour or two, reading quietly in the worn leather chairs. "
    "The librarian knows almost everyone by name and remembers what they like to read. "
    "When the rain comes, the building feels warm and calm, and nobody is in a hurry to leave."
)
OTHER = (
    "A small bakery on the corner sells bread that is still warm at seven o'clock. "
    "Its owner came to the town twenty years ago with a suitcase and a recipe book. "
    "Today the queue reaches the pharmacy next door on most weekends. "
    "People talk about the weather, their gardens and the price of coffee while they wait. "
    "Nobody seems to mind the wait, because the smell alone is worth it."
)
SENTENCES = [s if s.endswith(".") else s + "." for s in (CLEAN + " " + OTHER).split(". ")]
WORDS = (OTHER + " " + CLEAN).replace(".", "").replace(",", "").split()
LONG_WORDS = (
    "Notwithstanding extraordinarily comprehensive internationalization requirements,"
    " telecommunications manufacturers increasingly underestimated interoperability"
    " considerations. Consequently, representatives recommended establishing interdisciplinary"
    " standardization committees. Administrators acknowledged overwhelmingly disappointing"
    " implementation characteristics. Nevertheless, philosophical disagreements concerning"
    " responsibilities complicated negotiations substantially. Unquestionably, organizational"
    " transformations necessitated considerable reconfiguration, documentation, harmonization,"
    " professionalization, decentralization, modernization, and experimentation. The"
    " administrators subsequently reconsidered and reorganized the international"
    " telecommunications specifications with extraordinary thoroughness."
)
VOCAB = [
    "magnificent",
    "constellations",
    "extraordinary",
    "accomplishments",
    "remarkable",
    "performances",
    "beautiful",
    "landscapes",
    "wonderful",
    "celebrations",
    "delightful",
    "conversations",
    "generous",
    "neighbours",
    "excellent",
    "restaurants",
    "fascinating",
    "adventures",
    "memorable",
    "journeys",
    "impressive",
    "buildings",
    "peaceful",
    "mornings",
    "thoughtful",
    "teachers",
    "colourful",
    "gardens",
    "ambitious",
    "students",
]


def list_like_page() -> str:
    """Many three-word lines: more newlines per word than FineWeb allows, and nothing else."""
    lines = ["the magnificent constellations", "and extraordinary accomplishments"]
    lines += [f"{VOCAB[i]} {VOCAB[(i + 5) % 30]} {VOCAB[(i + 11) % 30]}" for i in range(30)]
    starts = [
        "and",
        "to",
        "of",
        "with",
        "from",
        "by",
        "for",
        "in",
        "at",
        "on",
        "near",
        "past",
        "under",
        "over",
        "into",
        "after",
    ]
    ends = "sea hills night wind town lake king snow gate road farm moon tree wall mill rain"
    lines += [f"{a} the {b}" for a, b in zip(starts, ends.split(), strict=True)]
    return "\n".join(line + ("." if k % 8 == 0 else "") for k, line in enumerate(lines))


# Each document trips its rule and no rule before it in FineWeb's order.
TRIPS: dict[str, str] = {
    "gopher_rep_dup_para_frac": "\n\n".join([CLEAN, OTHER, CLEAN, CLEAN]),
    "gopher_rep_dup_para_char_frac": "\n\n".join(
        [CLEAN, "One line.", "Two lines.", "Three.", CLEAN]
    ),
    "gopher_rep_dup_line_frac": "\n".join([CLEAN, OTHER, CLEAN, CLEAN]),
    "gopher_rep_dup_line_char_frac": "\n".join([CLEAN, "One line.", "Two lines.", "Three.", CLEAN]),
    "gopher_rep_top_2gram": " ".join(["Hello there."] * 25) + " " + CLEAN,
    "gopher_rep_top_3gram": " ".join(
        "unbelievably wonderful celebrations " + " ".join(WORDS[i * 15 : (i + 1) * 15]) + "."
        for i in range(8)
    ),
    "gopher_rep_top_4gram": "The cat sat on the mat and looked at the birds in the garden all day.",
    "gopher_rep_dup_5gram": f"{OTHER} {CLEAN} Then, as always, {CLEAN}",
    "gopher_min_words": (
        "It was late when we reached the small station. The last train had already left, so we"
        " waited for a taxi under the old clock and talked about home."
    ),
    "gopher_min_mean_word_length": (
        "I am up at six. So is my dog. We go out to the park by the lake. It is a bit odd, as no"
        " one is up yet. He can run and I can sit. We do it on my own day off. If it is wet, we"
        " go in and he has a nap on his mat. So, do you see why I am a fan of it? Try it one day."
    ),
    "gopher_max_mean_word_length": LONG_WORDS,
    "gopher_hash_ratio": CLEAN
    + " "
    + " ".join(
        f"#{w}"
        for w in [
            "news",
            "today",
            "town",
            "books",
            "rain",
            "story",
            "library",
            "city",
            "weekend",
            "family",
            "reading",
            "local",
            "life",
            "home",
            "garden",
        ]
    ),
    "gopher_ellipsis_ratio": " ".join(
        w + "..." if i % 6 == 0 else w for i, w in enumerate(CLEAN.split())
    ),
    "gopher_bullet_lines": "\n".join("- " + s for s in SENTENCES),
    "gopher_ellipsis_lines": "\n".join(
        s.rstrip(".") + "..." if i % 2 == 0 else s for i, s in enumerate(SENTENCES)
    ),
    "gopher_alpha_words": CLEAN + " " + " ".join(str(1000 + 37 * i) for i in range(40)),
    "gopher_stop_words": (
        "Rain fell across Paris during most afternoons last spring. Tourists carried umbrellas"
        " while waiters moved chairs inside cafes. Shops kept lights on, so streets looked bright"
        " despite grey skies. Children jumped into puddles near schools. Old men read newspapers"
        " under awnings, sipping coffee slowly. By evening, clouds drifted east, leaving wet"
        " pavements shining beneath lamps. Many residents said this season felt calmer than"
        " summer, when crowds fill every square."
    ),
    "c4_lorem_ipsum": CLEAN + "\nLorem ipsum dolor sit amet, consectetur adipiscing elit.",
    "c4_curly_bracket": CLEAN + '\nThe settings file holds {"theme": "dark"} for everyone.',
    "c4_min_sentences": (
        "On a quiet evening in early autumn, when the leaves had only just begun to turn and the"
        " air smelled faintly of woodsmoke, my grandmother walked slowly down the hill to the"
        " village, carrying a basket of apples that she intended to give to the neighbours who"
        " had helped her repair the roof after the summer storms"
    ),
    "fineweb_line_punct_ratio": "\n".join(s.rstrip(".") for s in SENTENCES),
    "fineweb_short_line_ratio": "\n".join(
        [
            "The sun rose over the hills.",
            "Birds sang in the tall trees.",
            "A farmer opened his gate.",
            "Cows walked to the river.",
            "Smoke rose from a chimney.",
            "The baker lit his oven.",
            "Children ran to the school.",
            "A dog barked at a cat.",
            "Bells rang in the valley.",
            "The mayor read his letters.",
            "Rain began to fall softly.",
            "Everyone went back inside.",
        ]
    ),
    "fineweb_dup_line_char_ratio": "\n".join([*SENTENCES, SENTENCES[2]]),
    "fineweb_newline_ratio": list_like_page(),
}


def table_of(*texts: str) -> pa.Table:
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": list(texts)})


def decide_one(text: str, config: QualityConfig | None = None) -> tuple[str, dict]:
    """('kept', row) or (reason, row) for one document."""
    result = quality_documents(table_of(text), config or QualityConfig())
    assert result.kept.num_rows + result.rejected.num_rows == 1
    if result.kept.num_rows:
        return "kept", result.kept.to_pylist()[0]
    row = result.rejected.to_pylist()[0]
    return row["reason"], row


@pytest.fixture(scope="module")
def pride_paragraph(shared_data: Path) -> str:
    """A real paragraph of Pride and Prejudice, its wrapped lines joined as a web page has it."""
    text = (shared_data / "text/gutenberg/1342/1342-0.txt").read_text(encoding="utf-8-sig")
    text = text.replace("\r\n", "\n")
    start = text.index("Between him and Darcy there was a very steady friendship")
    return " ".join(text[start : text.index("\n\n", start)].split())


def test_clean_prose_is_kept_with_every_signal(pride_paragraph: str) -> None:
    for text in (CLEAN, OTHER, pride_paragraph):
        outcome, row = decide_one(text)
        assert outcome == "kept", row.get("detail")
        assert row["lang"] == "en" and row["lang_score"] > 0.9
        assert row["text"] == text  # one line of prose: nothing for C4 to edit
        signals = [name for name in row if name.startswith("quality_")]
        assert len(signals) == len(quality_signals.signal_columns(QualityConfig())) - 2
        assert all(row[name] is not None for name in signals)
    _, row = decide_one(pride_paragraph)
    assert row["quality_gopher_words"] > 100 and row["quality_c4_sentences"] >= 5


def test_a_signal_rule_returns_the_rejection_its_row_is_routed_with() -> None:
    rule = Rule("gopher_min_words", "<", 1000)
    assert rule.check("quality_gopher_words", 12) == Rejection(
        "gopher_min_words", "quality_gopher_words=12 < 1000"
    )
    assert rule.check("quality_gopher_words", 1000) is None
    assert rule.check("quality_gopher_words", None) is None  # nothing measured never fires
    assert Rule("fineweb_line_punct_ratio", "<", 0.12, zero_passes=True).check("s", 0.0) is None
    assert Rule("fineweb_empty", "null").check("s", None) == Rejection(
        "fineweb_empty", "no lines left after the C4 line filters"
    )
    outcome, row = decide_one(CLEAN, QualityConfig(gopher_min_words=1000))
    assert outcome == "gopher_min_words"
    assert Rejection(row["reason"], row["detail"]) == rule.check(
        "quality_gopher_words", row["quality_gopher_words"]
    )


def test_each_signal_is_declared_once_for_schema_measure_and_rules() -> None:
    # The stored names are the signal cache's columns: renaming one would orphan every cache.
    assert quality_signals.signal_columns(QualityConfig()) == [
        "lang",
        "lang_score",
        *(f"quality_rep_{k}" for k in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac")),
        "quality_rep_dup_line_char_frac",
        *(f"quality_rep_top_{n}gram_char_frac" for n in (2, 3, 4)),
        *(f"quality_rep_dup_{n}gram_char_frac" for n in range(5, 11)),
        *(f"quality_gopher_{k}" for k in ("words", "mean_word_length", "hash_ratio")),
        *(f"quality_gopher_{k}" for k in ("ellipsis_ratio", "bullet_line_frac")),
        *(f"quality_gopher_{k}" for k in ("ellipsis_line_frac", "alpha_word_frac", "stop_words")),
        *(f"quality_c4_{k}" for k in ("lorem_ipsum", "curly_bracket", "sentences")),
        "quality_c4_lines_removed",
        *(f"quality_fineweb_{k}_ratio" for k in ("line_punct", "short_line", "dup_line_char")),
        "quality_fineweb_newline_ratio",
    ]
    config = QualityConfig(
        rep_top_ngram_sizes=[2, 7], rep_top_ngram_max_char_frac=[0.2, 0.1], gopher_max_words=None
    )
    signals = signal_table(config)
    computed = quality_signals.compute_signals([CLEAN, ""], config)
    assert computed.schema.names == [s.name for s in (*signals, *EDIT_COLUMNS)]
    assert [computed.schema.field(s.name).type for s in signals] == [s.type for s in signals]
    reasons = [rule.reason for s in signals for rule in s.rules]
    assert len(set(reasons)) == len(reasons)
    assert "gopher_rep_top_7gram" in reasons and "gopher_rep_top_3gram" not in reasons
    assert "gopher_max_words" not in reasons  # a threshold of None switches its rule off


@pytest.mark.parametrize("reason", sorted(TRIPS))
def test_each_rule_fires_on_a_document_built_to_trip_it(reason: str) -> None:
    outcome, row = decide_one(TRIPS[reason])
    assert outcome == reason, row.get("detail")
    assert row["lang"] == "en"
    assert " > " in row["detail"] or " < " in row["detail"] or "is true" in row["detail"]


@pytest.mark.parametrize("n", [6, 7, 8, 9, 10])
def test_longer_duplicated_ngram_rules(n: int) -> None:
    config = QualityConfig(
        rep_dup_ngram_sizes=[n], rep_dup_ngram_max_char_frac=[0.15 - (n - 5) / 100]
    )
    assert decide_one(TRIPS["gopher_rep_dup_5gram"], config)[0] == f"gopher_rep_dup_{n}gram"


def test_threshold_rules_that_need_a_config_to_reach() -> None:
    assert decide_one(CLEAN, QualityConfig(gopher_max_words=60))[0] == "gopher_max_words"
    # Every line has two words: C4 drops them all; with its sentence rule off, FineWeb sees nothing.
    colours = "red blue green black white brown pink grey gold silver orange purple yellow violet"
    places = "house garden river bridge mountain forest castle tower market harbour village lake"
    two_word_lines = "the end\nand more\n" + "\n".join(
        f"{a} {b}" for a in colours.split()[:6] for b in places.split()[:5]
    )
    outcome, row = decide_one(two_word_lines, QualityConfig(c4_min_sentences=-1))
    assert outcome == "fineweb_empty" and row["quality_fineweb_line_punct_ratio"] is None
    # The same rule switched off keeps the document it removed.
    assert decide_one(TRIPS["gopher_stop_words"], QualityConfig(gopher_min_stop_words=None))[0] == (
        "kept"
    )
    assert (
        decide_one(TRIPS["c4_curly_bracket"], QualityConfig(c4_filter_curly_bracket=False))[0]
        == "kept"
    )


def test_c4_line_edits_reach_the_kept_text_and_the_stats() -> None:
    lines = [
        *SENTENCES[:6],
        "Please enable JavaScript to view the comments on this page.",
        "Read our privacy policy and terms of use.",
        "Menu",
        "Sources cited in the text[1] are listed below[citation needed].",
        "A rule of " + "-" * 1001 + " follows the sources.",
    ]
    result = quality_documents(table_of("\n".join(lines)), QualityConfig())
    assert result.kept.num_rows == 1, result.rejected.to_pylist()
    kept = result.kept.to_pylist()[0]
    assert kept["text"] == "\n".join(
        [*SENTENCES[:6], "Sources cited in the text are listed below."]
    )
    assert kept["quality_c4_lines_removed"] == 4
    assert result.stats["c4_docs_edited"] == 1
    assert result.stats["c4_lines_removed_javascript"] == 1
    assert result.stats["c4_lines_removed_policy"] == 1
    assert result.stats["c4_lines_removed_too_few_words"] == 1
    assert result.stats["c4_lines_removed_too_long_word"] == 1
    assert result.stats["c4_lines_removed_no_terminal_punct"] == 0
    # FineWeb's default keeps lines without terminal punctuation; C4's own default drops them.
    unpunctuated = "\n".join([*SENTENCES[:6], "A line that ends without any full stop"])
    _, row = decide_one(unpunctuated)
    assert row["text"] == unpunctuated
    _, row = decide_one(unpunctuated, QualityConfig(c4_filter_no_terminal_punct=True))
    assert row["text"] == "\n".join(SENTENCES[:6])


@pytest.mark.parametrize(
    ("text", "lang"),
    [
        (
            "It is a truth universally acknowledged, that a single man must be in want of a wife.",
            "en",
        ),
        ("Aujourd'hui, maman est morte. Ou peut-être hier, je ne sais pas.", "fr"),
        (
            "Als Gregor Samsa eines Morgens aus unruhigen Träumen erwachte, fand er sich in seinem"
            " Bett zu einem ungeheueren Ungeziefer verwandelt.",
            "de",
        ),
    ],
)
def test_language_id_on_short_real_sentences(text: str, lang: str) -> None:
    [(found, score)] = identify_languages([text])
    assert found == lang and score > 0.65


def test_language_rule_keeps_the_allowed_languages() -> None:
    french = (
        "Longtemps, je me suis couché de bonne heure. Parfois, à peine ma bougie éteinte, mes yeux"
        " se fermaient si vite que je n'avais pas le temps de me dire: Je m'endors."
    )
    outcome, row = decide_one(french)
    assert outcome == "lang" and row["lang"] == "fr" and "keep ['en']" in row["detail"]
    # Allowed, French goes on to the next rules (and is too short for Gopher).
    assert decide_one(french, QualityConfig(languages=["en", "fr"]))[0] == "gopher_min_words"
    assert decide_one(french, QualityConfig(languages=[]))[0] == "gopher_min_words"


def test_language_is_identified_on_the_prefix_and_the_prefix_keys_the_signals(
    shared_data: Path,
) -> None:
    """A page that starts in English for more than the prefix and goes on, longer, in French."""
    text = (shared_data / "text/gutenberg/1342/1342-0.txt").read_text(encoding="utf-8-sig")
    start = text.index("Between him and Darcy there was a very steady friendship")
    english = " ".join(text[start : start + 3000].split())[:2200]
    french = (
        " Longtemps, je me suis couché de bonne heure. Parfois, à peine ma bougie éteinte, mes"
        " yeux se fermaient si vite que je n'avais pas le temps de me dire : je m'endors. Et, une"
        " demi-heure après, la pensée qu'il était temps de chercher le sommeil m'éveillait ; je"
        " voulais poser le volume que je croyais avoir encore dans les mains et souffler ma"
        " lumière. Je n'avais pas cessé en dormant de faire des réflexions sur ce que je venais"
        " de lire, mais ces réflexions avaient pris un tour un peu particulier ; il me semblait"
        " que j'étais moi-même ce dont parlait l'ouvrage : une église, un quatuor, la rivalité de"
        " François Ier et de Charles Quint."
    ) * 6
    page = english + french
    assert len(english) > QualityConfig().language_id_chars == 2000 < len(french)
    outcome, row = decide_one(page)
    assert row["lang"] == "en" and outcome != "lang"
    outcome, row = decide_one(page, QualityConfig(language_id_chars=0))  # the whole text
    assert row["lang"] == "fr" and outcome == "lang"
    # what is measured changed, so the stored signals' key (and the unit's) changes with it
    unit = WorkUnit(name="u", key="k", source={"shard": {"sha256": "s"}})
    whole = QualityConfig(language_id_chars=0)
    assert quality.signal_key(unit, table_of(page), whole) != quality.signal_key(
        unit, table_of(page), QualityConfig()
    )
    assert whole.output_hash() != QualityConfig().output_hash()


def test_bad_input_is_routed_with_a_reason_never_raised() -> None:
    tifinagh = "ⵜⴰⵎⴰⵣⵉⵖⵜ ⵜⴰⵏⴰⵡⴰⵢⵜ ⵏ ⵍⵎⵖⵔⵉⴱ ⴷ ⵜⵓⵜⵍⴰⵢⵜ ⵏ ⵉⵎⴰⵣⵉⵖⵏ " * 20
    cherokee = "ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ ᎠᏂᏴᏫᏯ ᏧᏂᎸᏫᏍᏓᏁᏗ " * 20
    texts = {
        "empty": "",
        "blank": " \n\t\n ",
        "huge": "word " * 10_000_000,  # 50 MB
        "one_char": "a" * 200_000,
        "brackets": "[" * 100_000,
        "tifinagh": tifinagh,
        "cherokee": cherokee,
    }
    started = time.perf_counter()
    result = quality_documents(table_of(*texts.values()), QualityConfig())
    assert time.perf_counter() - started < 30
    assert result.kept.num_rows == 0
    by_id = {r["id"]: r for r in result.rejected.to_pylist()}
    reasons = {name: by_id[f"d{i}"]["reason"] for i, name in enumerate(texts)}
    assert reasons["empty"] == reasons["blank"] == "empty"
    assert reasons["huge"] == "too_long"
    assert by_id["d2"]["quality_gopher_words"] is None and by_id["d2"]["lang"] is None
    assert reasons["tifinagh"] == reasons["cherokee"] == "lang"
    assert reasons["one_char"] and reasons["brackets"]
    # With every language allowed, the unknown scripts still meet the English rules.
    result = quality_documents(table_of(tifinagh, cherokee), QualityConfig(languages=[]))
    assert result.rejected.num_rows == 2


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="languages"):
        QualityConfig(languages=["english"])
    with pytest.raises(ValueError, match="rep_top_ngram_max_char_frac"):
        QualityConfig(rep_top_ngram_sizes=[2, 3])
    with pytest.raises(ValueError, match="min_lang_score"):
        QualityConfig(min_lang_score=0.3)
    with pytest.raises(ValueError, match="gopher_max_bullet_line_frac"):
        QualityConfig(gopher_max_bullet_line_frac=1.5)


# Another valid value for every field that only changes decisions.
DECISION_CHANGES = {
    "languages": ["en", "fr"],
    "min_lang_score": 0.9,
    "rep_max_dup_line_frac": 0.1,
    "rep_max_dup_para_frac": 0.1,
    "rep_max_dup_line_char_frac": None,
    "rep_max_dup_para_char_frac": 0.5,
    "rep_top_ngram_max_char_frac": [0.1, 0.1, 0.1],
    "rep_dup_ngram_max_char_frac": [0.2] * 6,
    "gopher_min_words": 10,
    "gopher_max_words": 50,
    "gopher_min_mean_word_length": 4,
    "gopher_max_mean_word_length": 5,
    "gopher_max_symbol_word_ratio": 0.01,
    "gopher_max_bullet_line_frac": 0.1,
    "gopher_max_ellipsis_line_frac": None,
    "gopher_min_alpha_word_frac": 0.99,
    "gopher_min_stop_words": 5,
    "c4_filter_lorem_ipsum": False,
    "c4_filter_curly_bracket": False,
    "c4_min_sentences": -1,
    "fineweb_min_line_punct_ratio": 0.9,
    "fineweb_line_punct_exclude_zero": True,
    "fineweb_max_short_line_ratio": 0.1,
    "fineweb_max_dup_line_char_ratio": 0.5,
    "fineweb_max_newline_ratio": 0.01,
}


def test_decision_fields_do_not_change_signals() -> None:
    """Every field is either a signal field or a decision field, and decision fields really leave
    the measured values alone, so stored signals can be reused when only they change."""
    SIGNAL_FIELDS = QualityConfig.SIGNAL_FIELDS  # noqa: N806 - the config's constant
    fields = set(QualityConfig.model_fields)
    assert set(DECISION_CHANGES) == fields - QualityConfig.SIGNAL_FIELDS
    texts = [CLEAN, TRIPS["c4_lorem_ipsum"], TRIPS["gopher_rep_dup_5gram"], list_like_page()]
    base = quality_signals.compute_signals(texts, QualityConfig())
    for name, value in DECISION_CHANGES.items():
        config = QualityConfig(**{name: value})
        assert config.fields_hash(SIGNAL_FIELDS) == QualityConfig().fields_hash(SIGNAL_FIELDS)
        assert quality_signals.compute_signals(texts, config).equals(base), name
    changed = QualityConfig(c4_min_words_per_line=8)
    assert changed.fields_hash(SIGNAL_FIELDS) != QualityConfig().fields_hash(SIGNAL_FIELDS)
    assert not quality_signals.compute_signals(texts, changed).equals(base)


# ---------------------------------------------------------------------------------------------
# Through the stage mechanism: a real Parquet shard, run_unit, stored signals.

SOURCE = StageSpec(name="source", version="1")


def make_source(root: str, texts: list[str]) -> str:
    stage_dir = shards.join(root, "source")
    when = datetime(2026, 1, 2, tzinfo=UTC)
    docs = [
        Document(url=f"http://x/{i}", text=t, source="t", fetched_at=when)
        for i, t in enumerate(texts)
    ]
    unit = WorkUnit(name="part-00000", key=unit_key(SOURCE, StageConfig(), "v1"), source={})
    record = run_unit(stage_dir, unit, lambda _: documents_result(docs))
    finalize_stage(stage_dir, SOURCE, StageConfig(), [record], None)
    return stage_dir


def run_quality(root: str, config: QualityConfig) -> tuple[list, dict]:
    input_dir = shards.join(root, "source")
    stage_dir = shards.join(root, "quality")
    units, digest = plan_shard_units(STAGE, config, input_dir)
    records = [quality.quality_shard.fn(u, config, stage_dir) for u in units]
    return records, finalize_stage(stage_dir, STAGE, config, records, digest)


def test_stage_reuses_signals_when_only_thresholds_change(
    tmp_path: Path, pride_paragraph: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path)
    texts = [CLEAN, OTHER, pride_paragraph, TRIPS["gopher_min_words"], TRIPS["c4_curly_bracket"]]
    make_source(root, texts)
    records, manifest = run_quality(root, QualityConfig())
    assert records[0].stats["signals_computed"] == 5 and "signals_reused" not in records[0].stats
    assert manifest["counts"]["kept"] == 3
    assert manifest["counts"]["rejected_by_reason"] == {
        "c4_curly_bracket": 1,
        "gopher_min_words": 1,
    }
    assert (tmp_path / "quality" / "_signals" / "part-00000.parquet").is_file()
    kept = list(shards.iter_documents(shards.join(root, "quality")))
    assert {"lang", "lang_score", "quality_gopher_words"} <= set(kept[0])

    # A new threshold: the unit is redone, but from the stored signals; measuring would raise.
    def no_measuring(*args: object, **kwargs: object) -> None:
        raise AssertionError("signals were measured again")

    monkeypatch.setattr(quality, "compute_signals", no_measuring)
    lenient = QualityConfig(gopher_min_words=20, c4_filter_curly_bracket=False)
    records, manifest = run_quality(root, lenient)
    assert not records[0].skipped
    assert records[0].stats["signals_reused"] == 5 and "signals_computed" not in records[0].stats
    assert manifest["counts"]["kept"] == 4
    assert manifest["counts"]["rejected_by_reason"] == {"c4_min_sentences": 1}

    # A field that changes what is measured: signals are measured again.
    monkeypatch.undo()
    records, _ = run_quality(root, QualityConfig(c4_min_words_per_line=4))
    assert records[0].stats["signals_computed"] == 5
    # And the same config again: the unit is skipped altogether.
    records, _ = run_quality(root, QualityConfig(c4_min_words_per_line=4))
    assert records[0].skipped


def test_input_columns_pass_through_and_a_rerun_changes_nothing() -> None:
    table = pa.table({"id": ["a", "b"], "text": [CLEAN, OTHER], "earlier_stage": [1, 2]})
    first = quality_documents(table, QualityConfig())
    assert first.kept.column("earlier_stage").to_pylist() == [1, 2]
    assert first.rejected.num_rows == 0 and first.docs_in == 2
    # Quality over its own output: the signal columns are replaced, not duplicated.
    again = quality_documents(first.kept, QualityConfig())
    assert again.kept.equals(first.kept)
