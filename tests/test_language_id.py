"""Batched language ID gives py3langid's own answers, bit for bit, whatever the batching."""

from __future__ import annotations

import random

import pytest
from py3langid.langid import MODEL_FILE, LanguageIdentifier

from llmflow.tasks.curate import language_id
from llmflow.tasks.curate.language_id import identify_languages

SENTENCES = [
    "It is a truth universally acknowledged, that a single man must be in want of a wife.",
    "Aujourd'hui, maman est morte. Ou peut-être hier, je ne sais pas.",
    "Als Gregor Samsa eines Morgens aus unruhigen Träumen erwachte, fand er sich verwandelt.",
    "En un lugar de la Mancha, de cuyo nombre no quiero acordarme, no ha mucho tiempo.",
    "Nel mezzo del cammin di nostra vita mi ritrovai per una selva oscura.",
    "Все счастливые семьи похожи друг на друга, каждая несчастливая семья несчастлива.",
    "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。",
    "Ἄνδρα μοι ἔννεπε, Μοῦσα, πολύτροπον, ὃς μάλα πολλὰ πλάγχθη.",
    "قال الراوي إن المدينة كانت هادئة في ذلك المساء البعيد.",
    "Mijn vader was een eenvoudig man die elke ochtend vroeg naar zijn werk ging.",
    "404 — 12:30 / 7,5 % ... !!! ???",
]


def _texts(count: int, seed: int = 0) -> list[str]:
    """Mixed-language texts from a few bytes to a few KB, upper-cased and blank ones among them."""
    rng = random.Random(seed)
    texts = ["", " ", "a", "\n\n", "HELLO WORLD, THIS IS SHOUTING", "\ud800 lone surrogate"]
    while len(texts) < count:
        text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 40)))
        texts.append(text.upper() if rng.random() < 0.1 else text)
    return texts


@pytest.fixture(scope="module")
def py3langid_answers() -> tuple[list[str], list[tuple[str, float]]]:
    identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    texts = _texts(300)
    return texts, [identifier.classify(text) for text in texts]


def test_batched_answers_equal_py3langid(
    py3langid_answers: tuple[list[str], list[tuple[str, float]]],
) -> None:
    texts, expected = py3langid_answers
    found = identify_languages(texts)
    assert found == expected  # the same language and the same float, for every text
    assert len({lang for lang, _ in found}) >= 8  # the texts really span languages


def test_answers_do_not_depend_on_the_batching(
    py3langid_answers: tuple[list[str], list[tuple[str, float]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    texts, expected = py3langid_answers
    # Small cells: many batches, the long texts in batches under MIN_BATCH (py3langid's own walk).
    monkeypatch.setattr(language_id, "BATCH_CELLS", 20_000)
    assert identify_languages(texts) == expected
    assert [identify_languages([text])[0] for text in texts[:40]] == expected[:40]
    assert identify_languages([]) == []
