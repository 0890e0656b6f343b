"""labels=model: a causal LM rates a sample of the crawl, its ratings (kept, reused) split at a
cut into the labels of the quality classifier. The rater is a tiny Llama built here, saved as a
Hugging Face folder and loaded by the evaluate stage's own loader."""

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
from llmflow.tasks.curate import quality_model
from llmflow.tasks.curate.quality_model import (
    METRICS_JSON,
    SCORE_FIELD,
    STAGE,
    QualityModelConfig,
    plan_units,
    prepare,
    quality_model_shard,
    report,
)
from llmflow.tasks.curate.quality_model_labels import crawl_sample
from llmflow.tasks.curate.quality_model_rater import (
    DEFAULT_PROMPT,
    RATINGS_DIR,
    labels_from_ratings,
    prompt_ids,
    rate_sample,
    rater_labels,
)
from llmflow.tasks.curate.text_classifier import ClassifierSettings

SMALL = ClassifierSettings(n_features=2**16)
SPECIALS = ["[UNK]", "[PAD]", "</s>", "Score:"]


def crawl_texts() -> list[str]:
    texts = [t for _, t in reference_documents(800)[:60]] + junk_texts(60, 1)
    random.Random(0).shuffle(texts)
    return texts


def build_rater(folder: Path, chat_template: str | None = None) -> str:
    """A one-layer Llama with a word-level tokenizer over the crawl's words, the digits 0-5 and
    the answer's start; its weights are random but wide (initializer_range), so ratings differ
    by document."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    first = [*SPECIALS, *"012345"]
    words = {w for t in [*crawl_texts(), DEFAULT_PROMPT] for w in t.split()} - set(first)
    vocab = {w: i for i, w in enumerate(first + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,  # shorter than some prompts: the document is cut to fit
        initializer_range=0.5,
        pad_token_id=1,
        eos_token_id=2,
        bos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def rater(tmp_path_factory: pytest.TempPathFactory) -> str:
    return build_rater(tmp_path_factory.mktemp("rater"))


@pytest.fixture
def crawl(tmp_path: Path) -> str:
    folder = str(tmp_path / "normalize")
    write_texts(folder, crawl_texts(), shards=2)
    return folder


def config_for(rater: str, **update: Any) -> QualityModelConfig:
    settings = {"labels": "model", "rater": rater, "rater_documents": 40, "classifier": SMALL}
    return QualityModelConfig.model_validate(settings | update)


def counting_loader(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records each load of the rater (the real loader still loads it)."""
    from llmflow.tasks.evaluate import model_loading

    loads: list[str] = []
    real = model_loading.load_causal_lm

    def load(path: str, device: str = "cpu") -> tuple[Any, Any]:
        loads.append(path)
        return real(path, device)

    monkeypatch.setattr(model_loading, "load_causal_lm", load)
    return loads


def test_ratings_are_deterministic_in_range_and_split_at_the_cut(
    tmp_path: Path, rater: str, crawl: str
) -> None:
    config = config_for(rater)
    texts = crawl_sample(crawl, 40, config.classifier.max_chars)
    first, reused = rate_sample(texts, config, str(tmp_path / "a"), "digest")
    again, _ = rate_sample(texts, config, str(tmp_path / "b"), "digest")  # rated afresh
    assert not reused and first.column("rating").equals(again.column("rating"))
    ratings = first.column("rating").to_numpy()
    assert len(ratings) == 40 and ((ratings >= 0) & (ratings <= 5)).all()
    assert np.unique(ratings).size > 20  # the documents are told apart
    mass = first.column("digit_mass").to_numpy()
    assert ((mass > 0) & (mass <= 1)).all()
    cut = float(np.median(ratings))
    labelled = labels_from_ratings(texts, ratings, cut)
    assert labelled.positives == [t for t, r in zip(texts, ratings, strict=True) if r >= cut]
    assert labelled.negatives == [t for t, r in zip(texts, ratings, strict=True) if r < cut]
    assert len(labelled.positives) >= 20 and labelled.negatives


def test_the_ratings_are_kept_and_a_changed_cut_does_not_rate_again(
    tmp_path: Path, rater: str, crawl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = counting_loader(monkeypatch)
    stage_dir = str(tmp_path / "quality_model")
    first = rater_labels(config_for(rater), crawl, stage_dir, "digest")
    assert loads == [rater] and len(list(Path(stage_dir, RATINGS_DIR).iterdir())) == 1
    details = first.details
    assert details["rater"] == rater and details["rater_prompt"] == DEFAULT_PROMPT
    assert details["rater_rated"] == 40 and sum(details["rater_histogram"].values()) == 40
    assert details["rater_cut"] == 3.0

    cut = details["rater_mean"]
    second = rater_labels(config_for(rater, rater_cut=cut), crawl, stage_dir, "digest")
    assert loads == [rater]  # re-labelled from the kept ratings
    assert sorted(second.positives + second.negatives) == sorted(first.positives + first.negatives)
    assert second.positives != first.positives and second.details["rater_cut"] == cut

    # Another rater (its digest), prompt or sample is rated again.
    rater_labels(config_for(rater), crawl, stage_dir, "another digest")
    prompt = "Rate this from 0 to 5: {text}"
    rater_labels(config_for(rater, rater_prompt=prompt), crawl, stage_dir, "digest")
    rater_labels(config_for(rater, rater_documents=30), crawl, stage_dir, "digest")
    assert len(loads) == 4


def test_the_prompt_goes_through_a_chat_template_when_the_tokenizer_has_one(
    tmp_path: Path,
) -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ ' score\\n' }}"
    plain = build_rater(tmp_path / "plain")
    chat = build_rater(tmp_path / "chat", chat_template=template)
    from llmflow.tasks.evaluate.model_loading import load_causal_lm

    _, plain_tokenizer = load_causal_lm(plain)
    _, chat_tokenizer = load_causal_lm(chat)
    ids = prompt_ids(plain_tokenizer, "Extract: {text}", "Add 1 point")
    assert plain_tokenizer.decode(ids) == "Extract: Add 1 point Score:"  # the answer begun
    ids = prompt_ids(chat_tokenizer, "Extract: {text}", "Add 1 point")
    assert chat_tokenizer.decode(ids) == "Extract: Add 1 point score Score:"


def test_labels_model_needs_a_rater_and_a_prompt_with_text() -> None:
    with pytest.raises(ValidationError, match="set quality_model.rater"):
        QualityModelConfig(labels="model")
    with pytest.raises(ValidationError, match=r"rater_prompt: no \{text\}"):
        QualityModelConfig(labels="model", rater="m.gguf", rater_prompt="Rate this page.")


class Recorder:
    """What a stage's MLflow run is sent."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}
        self.dicts: dict[str, Any] = {}

    def log(self, metrics: dict[str, float], tags: dict[str, str]) -> None:
        self.metrics |= metrics
        self.tags |= tags

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.dicts[artifact_file] = data

    def log_artifacts(self, local_path: Any, artifact_path: str) -> None:
        pass


def run_stage(config: QualityModelConfig, input_dir: str, crawl: str, stage_dir: str) -> Any:
    units, digest = plan_units(config, input_dir, crawl, stage_dir)

    def serial(task: Any, items: list[Any], label: str) -> list[Any]:
        return [task.fn(u, config, stage_dir) for u in items]

    prepare(units, config, stage_dir, serial)
    records = [quality_model_shard.fn(u, config, stage_dir) for u in units]
    return units, finalize_stage(stage_dir, STAGE, config, records, digest)


def stored_metrics(stage_dir: str) -> dict[float, dict[str, Any]]:
    """Each trained model's metrics.json, by the cut its labels were split at."""
    found = Path(stage_dir, quality_model.MODEL_DIR).glob(f"*/{METRICS_JSON}")
    return {m["rater_cut"]: m for m in (json.loads(p.read_text()) for p in found)}


def test_a_stage_run_trains_on_the_ratings_and_reports_the_rater(
    tmp_path: Path, rater: str, crawl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    input_dir = str(tmp_path / "dedup")
    write_texts(input_dir, crawl_texts()[:30], shards=2)
    stage_dir = str(tmp_path / "quality_model")
    loads = counting_loader(monkeypatch)
    # The cut that splits the sample: the median of its ratings, found as the stage finds them.
    probe = config_for(rater)
    texts = crawl_sample(crawl, 40, probe.classifier.max_chars)
    ratings = rate_sample(texts, probe, str(tmp_path / "probe"), "x")[0].column("rating")
    cut = float(np.median(ratings.to_numpy()))
    config = config_for(rater, rater_cut=cut)

    units, manifest = run_stage(config, input_dir, crawl, stage_dir)
    assert manifest["counts"]["kept"] == 30
    scores = [
        s
        for shard in shards.manifest_shards(manifest)
        for s in shards.read_shard(stage_dir, shard, [SCORE_FIELD.name]).column(0).to_pylist()
    ]
    assert len(scores) == 30 and all(s is not None and 0 <= s <= 1 for s in scores)
    (found,) = stored_metrics(stage_dir).values()
    assert found["labelled_positives"] + found["labelled_negatives"] == 40
    assert found["labelled_positives"] >= 20 and found["rater_cut"] == cut
    assert "untrained" not in found and found["rater_prompt"] == DEFAULT_PROMPT

    run = Recorder()
    report(run, units, config, stage_dir)
    assert run.tags["llmflow.quality_model.rater"] == rater
    assert run.dicts["quality_model/rater.json"]["rater_prompt"] == DEFAULT_PROMPT
    assert run.metrics["model.rater_rated"] == 40
    assert sum(v for k, v in run.metrics.items() if "rater_histogram" in k) == 40

    # A cut above every rating: another model, from the kept ratings, with no positives; the
    # documents pass unscored (keep: all) and metrics.json says why, as for any label source.
    assert len(loads) == 2  # the probe's, under another digest, and the stage's
    empty = config_for(rater, rater_cut=5.0)
    units, manifest = run_stage(empty, input_dir, crawl, stage_dir)
    assert len(loads) == 2
    assert manifest["counts"]["kept"] == 30
    untrained = stored_metrics(stage_dir)[5.0]
    assert untrained["untrained"].startswith("no positive text to train on")
    assert untrained["labelled_positives"] == 0 and untrained["rater_rated"] == 40
