"""toxicity: both backends for real (the profanity model in its wheel, a detoxify checkpoint built
here in detoxify's own format), the stage through its task on a real shard, and bad input."""

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
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    WorkUnit,
    documents_result,
    finalize_stage,
    plan_shard_units,
    run_unit,
    unit_key,
)
from llmflow.tasks.curate.toxicity import (
    STAGE,
    DetoxifyCheckpointInvalid,
    DetoxifyCheckpointNotFound,
    DetoxifyModelNotFound,
    ToxicityConfig,
    ToxicityLabelError,
    load_scorer,
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


def _table(texts: list[str]) -> pa.Table:
    rows = [
        {"id": f"d{i}", "text": t, "url": f"http://x/{i}", "source": "t", "fetched_at": WHEN}
        for i, t in enumerate(texts)
    ]
    return pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)


# --- profanity backend (the default) -------------------------------------------------------------


def test_profanity_removes_profane_text_and_keeps_clean_prose() -> None:
    result = toxicity_documents(_table([PROFANE, CLEAN]), ToxicityConfig())
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
    result = toxicity_documents(_table(texts), ToxicityConfig())
    assert result.kept.column("id").to_pylist() == ["d0"]
    assert result.rejected.column("id").to_pylist() == ["d1"]
    assert result.stats["chunks_scored"] >= 20  # scored in pieces...
    # ...because scored whole, the rant is diluted by the book around it and survives.
    whole = toxicity_documents(_table(texts), ToxicityConfig(chunk_chars=100_000))
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
    result = toxicity_documents(_table(texts), ToxicityConfig())
    assert time.perf_counter() - started < 10  # sampled: a 50 MB document costs 32 chunks
    assert result.kept.num_rows == len(texts) and result.rejected.num_rows == 0
    scores = result.kept.column("toxicity_profanity").to_pylist()
    assert scores[2] is None and scores[3] is None  # nothing to score: null, kept
    assert all(0.0 <= s <= 1.0 for s in scores if s is not None)
    assert result.stats["documents_empty"] == 2 and result.stats["documents_sampled"] == 2


def test_rescoring_replaces_the_earlier_score_column() -> None:
    first = toxicity_documents(_table([CLEAN]), ToxicityConfig()).kept
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
    result = toxicity_documents(_table([PROFANE]), ToxicityConfig(thresholds={}))
    assert result.kept.num_rows == 1 and result.kept.column("toxicity_profanity")[0].as_py() > 0.9


# --- the stage through its task, on real shards --------------------------------------------------

SOURCE = StageSpec(name="source", version="1")


def test_stage_runs_through_its_task_on_a_parquet_shard(tmp_path: Path) -> None:
    source_dir = str(tmp_path / "source")
    docs = [
        Document(url=f"http://x/{i}", text=t, source="t", fetched_at=WHEN)
        for i, t in enumerate(
            [CLEAN, PROFANE, "", "Bonjour à tous, la réunion est reportée à lundi."]
        )
    ]
    unit = WorkUnit(name="part-00000", key=unit_key(SOURCE, StageConfig(), "x"), source={})
    record = run_unit(source_dir, unit, lambda: documents_result(docs))
    finalize_stage(source_dir, SOURCE, StageConfig(), [record], None)

    config = ToxicityConfig()
    stage_dir = str(tmp_path / "toxicity")
    units, digest = plan_shard_units(STAGE, config, source_dir)
    records = [toxicity_shard.fn(u, config, stage_dir) for u in units]
    manifest = finalize_stage(stage_dir, STAGE, config, records, digest)
    assert manifest["counts"]["docs_in"] == 4
    assert manifest["counts"]["kept"] == 3
    assert manifest["counts"]["rejected_by_reason"] == {"toxic_profanity": 1}
    assert manifest["stats"]["removed_profanity"] == 1 and manifest["stats"]["documents_empty"] == 1
    names = [c["name"] for c in manifest["schema"]]
    assert names == ["id", "text", "url", "source", "fetched_at", "toxicity_profanity"]
    rejected = shards.read_shard(stage_dir, shards.manifest_shards(manifest, "rejected_shards")[0])
    assert rejected.column("text").to_pylist() == [PROFANE]
    # A second run with the same input and config skips the finished unit.
    assert all(toxicity_shard.fn(u, config, stage_dir).skipped for u in units)
    # batch_size is a runtime field: changing it keeps the unit keys.
    assert plan_shard_units(STAGE, ToxicityConfig(batch_size=7), source_dir)[0] == units


# --- detoxify backend, through detoxify's own API, offline ---------------------------------------

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
    result = toxicity_documents(_table(texts), config)
    top = max(range(3), key=toxicity.__getitem__)
    assert result.rejected.column("id").to_pylist() == [f"d{top}"]
    assert result.rejected.column("reason").to_pylist() == ["toxic_toxicity"]
    assert result.kept.schema.names[-3:] == [f"toxicity_{label}" for label in LABELS]
    assert result.stats["removed_toxicity"] == 1
    # Thresholds naming a label the checkpoint lacks fail before any document is scored.
    bad = config.model_copy(update={"thresholds": {"profanity": 0.5, "threat": 0.5}})
    with pytest.raises(ToxicityLabelError, match=r"\['profanity', 'threat'\].*'insult'"):
        toxicity_documents(_table(texts), bad)


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
        toxicity_documents(_table([CLEAN]), ToxicityConfig(backend="detoxify"))
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
        run_unit(stage_dir, unit, lambda: toxicity_documents(_table([CLEAN]), config))
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
