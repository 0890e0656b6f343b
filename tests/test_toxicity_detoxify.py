"""toxicity's detoxify backend, offline: a checkpoint built here in detoxify's own format, loaded
through detoxify's model code, its scores stored and re-decided; missing, foreign and crafted
checkpoints refused with clear errors before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_toxicity import CLEAN, PROFANE, documents_table, run_stage, source_dataset

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import WorkUnit, run_unit
from llmflow.tasks.curate import toxicity
from llmflow.tasks.curate.toxicity import (
    ToxicityConfig,
    ToxicityLabelError,
    load_scorer,
    toxicity_documents,
)
from llmflow.tasks.curate.toxicity_detoxify import (
    DetoxifyCheckpointInvalid,
    DetoxifyCheckpointNotFound,
    DetoxifyModelNotFound,
)

CLASSES = ["toxic", "severe_toxic", "insult"]  # detoxify renames the first two
LABELS = ("toxicity", "severe_toxicity", "insult")


@pytest.fixture(scope="module")
def tiny_detoxify(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-layer BERT with a WordPiece vocabulary trained here, saved as a detoxify checkpoint.

    Two files: one naming its local model folder (what works offline), one naming the hub id
    bert-base-uncased like the official checkpoints (needs detoxify_model_dir).
    """
    import torch
    import transformers
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    root = tmp_path_factory.mktemp("detoxify")
    base = root / "tiny-bert"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    texts = [PROFANE, CLEAN, "what a lovely day", "the quick brown fox jumps over the lazy dog"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # A fixed vocabulary (the texts' words and letters, sorted) rather than a trained one: the
    # WordPiece trainer breaks ties differently from run to run, which changed the seeded model
    # below, and with it the scores, on every run.
    words = {
        word
        for text in texts
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    }
    letters = {c for word in words for c in word}
    pieces = sorted(words | letters | {f"##{c}" for c in letters})
    vocab = {token: i for i, token in enumerate(specials + pieces)}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    wordpiece.normalizer = normalizer
    wordpiece.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    wordpiece.decoder = decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        model_max_length=64,
        **dict(
            zip(
                ["pad_token", "unk_token", "cls_token", "sep_token", "mask_token"],
                specials,
                strict=True,
            )
        ),
    )
    tokenizer.save_pretrained(base)
    config = transformers.BertConfig(
        vocab_size=wordpiece.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(CLASSES),
    )
    config.save_pretrained(base)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    # A random BERT gives every text nearly the same score (a gap of 1e-3 or less, which made a
    # threshold test flaky); standardize the head's logits over the texts used here instead, so
    # that different texts get clearly different scores.
    with torch.no_grad():
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        logits = model(**batch).logits
        scale = 2.0 / logits.std(dim=0)
        model.classifier.weight.mul_(scale[:, None])
        model.classifier.bias.copy_((model.classifier.bias - logits.mean(dim=0)) * scale)

    def checkpoint(name: str, model_type: str) -> Path:
        arch = {
            "model_type": model_type,
            "model_name": "BertForSequenceClassification",
            "tokenizer_name": "BertTokenizer",
            "num_classes": len(CLASSES),
        }
        path = root / name
        torch.save(
            {
                "config": {"arch": {"args": arch}, "dataset": {"args": {"classes": CLASSES}}},
                "state_dict": model.state_dict(),
            },
            path,
        )
        return path

    def expected(texts: list[str]) -> dict[str, list[float]]:
        with torch.no_grad():
            batch = tokenizer(texts, return_tensors="pt", truncation=True, padding=True)
            probs = torch.sigmoid(model(**batch).logits)
        return {label: probs[:, i].tolist() for i, label in enumerate(LABELS)}

    return {
        "local": checkpoint("tiny-local.ckpt", str(base)),
        "hub": checkpoint("tiny-hub.ckpt", "bert-base-uncased"),
        "base": base,
        "expected": expected,
    }


def test_detoxify_checkpoint_scores_real_text_offline(
    tiny_detoxify: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = ToxicityConfig(backend="detoxify", detoxify_checkpoint=str(tiny_detoxify["local"]))
    scorer = load_scorer(config)
    assert scorer.labels == LABELS  # from the checkpoint's classes, renamed as detoxify does
    texts = [PROFANE, CLEAN, "what a lovely day"]
    got = scorer.score(texts)
    want = tiny_detoxify["expected"](texts)
    for label in LABELS:
        assert len(got[label]) == len(texts)
        assert all(0.0 <= v <= 1.0 for v in got[label])
        # The checkpoint's weights, not a fresh initialization, produced these scores.
        assert got[label] == pytest.approx(want[label], abs=1e-5)
    assert scorer.score(["one text"])["insult"] == pytest.approx(
        tiny_detoxify["expected"](["one text"])["insult"], abs=1e-5
    )


def test_detoxify_thresholds_route_documents(tiny_detoxify: dict) -> None:
    texts = [PROFANE, CLEAN, "what a lovely day"]
    toxicity = tiny_detoxify["expected"](texts)["toxicity"]
    second, highest = sorted(toxicity)[1:]
    assert highest - second > 0.01, toxicity  # the tiny model separates these texts
    cut = (second + highest) / 2  # between the lowest two and the highest score
    config = ToxicityConfig(
        backend="detoxify",
        detoxify_checkpoint=str(tiny_detoxify["local"]),
        thresholds={"toxicity": round(cut, 6)},
        batch_size=2,
    )
    result = toxicity_documents(documents_table(texts), config)
    top = max(range(3), key=toxicity.__getitem__)
    assert result.rejected.column("id").to_pylist() == [f"d{top}"]
    assert result.rejected.column("reason").to_pylist() == ["toxic_toxicity"]
    assert result.kept.schema.names[-3:] == [f"toxicity_{label}" for label in LABELS]
    assert result.stats["removed_toxicity"] == 1
    # Thresholds naming a label the checkpoint lacks fail before any document is scored.
    bad = config.model_copy(update={"thresholds": {"profanity": 0.5, "threat": 0.5}})
    with pytest.raises(ToxicityLabelError, match=r"\['profanity', 'threat'\].*'insult'"):
        toxicity_documents(documents_table(texts), bad)


def test_detoxify_scores_are_stored_and_re_decided_with_their_labels(
    tiny_detoxify: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [PROFANE, CLEAN, "what a lovely day"]
    source_dir = source_dataset(tmp_path, texts)
    stage_dir = str(tmp_path / "toxicity")
    config = ToxicityConfig(backend="detoxify", detoxify_checkpoint=str(tiny_detoxify["local"]))
    records, _ = run_stage(source_dir, stage_dir, config)
    assert records[0].stats["scores_computed"] == 3
    # Labels, their order and the default thresholds (None) come from the stored score columns.
    moves = [{"insult": 0.0}, {"toxicity": 1.0}, None]
    configs = [config.model_copy(update={"thresholds": t}) for t in moves]
    wanted = [toxicity_documents(documents_table(texts), c).rejected for c in configs]
    monkeypatch.setattr(toxicity, "load_scorer", None)  # calling it would be a TypeError
    for moved, want in zip(configs, wanted, strict=True):
        records, manifest = run_stage(source_dir, stage_dir, moved)
        assert records[0].stats["scores_reused"] == 3
        names = [c["name"] for c in manifest["schema"]]
        assert names[-3:] == [f"toxicity_{label}" for label in LABELS]
        got = shards.read_shard(stage_dir, records[0].rejected[0]) if records[0].rejected else None
        for column in ("reason", "detail", "toxicity_insult"):
            expected = want.column(column).to_pylist()
            assert (got.column(column).to_pylist() if got else []) == expected
    assert wanted[0].num_rows == 3 and wanted[1].num_rows == 0  # the moves do move
    bad = config.model_copy(update={"thresholds": {"threat": 0.5}})
    with pytest.raises(ToxicityLabelError, match=r"\['threat'\]"):
        run_stage(source_dir, stage_dir, bad)


def test_detoxify_hub_id_checkpoint_uses_a_local_model_dir(tiny_detoxify: dict) -> None:
    with_dir = ToxicityConfig(
        backend="detoxify",
        detoxify_checkpoint=str(tiny_detoxify["hub"]),
        detoxify_model_dir=str(tiny_detoxify["base"]),
    )
    assert load_scorer(with_dir).score([CLEAN])["toxicity"] == pytest.approx(
        tiny_detoxify["expected"]([CLEAN])["toxicity"], abs=1e-5
    )
    # Without the folder, bert-base-uncased is not on this machine: a clear error, no download.
    without = with_dir.model_copy(update={"detoxify_model_dir": None})
    with pytest.raises(DetoxifyModelNotFound, match="detoxify_model_dir"):
        load_scorer(without)


def test_missing_detoxify_checkpoint_is_a_clear_error_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    expected_file = tmp_path / "torch" / "hub" / "checkpoints" / "toxic_original-c1212f89.ckpt"
    with pytest.raises(DetoxifyCheckpointNotFound) as error:
        toxicity_documents(documents_table([CLEAN]), ToxicityConfig(backend="detoxify"))
    message = str(error.value)
    assert str(expected_file) in message  # where it looked, and where to put it
    assert "https://github.com/unitaryai/detoxify/releases/download/" in message
    assert "toxicity.detoxify_checkpoint" in message
    assert isinstance(error.value, FileNotFoundError)

    configured = tmp_path / "nowhere.ckpt"
    config = ToxicityConfig(backend="detoxify", detoxify_checkpoint=str(configured))
    stage_dir = str(tmp_path / "toxicity")
    unit = WorkUnit(name="part-00000", key="k", source={})
    with pytest.raises(DetoxifyCheckpointNotFound, match=str(configured)):
        run_unit(stage_dir, unit, lambda _: toxicity_documents(documents_table([CLEAN]), config))
    assert not (tmp_path / "toxicity").exists()  # nothing written, no completion marker


def test_a_file_that_is_not_a_detoxify_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "other.ckpt"
    torch.save({"weights": torch.zeros(2)}, path)
    config = ToxicityConfig(backend="detoxify", detoxify_checkpoint=str(path))
    with pytest.raises(DetoxifyCheckpointInvalid, match="is not a detoxify checkpoint"):
        load_scorer(config)


class _Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.mark.parametrize("with_model_dir", [False, True])
def test_a_detoxify_checkpoint_with_a_pickle_payload_runs_nothing(
    tiny_detoxify: dict, tmp_path: Path, with_model_dir: bool
) -> None:
    """A valid checkpoint plus one smuggled object: refused before detoxify (whose own loader
    unpickles fully) or anything else opens it, naming the file."""
    import torch

    loaded = torch.load(tiny_detoxify["local"], weights_only=True)
    marker = tmp_path / "payload-ran"
    path = tmp_path / "crafted.ckpt"
    torch.save(loaded | {"extra": _Payload(marker)}, path)
    config = ToxicityConfig(
        backend="detoxify",
        detoxify_checkpoint=str(path),
        detoxify_model_dir=str(tiny_detoxify["base"]) if with_model_dir else None,
    )
    with pytest.raises(DetoxifyCheckpointInvalid) as error:
        load_scorer(config)
    assert not marker.exists()
    assert str(path) in str(error.value) and "refused" in str(error.value)
    assert "weights_only` set to `False`" not in str(error.value)  # torch's unsafe advice, cut


def test_a_detoxify_checkpoint_naming_a_non_model_class_is_refused(
    tiny_detoxify: dict, tmp_path: Path
) -> None:
    """detoxify looks the model and tokenizer classes up by name in transformers: only
    ``...ForSequenceClassification`` and ``...Tokenizer`` names are let through."""
    import torch

    loaded = torch.load(tiny_detoxify["local"], weights_only=True)
    loaded["config"]["arch"]["args"]["model_name"] = "pipeline"
    path = tmp_path / "odd.ckpt"
    torch.save(loaded, path)
    config = ToxicityConfig(backend="detoxify", detoxify_checkpoint=str(path))
    with pytest.raises(DetoxifyCheckpointInvalid, match=r"odd.ckpt.*model_name='pipeline'"):
        load_scorer(config)
