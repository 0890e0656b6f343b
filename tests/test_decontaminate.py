"""The decontaminate stage on a small crawl with benchmark items planted in it, through the real
stage mechanism (plan, units, manifest), and its check of SFT conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from document_datasets import write_texts

from llmflow.tasks.core import shards
from llmflow.tasks.curate import decontaminate
from llmflow.tasks.curate.benchmark_ngrams import benchmark_items
from llmflow.tasks.curate.decontaminate import DecontaminateConfig
from llmflow.tasks.ingest.embedded_data import BENCHMARKS_DIR

TASKS = ["hellaswag", "arc_easy", "piqa"]
OPENING = "Our club met on Saturday at the lake near the old mill, and the weather held all day. "
CLOSING = " Afterwards we packed the boats onto the trailer and drove home before dark."


@pytest.fixture(scope="module")
def item() -> tuple[str, list[str]]:
    """A HellaSwag item of the shipped subset (its id and its words), long enough to cut."""
    found = next(i for i in benchmark_items(["hellaswag"], BENCHMARKS_DIR) if len(i.text) > 150)
    return found.id, found.text.split()


def planted(item: tuple[str, list[str]]) -> dict[str, str]:
    """Documents: the item verbatim, paraphrased (no 13 words in a row kept), 12 of its words in
    a row only, and none of it."""
    _, words = item
    paraphrase = [f"{w} really" if i % 6 == 5 else w for i, w in enumerate(words)]
    return {
        "verbatim": OPENING + " ".join(words) + CLOSING,
        "paraphrased": OPENING + " ".join(paraphrase) + CLOSING,
        "twelve_words": OPENING + " ".join(words[3:15]) + " and then we rested." + CLOSING,
        "clean": OPENING + "Nobody fell in the water this time." + CLOSING,
    }


def run_stage(source: str, out: str, config: DecontaminateConfig) -> dict:
    units, digest = decontaminate.plan_units(config, source)
    records = [decontaminate.decontaminate_shard.fn(u, config, out) for u in units]
    return decontaminate.finish(units, config, out, records, digest)


def config_for(tmp_path: Path, **fields: object) -> DecontaminateConfig:
    return DecontaminateConfig(tasks=TASKS, index_dir=str(tmp_path / "index"), **fields)


def test_a_verbatim_item_is_caught_and_a_paraphrase_or_12_words_are_not(
    item: tuple[str, list[str]], tmp_path: Path
) -> None:
    docs = planted(item)
    ids = dict(zip(docs, write_texts(str(tmp_path / "pii"), list(docs.values())), strict=True))
    out = str(tmp_path / "decontaminate")
    manifest = run_stage(str(tmp_path / "pii"), out, config_for(tmp_path))

    rejected = [
        row
        for shard in shards.manifest_shards(manifest, "rejected_shards")
        for row in shards.read_shard(out, shard).to_pylist()
    ]
    assert [r["id"] for r in rejected] == [ids["verbatim"]]
    assert rejected[0]["reason"] == "benchmark_overlap"
    assert f"hellaswag/{item[0]}" in rejected[0]["detail"]
    assert rejected[0]["benchmark_items"] == [f"hellaswag/{item[0]}"]
    kept = {d["id"]: d for d in shards.iter_documents(out)}
    assert set(kept) == {ids["paraphrased"], ids["twelve_words"], ids["clean"]}
    assert all(d["benchmark_items"] == [] for d in kept.values())
    # the counts per task, and what the index covered
    assert manifest["counts"]["rejected_by_reason"] == {"benchmark_overlap": 1}
    assert manifest["stats"]["overlap_documents.hellaswag"] == 1
    assert "overlap_documents.piqa" not in manifest["stats"]
    assert manifest["benchmark_index"]["items"] == {t: 200 for t in sorted(TASKS)}
    assert manifest["benchmark_index"]["n"] == 13


def test_flag_mode_keeps_the_document_and_names_the_item_and_the_index_is_reused(
    item: tuple[str, list[str]], tmp_path: Path
) -> None:
    docs = planted(item)
    write_texts(str(tmp_path / "pii"), list(docs.values()))
    first = run_stage(str(tmp_path / "pii"), str(tmp_path / "a"), config_for(tmp_path))
    items_json = Path(first["benchmark_index"]["path"]) / "items.json"
    built = items_json.stat().st_mtime_ns

    flagged = config_for(tmp_path, mode="flag")
    assert decontaminate.ensure_index(flagged).built is False  # same benchmark set: loaded
    out = str(tmp_path / "b")
    manifest = run_stage(str(tmp_path / "pii"), out, flagged)
    assert items_json.stat().st_mtime_ns == built
    assert manifest["counts"]["kept"] == 4 and manifest["counts"]["rejected"] == 0
    assert decontaminate.items_seen(out) == {f"hellaswag/{item[0]}": 1}
    # another n-gram size is another index, built once
    assert decontaminate.ensure_index(config_for(tmp_path, n=8)).built is True
    assert decontaminate.ensure_index(config_for(tmp_path, n=8)).built is False


def test_sft_conversations_get_the_same_check(item: tuple[str, list[str]], tmp_path: Path) -> None:
    from llmflow.tasks.train.sft import conversation_text, read_data
    from llmflow.tasks.train.train_config import SftConfig

    docs = planted(item)
    conversations = [
        [{"role": "user", "content": text}, {"role": "assistant", "content": "Noted."}]
        for text in docs.values()
    ]
    texts = [conversation_text(c) for c in conversations]
    rejected = decontaminate.screen_texts(texts, config_for(tmp_path))
    assert rejected.keep == [False, True, True, True] and rejected.removed == 1
    flagged = decontaminate.screen_texts(texts, config_for(tmp_path, mode="flag"))
    assert flagged.keep == [True] * 4 and flagged.flagged == [f"hellaswag/{item[0]}"]

    # the SFT stage's reading of its file: the conversation is skipped, counted by its reason
    path = tmp_path / "conversations.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    kept, _, data = read_data(SftConfig(data=str(path)), config_for(tmp_path))
    assert len(kept) == 3 and data.skipped == {"benchmark_overlap": 1}
    kept, _, flagged_data = read_data(SftConfig(data=str(path)), config_for(tmp_path, mode="flag"))
    assert len(kept) == 4 and flagged_data.benchmark_items == [f"hellaswag/{item[0]}"]
    # the run key changes with the check: another index or mode is another run
    assert (
        len({data.sha256, flagged_data.sha256, read_data(SftConfig(data=str(path)))[2].sha256}) == 3
    )


def test_the_stage_checks_what_the_evaluate_stage_scores() -> None:
    from llmflow.tasks.evaluate.evaluate_config import EvaluateConfig

    evaluate = EvaluateConfig(tasks=["piqa", "mmlu"], data_dir="/benchmarks")
    config = decontaminate.with_evaluated_tasks(DecontaminateConfig(), evaluate, "/root/index")
    assert (config.tasks, config.data_dir, config.index_dir) == (
        ["piqa", "mmlu"],
        "/benchmarks",
        "/root/index",
    )
    own = DecontaminateConfig(tasks=["arc_easy"], data_dir="/mine")
    assert decontaminate.with_evaluated_tasks(own, evaluate, "/i").tasks == ["arc_easy"]
    with pytest.raises(ValueError, match="unknown task"):
        DecontaminateConfig(tasks=["hellaswagg"])
