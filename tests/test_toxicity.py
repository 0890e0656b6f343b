"""toxicity with its default backend for real (the profanity model in its wheel): scores, chunks,
the stage through its task on real shards, stored scores re-decided without the classifier, and
bad input. The detoxify backend is tested in test_toxicity_detoxify.py."""

from __future__ import annotations

import csv
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from pydantic import ValidationError

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import DOCUMENT_SCHEMA, Document
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    plan_shard_units,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import documents_result
from llmflow.tasks.curate import toxicity
from llmflow.tasks.curate.toxicity import (
    STAGE,
    ToxicityConfig,
    load_scorer,
    score_key,
    score_texts,
    text_chunks,
    toxicity_documents,
    toxicity_shard,
)

WHEN = datetime(2026, 1, 2, tzinfo=UTC)
PROFANE = "You are a fucking idiot and your shit opinions make me sick."
CLEAN = (
    "The committee met on Tuesday to review the budget for the new library. After a short"
    " discussion, members agreed to extend the opening hours on weekends."
)


def documents_table(texts: list[str]) -> pa.Table:
    rows = [
        {"id": f"d{i}", "text": t, "url": f"http://x/{i}", "source": "t", "fetched_at": WHEN}
        for i, t in enumerate(texts)
    ]
    return pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)


# --- profanity backend (the default) -------------------------------------------------------------


def test_profanity_removes_profane_text_and_keeps_clean_prose() -> None:
    result = toxicity_documents(documents_table([PROFANE, CLEAN]), ToxicityConfig())
    assert result.kept.column("text").to_pylist() == [CLEAN]
    assert result.rejected.column("text").to_pylist() == [PROFANE]
    assert result.rejected.column("reason").to_pylist() == ["toxic_profanity"]
    detail = result.rejected.column("detail")[0].as_py()
    assert detail.startswith("profanity=") and detail.endswith("≥ 0.6")
    # Scores stay on both sides, so a stricter cut can be made later without scoring again.
    assert result.kept.column("toxicity_profanity")[0].as_py() < 0.2
    assert result.rejected.column("toxicity_profanity")[0].as_py() > 0.9
    assert result.stats["removed_profanity"] == 1
    assert result.stats["documents_scored"] == 2 and result.stats["chunks_scored"] == 2


def test_davidson_tweets_get_sane_precision_and_recall(shared_data: Path) -> None:
    # Every 10th labelled tweet (2,479). Davidson is part of alt-profanity-check's training data,
    # so this checks the wiring and the threshold, not generalization (bench/toxicity_eval.md).
    path = shared_data / "toxicity" / "davidson" / "labeled_data.csv"
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[::10]
    toxic = [r["class"] in ("0", "1") for r in rows]
    config = ToxicityConfig()
    scores, _ = score_texts([r["tweet"] for r in rows], load_scorer(config))
    cut = config.thresholds["profanity"]
    flagged = [s is not None and s >= cut for s in scores["profanity"]]
    tp = sum(f and t for f, t in zip(flagged, toxic, strict=True))
    precision, recall = tp / sum(flagged), tp / sum(toxic)
    assert precision > 0.95 and recall > 0.9, (precision, recall)


def test_one_toxic_passage_in_a_long_clean_document_is_found(shared_data: Path) -> None:
    book = (shared_data / "text/gutenberg/1342/1342-0.txt").read_text(encoding="utf-8-sig")
    start = book.index("It is a truth universally acknowledged")
    paragraphs = book[start : start + 20_000].split("\n\n")  # ~20 kB of real, clean prose
    rant = (
        "Shut the fuck up, you worthless piece of shit.\n"
        "Nobody gives a damn about your stupid bitch ass opinions.\nGo fuck yourself, idiot."
    )
    middle = len(paragraphs) // 2
    texts = [
        "\n\n".join(paragraphs),
        "\n\n".join(paragraphs[:middle] + [rant] + paragraphs[middle:]),
    ]
    result = toxicity_documents(documents_table(texts), ToxicityConfig())
    assert result.kept.column("id").to_pylist() == ["d0"]
    assert result.rejected.column("id").to_pylist() == ["d1"]
    assert result.stats["chunks_scored"] >= 20  # scored in pieces...
    # ...because scored whole, the rant is diluted by the book around it and survives.
    whole = toxicity_documents(documents_table(texts), ToxicityConfig(chunk_chars=100_000))
    assert whole.rejected.num_rows == 0


def test_text_chunks_cut_at_line_breaks_and_cover_short_documents() -> None:
    text = "".join(f"line {i:04d} of the document\n" for i in range(400))  # 11,600 chars
    chunks, sampled = text_chunks(text, 2000, 32)
    assert not sampled
    assert all(len(c) <= 2000 for c in chunks)
    assert all(c.startswith("line ") and c.endswith("document") for c in chunks)
    assert "\n".join(chunks) == text.strip()
    # More than max_chunks pieces: windows spread from the start to the end of the text.
    chunks, sampled = text_chunks(text, 200, 4)
    assert sampled and len(chunks) == 4
    assert chunks[0].startswith("line 0000") and chunks[-1].endswith("line 0399 of the document")


def test_bad_input_is_scored_or_passed_through_never_an_exception() -> None:
    huge = ("All quiet on the western front. " * 1_600_000)[:50_000_000]
    texts = [
        huge,
        "a" * 1_000_000,  # one repeated character, no space to cut at
        "",
        " \n\t ",
        "这是一个关于图书馆开放时间的简短说明。",
        "مرحبا بكم في المكتبة العامة",
        "😀😀😀 🎉",
    ]
    started = time.perf_counter()
    result = toxicity_documents(documents_table(texts), ToxicityConfig())
    assert time.perf_counter() - started < 10  # sampled: a 50 MB document costs 32 chunks
    assert result.kept.num_rows == len(texts) and result.rejected.num_rows == 0
    scores = result.kept.column("toxicity_profanity").to_pylist()
    assert scores[2] is None and scores[3] is None  # nothing to score: null, kept
    assert all(0.0 <= s <= 1.0 for s in scores if s is not None)
    assert result.stats["documents_empty"] == 2 and result.stats["documents_sampled"] == 2


def test_rescoring_replaces_the_earlier_score_column() -> None:
    first = toxicity_documents(documents_table([CLEAN]), ToxicityConfig()).kept
    again = toxicity_documents(first, ToxicityConfig(thresholds={"profanity": 1.0}))
    assert again.kept.schema.names.count("toxicity_profanity") == 1
    assert again.kept.num_rows == 1


def test_bad_config_is_a_clear_error() -> None:
    with pytest.raises(ValidationError, match=r"\['toxicity'\] do not exist for backend"):
        ToxicityConfig(thresholds={"toxicity": 0.5})
    with pytest.raises(ValidationError, match=r"thresholds must be in \[0, 1\]"):
        ToxicityConfig(thresholds={"profanity": 1.5})
    with pytest.raises(ValidationError, match="chunk_chars"):
        ToxicityConfig(chunk_chars=10)
    # A label left out of the thresholds is scored but never removes.
    result = toxicity_documents(documents_table([PROFANE]), ToxicityConfig(thresholds={}))
    assert result.kept.num_rows == 1 and result.kept.column("toxicity_profanity")[0].as_py() > 0.9


# --- the stage through its task, on real shards --------------------------------------------------

SOURCE = StageSpec(name="source", version="1")


def source_dataset(tmp_path: Path, texts: list[str]) -> str:
    """A finished one-shard source dataset holding ``texts``; returns its folder."""
    source_dir = str(tmp_path / "source")
    docs = [
        Document(url=f"http://x/{i}", text=t, source="t", fetched_at=WHEN)
        for i, t in enumerate(texts)
    ]
    unit = WorkUnit(name="part-00000", key=unit_key(SOURCE, StageConfig(), "x"), source={})
    record = run_unit(source_dir, unit, lambda _: documents_result(docs))
    finalize_stage(source_dir, SOURCE, StageConfig(), [record], None)
    return source_dir


def run_stage(
    source_dir: str, stage_dir: str, config: ToxicityConfig
) -> tuple[list[UnitRecord], dict]:
    units, digest = plan_shard_units(STAGE, config, source_dir)
    records = [toxicity_shard.fn(u, config, stage_dir) for u in units]
    return records, finalize_stage(stage_dir, STAGE, config, records, digest)


def test_stage_runs_through_its_task_on_a_parquet_shard(tmp_path: Path) -> None:
    texts = [CLEAN, PROFANE, "", "Bonjour à tous, la réunion est reportée à lundi."]
    source_dir = source_dataset(tmp_path, texts)
    config = ToxicityConfig()
    stage_dir = str(tmp_path / "toxicity")
    records, manifest = run_stage(source_dir, stage_dir, config)
    assert manifest["counts"]["docs_in"] == 4
    assert manifest["counts"]["kept"] == 3
    assert manifest["counts"]["rejected_by_reason"] == {"toxic_profanity": 1}
    assert manifest["stats"]["removed_profanity"] == 1 and manifest["stats"]["documents_empty"] == 1
    names = [c["name"] for c in manifest["schema"]]
    assert names == ["id", "text", "url", "source", "fetched_at", "toxicity_profanity"]
    rejected = shards.read_shard(stage_dir, shards.manifest_shards(manifest, "rejected_shards")[0])
    assert rejected.column("text").to_pylist() == [PROFANE]
    # A second run with the same input and config skips the finished unit.
    units, _ = plan_shard_units(STAGE, config, source_dir)
    assert all(toxicity_shard.fn(u, config, stage_dir).skipped for u in units)
    # batch_size is a runtime field: changing it keeps the unit keys.
    assert plan_shard_units(STAGE, ToxicityConfig(batch_size=7), source_dir)[0] == units


def test_a_new_threshold_re_decides_from_stored_scores_without_the_scorer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source_dir = source_dataset(
        tmp_path, [CLEAN, PROFANE, "", "What a damn mess this meeting was."]
    )
    stage_dir = str(tmp_path / "toxicity")
    records, first = run_stage(source_dir, stage_dir, ToxicityConfig())
    assert records[0].stats["scores_computed"] == 4 and "scores_reused" not in records[0].stats
    assert (tmp_path / "toxicity" / "_scores" / "part-00000.parquet").is_file()
    kept = shards.read_shard(stage_dir, records[0].parts[0])
    clean_score = kept.column("toxicity_profanity")[0].as_py()
    stricter = ToxicityConfig(thresholds={"profanity": clean_score})  # now CLEAN goes too
    fresh, fresh_manifest = run_stage(source_dir, str(tmp_path / "fresh"), stricter)

    def no_scoring(config: ToxicityConfig) -> None:
        raise AssertionError("the classifier was loaded again")

    monkeypatch.setattr(toxicity, "load_scorer", no_scoring)
    records, manifest = run_stage(source_dir, stage_dir, stricter)
    assert not records[0].skipped
    assert records[0].stats["scores_reused"] == 4 and "scores_computed" not in records[0].stats
    assert manifest["counts"]["rejected"] > first["counts"]["rejected"]  # re-decided
    assert manifest["counts"] == fresh_manifest["counts"]
    # The same bytes as scoring afresh: kept and rejected shards, and the manifest's stats.
    assert (records[0].parts, records[0].rejected) == (fresh[0].parts, fresh[0].rejected)
    assert manifest["stats"] == fresh_manifest["stats"]
    assert manifest["stats"]["documents_empty"] == 1  # scoring's counters come back stored

    # A scorer field (how documents are chunked) changes the scores: they are scored again.
    with pytest.raises(AssertionError, match="classifier was loaded again"):
        run_stage(source_dir, stage_dir, ToxicityConfig(chunk_chars=500))
    monkeypatch.undo()
    records, _ = run_stage(source_dir, stage_dir, ToxicityConfig(chunk_chars=500))
    assert records[0].stats["scores_computed"] == 4

    # Scores of units that no longer exist go with their outputs.
    stale = tmp_path / "toxicity" / "_scores" / "part-00099.parquet"
    stale.write_bytes(b"")
    run_stage(source_dir, stage_dir, ToxicityConfig(chunk_chars=500))
    assert not stale.exists()


def test_only_scorer_fields_key_the_stored_scores() -> None:
    base = ToxicityConfig()
    table = documents_table([CLEAN, PROFANE])
    # Every field is declared: it changes scores, or only decisions, or only speed.
    decision_fields = {"thresholds"}
    declared = ToxicityConfig.SCORER_FIELDS | ToxicityConfig.RUNTIME_FIELDS | decision_fields
    assert declared == set(ToxicityConfig.model_fields)
    changed = {
        "backend": "detoxify",
        "chunk_chars": 500,
        "max_chunks": 4,
        "detoxify_model": "unbiased",
        "detoxify_checkpoint": "/models/toxic.ckpt",
        "detoxify_model_dir": "/models/bert",
        "thresholds": {"profanity": 0.1},
        "batch_size": 7,
        "device": "cuda",
    }
    for name, value in changed.items():
        other = ToxicityConfig(**{name: value})
        rescored = score_key(table, other) != score_key(table, base)
        assert rescored == (name in ToxicityConfig.SCORER_FIELDS), name
    # The texts decide the scores; other columns (ids, urls) do not.
    assert score_key(documents_table([CLEAN, CLEAN]), base) != score_key(table, base)
    renamed = table.set_column(0, "id", pa.array(["x", "y"]))
    assert score_key(renamed, base) == score_key(table, base)
