"""The benchmark n-gram index decontamination checks against: what it catches and what not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmflow.tasks.curate.benchmark_ngrams import (
    BenchmarkIndex,
    Item,
    benchmark_items,
    build_index,
    load_index,
    simplify,
)
from llmflow.tasks.ingest.embedded_data import BENCHMARKS_DIR

PAGE = "Welcome to our blog about sports and outdoor life. Today we look at a classic scene."


@pytest.fixture(scope="module")
def hellaswag() -> tuple[BenchmarkIndex, Item]:
    """The index of the shipped HellaSwag subset, and one of its long items."""
    items = list(benchmark_items(["hellaswag", "arc_easy"], BENCHMARKS_DIR))
    long_item = next(i for i in items if i.task == "hellaswag" and len(simplify(i.text)) >= 40)
    return build_index(items), long_item


def test_an_item_copied_verbatim_is_caught_with_its_task_and_id(
    hellaswag: tuple[BenchmarkIndex, Item],
) -> None:
    index, item = hellaswag
    assert index.matches(f"{PAGE} {item.text} Thanks for reading!") == [("hellaswag", item.id)]
    # the same words in another case and punctuation: the same n-grams
    shouted = " ".join(simplify(item.text)).upper().replace(" ", ", ")
    assert index.matches(shouted) == [("hellaswag", item.id)]
    assert index.matches(PAGE) == []


def test_a_paraphrase_beyond_the_ngram_size_is_not_caught(
    hellaswag: tuple[BenchmarkIndex, Item],
) -> None:
    index, item = hellaswag
    words = simplify(item.text)
    # every 12th word changed: no 13 consecutive words of the item survive
    paraphrased = [w if (i + 1) % 12 else "otherword" for i, w in enumerate(words)]
    assert index.matches(" ".join(paraphrased)) == []


def test_twelve_shared_words_are_not_an_overlap_and_thirteen_are(
    hellaswag: tuple[BenchmarkIndex, Item],
) -> None:
    index, item = hellaswag
    words = simplify(item.text)
    assert index.matches(f"{PAGE} {' '.join(words[5:17])} and so on") == []
    assert index.matches(f"{PAGE} {' '.join(words[5:18])} and so on") == [("hellaswag", item.id)]


def test_an_item_is_its_context_and_its_gold_answer() -> None:
    from llmflow.tasks.evaluate.benchmarks import load_task
    from llmflow.tasks.evaluate.evaluation import find_benchmark

    data = load_task("arc_easy", find_benchmark("arc_easy", BENCHMARKS_DIR), num_fewshot=0)
    first = data.items[0]
    (item, *_) = benchmark_items(["arc_easy"], BENCHMARKS_DIR, limit=1)
    assert item.text == first.context + first.choices[first.gold]
    winogrande = next(iter(benchmark_items(["winogrande"], BENCHMARKS_DIR, limit=1)))
    assert "_" not in winogrande.text  # the gold option is filled into the sentence


def test_the_index_is_saved_and_loaded_without_pickle(
    hellaswag: tuple[BenchmarkIndex, Item], tmp_path: Path
) -> None:
    index, item = hellaswag
    folder = Path(index.save(str(tmp_path)))
    assert folder.name == index.digest[:16]
    loaded = load_index(str(folder))
    assert loaded.matches(item.text) == index.matches(item.text) == [("hellaswag", item.id)]
    assert np.array_equal(loaded.hashes, index.hashes)

    # a crafted file: an object array (pickle) or owners pointing past the items is refused
    np.save(folder / "owners.npy", np.array([object()] * len(index.owners)), allow_pickle=True)
    with pytest.raises(ValueError, match="benchmark index"):
        load_index(str(folder))
    np.save(folder / "owners.npy", index.owners + len(index.items), allow_pickle=False)
    with pytest.raises(ValueError, match="not an index"):
        load_index(str(folder))


def test_the_digest_names_the_items_and_the_ngram_size() -> None:
    items = [Item("t", "1", "one two three four five six seven eight nine ten eleven twelve x")]
    assert build_index(items, 13).digest != build_index(items, 8).digest
    changed = [Item("t", "1", items[0].text + " more")]
    assert build_index(items).digest != build_index(changed).digest
    assert build_index(items).digest == build_index(list(items)).digest
    assert len(build_index(items, 13).hashes) == 1 and len(build_index(items, 14).hashes) == 0
