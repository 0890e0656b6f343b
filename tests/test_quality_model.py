"""The quality_model stage: trains on its labels, scores every document, decides apart from the
score, and re-decides a changed cut from stored scores without training or scoring again."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from document_datasets import junk_texts, reference_documents, write_texts
from pydantic import ValidationError

from llmflow.tasks.core import shards
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import UnitRecord
from llmflow.tasks.curate import quality_model
from llmflow.tasks.curate.quality_model import (
    METRICS_JSON,
    SCORE_FIELD,
    STAGE,
    QualityModelConfig,
    crawl_sample,
    plan_units,
    prepare,
    quality_model_shard,
)
from llmflow.tasks.curate.text_classifier import ClassifierSettings

SMALL = ClassifierSettings(n_features=2**16)


def prose(count: int) -> list[str]:
    return [text for _, text in reference_documents(800)[:count]]


@pytest.fixture
def datasets(tmp_path: Path) -> tuple[str, str, list[str]]:
    """A 'normalize' dataset (prose and junk, what negatives are sampled from) and the stage's
    input (a part of it, in 2 shards). Returns both folders and the input's texts."""
    crawl = prose(300) + junk_texts(300, 1)
    random.Random(0).shuffle(crawl)
    normalize_dir = str(tmp_path / "normalize")
    write_texts(normalize_dir, crawl, shards=3)
    texts = prose(40) + junk_texts(40, 2)
    input_dir = str(tmp_path / "dedup")
    write_texts(input_dir, texts, shards=2)
    return input_dir, normalize_dir, texts


def run_stage(
    datasets: tuple[str, str, list[str]], stage_dir: str, config: QualityModelConfig
) -> tuple[list[UnitRecord], dict[str, Any]]:
    input_dir, normalize_dir, _ = datasets
    units, digest = plan_units(config, input_dir, normalize_dir, stage_dir)

    def serial(task: Any, items: list[Any], label: str) -> list[Any]:
        return [task.fn(u, config, stage_dir) for u in items]

    prepare(units, config, stage_dir, serial)
    records = [quality_model_shard.fn(u, config, stage_dir) for u in units]
    return records, finalize_stage(stage_dir, STAGE, config, records, digest)


def kept_scores(stage_dir: str, manifest: dict[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for shard in shards.manifest_shards(manifest):
        table = shards.read_shard(stage_dir, shard, ["text", SCORE_FIELD.name])
        out |= dict(zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True))
    return out


def metrics(stage_dir: str) -> dict[str, Any]:
    (path,) = Path(stage_dir, quality_model.MODEL_DIR).glob(f"*/{METRICS_JSON}")
    return json.loads(path.read_text())


def test_reference_recipe_scores_every_document_and_keeps_all(
    tmp_path: Path, datasets: tuple[str, str, list[str]]
) -> None:
    stage_dir = str(tmp_path / "quality_model")
    config = QualityModelConfig(classifier=SMALL, negatives=200)
    records, manifest = run_stage(datasets, stage_dir, config)
    assert manifest["counts"]["docs_in"] == 80 and manifest["counts"]["kept"] == 80
    scores = kept_scores(stage_dir, manifest)
    assert len(scores) == 80 and all(0.0 <= s <= 1.0 for s in scores.values())
    found = metrics(stage_dir)
    # The shipped conversations against 200 documents sampled from the crawl.
    assert found["labelled_positives"] == 307 and found["labelled_negatives"] == 200
    assert found["heldout_roc_auc"] > 0.9 and found["threshold"] == 0.5
    assert sum(r.stats["scores_computed"] for r in records) == 80
    # Trained again from nothing, the model and every score are the same.
    again_dir = str(tmp_path / "again")
    _, again = run_stage(datasets, again_dir, config)
    assert kept_scores(again_dir, again) == scores
    # A finished stage is skipped, unit by unit.
    records, _ = run_stage(datasets, stage_dir, config)
    assert all(r.skipped for r in records)


def test_a_changed_cut_re_decides_from_stored_scores(
    tmp_path: Path, datasets: tuple[str, str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    stage_dir = str(tmp_path / "quality_model")
    base = QualityModelConfig(classifier=SMALL, negatives=200)
    _, first = run_stage(datasets, stage_dir, base)
    scores = kept_scores(stage_dir, first)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained again")

    def no_scoring(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored again")

    monkeypatch.setattr(quality_model, "train_classifier", no_training)
    monkeypatch.setattr(quality_model.TextClassifier, "score", no_scoring)

    cut = float(np.median(list(scores.values())))
    by_threshold = base.model_copy(update={"keep": "threshold", "threshold": cut})
    records, manifest = run_stage(datasets, stage_dir, by_threshold)
    assert not any(r.skipped for r in records)
    assert sum(r.stats["scores_reused"] for r in records) == 80
    assert manifest["counts"]["kept"] == sum(s >= cut for s in scores.values())
    assert set(manifest["counts"]["rejected_by_reason"]) == {"quality_model_score"}
    assert kept_scores(stage_dir, manifest) == {t: s for t, s in scores.items() if s >= cut}

    top = base.model_copy(update={"keep": "top_fraction", "top_fraction": 0.25})
    _, manifest = run_stage(datasets, stage_dir, top)
    kept = kept_scores(stage_dir, manifest)
    assert 20 <= len(kept) <= 22  # a quarter, and the documents tied at the cut
    assert min(kept.values()) >= max(s for t, s in scores.items() if t not in kept)


def test_user_labels_learn_what_the_user_marked(
    tmp_path: Path, datasets: tuple[str, str, list[str]]
) -> None:
    labels = tmp_path / "labels.jsonl"
    rows = [{"text": t, "label": 1} for t in prose(300)[100:]]
    rows += [{"text": t, "label": "false"} for t in junk_texts(200, 3)]
    lines = [json.dumps(r) for r in rows]
    lines += ['{"text": "", "label": 1}', '{"text": "x", "label": "maybe"}', "not json", "[1]"]
    labels.write_text("\n".join(lines) + "\n")
    stage_dir = str(tmp_path / "quality_model")
    config = QualityModelConfig(
        labels="user", labels_file=str(labels), classifier=SMALL, keep="threshold"
    )
    _, manifest = run_stage(datasets, stage_dir, config)
    found = metrics(stage_dir)
    assert found["labelled_positives"] == 200 and found["labelled_negatives"] == 200
    assert found["skipped"] == {"no_text": 1, "unknown_label": 1, "not_an_object": 2}
    assert found["heldout_roc_auc"] > 0.99
    kept = set(kept_scores(stage_dir, manifest))
    _, _, texts = datasets
    assert kept == set(texts[:40])  # the prose kept, every junk document removed


def test_a_given_model_is_applied_and_a_crafted_one_refused(
    tmp_path: Path, datasets: tuple[str, str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    trained_dir = str(tmp_path / "trained")
    _, first = run_stage(datasets, trained_dir, QualityModelConfig(classifier=SMALL))
    (model_folder,) = Path(trained_dir, quality_model.MODEL_DIR).iterdir()

    monkeypatch.setattr(quality_model, "train_classifier", lambda *a, **k: 1 / 0)
    applied = QualityModelConfig(model=str(model_folder))
    applied_dir = str(tmp_path / "applied")
    _, manifest = run_stage(datasets, applied_dir, applied)
    assert kept_scores(applied_dir, manifest) == kept_scores(trained_dir, first)

    weights = model_folder / "weights.npy"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(ValueError, match="weights.npy"):
        run_stage(datasets, str(tmp_path / "crafted"), applied)


def test_the_crawl_sample_does_not_depend_on_sharding(tmp_path: Path) -> None:
    texts = prose(100) + junk_texts(100, 4)
    write_texts(str(tmp_path / "one"), texts, shards=1)
    write_texts(str(tmp_path / "five"), texts, shards=5)
    one = crawl_sample(str(tmp_path / "one"), 50, 10_000)
    assert len(one) == 50 and len(set(one)) == 50
    assert one == crawl_sample(str(tmp_path / "five"), 50, 10_000)
    assert sorted(crawl_sample(str(tmp_path / "one"), 500, 10_000)) == sorted(texts)


def test_user_labels_need_a_file() -> None:
    with pytest.raises(ValidationError, match="labels_file"):
        QualityModelConfig(labels="user")


def test_with_nothing_to_learn_documents_pass_unscored_unless_a_cut_is_asked(
    tmp_path: Path,
) -> None:
    normalize_dir = str(tmp_path / "normalize")
    write_texts(normalize_dir, prose(1), shards=1)  # one crawled page: held out, or nothing
    input_dir = str(tmp_path / "dedup")
    write_texts(input_dir, prose(3), shards=1)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"text": "only good examples", "label": 1}) + "\n")
    config = QualityModelConfig(labels="user", labels_file=str(labels), classifier=SMALL)
    stage_dir = str(tmp_path / "quality_model")
    data: tuple[str, str, list[str]] = (input_dir, normalize_dir, [])
    _, manifest = run_stage(data, stage_dir, config)
    assert manifest["counts"]["kept"] == 3
    assert set(kept_scores(stage_dir, manifest).values()) == {None}
    assert metrics(stage_dir)["untrained"].startswith("no negative text to train on")
    cut = config.model_copy(update={"keep": "threshold"})
    with pytest.raises(ValueError, match="cannot train a model to cut by: no negative text"):
        run_stage(data, str(tmp_path / "cut"), cut)
