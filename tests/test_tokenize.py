"""tokenize: token shards per split, a document index, a split fixed by id, resumable."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from document_datasets import WHEN, write_texts
from pydantic import ValidationError

from llmflow.tasks.core.documents import Document
from llmflow.tasks.core.heldout_split import is_validation
from llmflow.tasks.train.bpe_tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
from llmflow.tasks.train.token_shards import (
    TokenShardError,
    TokenStream,
    open_token_shard,
    read_header,
    token_dtype,
    write_token_shard,
)
from llmflow.tasks.train.tokenize import (
    TokenizeConfig,
    plan_tokenize_units,
    token_shard_paths,
    tokenize,
    tokenize_shard,
)

CONFIG = TokenizeConfig(val_fraction=0.3, batch_size=7)
# Emoji, CJK and a literal "<|eos|>" that must stay text.
WORDS = ["a", "small", "corpus", "of", "plain", "words", "with", "emoji", "🙂", "中文", "<|eos|>"]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tokenize")
    corpus = str(root / "pii")
    docs = texts(120) + ["", "  \n\t "]
    write_texts(corpus, docs)
    tokenizer_dir = str(root / "tokenizer")
    train_tokenizer(corpus, tokenizer_dir, TokenizerConfig(vocab_size=400), CONFIG.val_fraction)
    stage = str(root / "tokenize")
    manifest = tokenize(corpus, tokenizer_dir, stage, CONFIG)
    return {
        "root": root,
        "corpus": corpus,
        "tok": tokenizer_dir,
        "stage": stage,
        "docs": docs,
        "manifest": manifest,
    }


def index(stage: str) -> list[dict]:
    rows = []
    for path in sorted(Path(stage).glob("part-*.parquet")):
        unit = path.name.removesuffix(".parquet")
        rows += [r | {"unit": unit} for r in pq.read_table(path).to_pylist()]
    return rows


def test_shards_have_header_dtype_and_counts(setup: dict) -> None:
    manifest = setup["manifest"]
    assert manifest["tokenizer"]["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == load_tokenizer(setup["tok"]).get_vocab_size()
    for split in ("train", "val"):
        paths = token_shard_paths(setup["stage"], split)
        assert [p.name for p in paths] == ["part-00000.bin", "part-00001.bin"]
        counts = [read_header(p)[1] for p in paths]
        assert all(read_header(p)[0] == np.dtype("<u2") for p in paths)
        assert counts == [e["tokens"] for e in manifest["token_shards"][split]]
        assert sum(counts) == manifest["tokens"][split] == manifest["stats"][f"tokens_{split}"]
    assert manifest["tokens"]["val"] > 0 and manifest["tokens"]["train"] > manifest["tokens"]["val"]


def test_documents_follow_each_other_with_eos_and_decode_back(setup: dict) -> None:
    tokenizer = load_tokenizer(setup["tok"])
    eos = tokenizer.token_to_id("<|eos|>")
    by_id = {
        Document(f"http://t/{i}", t, "test", WHEN).row()["id"]: t
        for i, t in enumerate(setup["docs"])
    }
    rows = index(setup["stage"])
    assert len(rows) == 120
    for row in rows:
        shard = open_token_shard(Path(setup["stage"]) / row["split"] / f"{row['unit']}.bin")
        tokens = shard[row["token_start"] : row["token_start"] + row["tokens"]]
        assert tokens[-1] == eos and eos not in tokens[:-1]  # literal "<|eos|>" stays text
        text = by_id[row["id"]]
        assert tokenizer.decode(tokens[:-1].tolist()) == text
        assert row["bytes"] == len(text.encode("utf-8"))
    for split in ("train", "val"):
        stream = TokenStream(token_shard_paths(setup["stage"], split))
        whole = stream.read(0, len(stream))
        assert int((whole == eos).sum()) == sum(r["split"] == split for r in rows)
        assert whole[-1] == eos


def test_split_is_fixed_by_id(setup: dict, tmp_path: Path) -> None:
    ids = [f"doc-{i}" for i in range(2000)]
    flags = is_validation(ids, 0.1)
    assert 150 <= sum(flags) <= 250
    grown = ids + [f"new-{i}" for i in range(3000)]
    random.Random(1).shuffle(grown)
    regrown = dict(zip(grown, is_validation(grown, 0.1), strict=True))
    assert all(regrown[i] == f for i, f in zip(ids, flags, strict=True))
    # Through the stage: a bigger corpus keeps every old document on its side.
    corpus = str(tmp_path / "pii")
    write_texts(corpus, setup["docs"] + texts(60, seed=5), shards=3)
    manifest = tokenize(corpus, setup["tok"], str(tmp_path / "tokenize"), CONFIG)
    before = {r["id"]: r["split"] for r in index(setup["stage"])}
    after = {r["id"]: r["split"] for r in index(str(tmp_path / "tokenize"))}
    assert len(after) == 180 and all(after[i] == s for i, s in before.items())
    assert manifest["stats"]["docs_val"] == sum(s == "val" for s in after.values())


def test_empty_text_is_rejected_with_its_columns(setup: dict) -> None:
    manifest = setup["manifest"]
    assert manifest["counts"]["rejected_by_reason"] == {"empty_text": 2}
    assert manifest["counts"]["docs_in"] == 122 and manifest["counts"]["kept"] == 120
    rejected = [
        r
        for p in sorted((Path(setup["stage"]) / "rejected").glob("*.parquet"))
        for r in pq.read_table(p).to_pylist()
    ]
    assert sorted(r["text"] for r in rejected) == ["", "  \n\t "]
    assert {r["reason"] for r in rejected} == {"empty_text"} and all(r["url"] for r in rejected)


def test_rerun_skips_and_rewrites_the_same_manifest(setup: dict) -> None:
    stage = setup["stage"]
    before = (Path(stage) / "manifest.json").read_bytes()
    units, digest = plan_tokenize_units(CONFIG, setup["corpus"], setup["tok"])
    records = [
        tokenize_shard.fn(u, CONFIG.model_copy(update={"batch_size": 1}), stage) for u in units
    ]
    assert all(r.skipped for r in records)
    tokenize(setup["corpus"], setup["tok"], stage, CONFIG)
    assert (Path(stage) / "manifest.json").read_bytes() == before
    # A different split or tokenizer changes every unit's key.
    other, _ = plan_tokenize_units(TokenizeConfig(val_fraction=0.2), setup["corpus"], setup["tok"])
    assert not {u.key for u in other} & {u.key for u in units}


def test_truncated_shard_is_named_and_re_encoded(setup: dict, tmp_path: Path) -> None:
    stage = str(tmp_path / "tokenize")
    first = tokenize(setup["corpus"], setup["tok"], stage, CONFIG)
    victim = token_shard_paths(stage, "train")[0]
    data = victim.read_bytes()
    victim.write_bytes(data[:-3])
    with pytest.raises(TokenShardError, match=str(victim)):
        read_header(victim)
    with pytest.raises(TokenShardError, match="part-00000.bin"):
        TokenStream(token_shard_paths(stage, "train"))
    # The next run notices and re-encodes that unit instead of trusting its marker.
    assert tokenize(setup["corpus"], setup["tok"], stage, CONFIG) == first
    assert victim.read_bytes() == data


def test_flipped_bit_in_a_token_shard_is_refused_then_re_encoded(
    setup: dict, tmp_path: Path
) -> None:
    """Same size, so the header check passes: only the recorded sha256 can tell."""
    stage = str(tmp_path / "tokenize")
    first = tokenize(setup["corpus"], setup["tok"], stage, CONFIG)
    victim = token_shard_paths(stage, "val")[0]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(TokenShardError, match=rf"{victim} is corrupt.*--stages tokenize"):
        token_shard_paths(stage, "val")
    assert tokenize(setup["corpus"], setup["tok"], stage, CONFIG) == first
    assert token_shard_paths(stage, "val")[0].read_bytes() != bytes(data)


def test_vanished_units_lose_their_shards(setup: dict, tmp_path: Path) -> None:
    stage = tmp_path / "tokenize"
    tokenize(setup["corpus"], setup["tok"], str(stage), CONFIG)
    smaller = str(tmp_path / "one-shard")
    write_texts(smaller, setup["docs"], shards=1)
    manifest = tokenize(smaller, setup["tok"], str(stage), CONFIG)
    assert sorted(p.name for p in (stage / "train").iterdir()) == ["part-00000.bin"]
    assert sorted(p.name for p in (stage / "val").iterdir()) == ["part-00000.bin"]
    assert manifest["tokens"] == setup["manifest"]["tokens"]
    on_disk = json.loads((stage / "manifest.json").read_text())
    assert on_disk == manifest


def test_uint32_shards_for_large_vocabularies(tmp_path: Path) -> None:
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")
    ids = np.array([0, 1, 65535, 65536, 100_000, 7], dtype=np.int64)
    path = tmp_path / "big.bin"
    write_token_shard(str(path), ids, token_dtype(100_001))
    assert read_header(path) == (np.dtype("<u4"), 6)
    assert open_token_shard(path).tolist() == ids.tolist()
    assert path.stat().st_size == 32 + 4 * 6
    with pytest.raises(ValueError, match="out of range"):
        write_token_shard(str(tmp_path / "small.bin"), ids, token_dtype(50_000))


def test_empty_split_is_a_valid_shard(setup: dict, tmp_path: Path) -> None:
    corpus = str(tmp_path / "pii")
    write_texts(corpus, ["just one document"], shards=1)
    manifest = tokenize(corpus, setup["tok"], str(tmp_path / "tokenize"), CONFIG)
    doc_id = Document("http://t/0", "just one document", "test").row()["id"]
    empty = "train" if is_validation([doc_id], CONFIG.val_fraction)[0] else "val"
    assert manifest["tokens"][empty] == 0 and sum(manifest["tokens"].values()) > 0
    assert read_header(token_shard_paths(str(tmp_path / "tokenize"), empty)[0])[1] == 0


def test_config_and_paths_errors(setup: dict) -> None:
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValidationError, match="val_fraction"):
            TokenizeConfig(val_fraction=bad)
    with pytest.raises(ValueError, match="split"):
        token_shard_paths(setup["stage"], "test")
    with pytest.raises(ValueError, match="local"):
        token_shard_paths("memory://somewhere/tokenize", "train")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        plan_tokenize_units(CONFIG, setup["corpus"], str(setup["root"] / "missing"))
    assert TokenizeConfig().output_hash() == TokenizeConfig(batch_size=5).output_hash()
