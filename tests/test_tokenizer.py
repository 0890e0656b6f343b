"""tokenizer: byte-level BPE learned from the training split only, lossless, loadable by HF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from document_datasets import write_texts
from pydantic import ValidationError
from tokenizers import Tokenizer

from llmflow.tasks.core.documents import Document
from llmflow.tasks.core.heldout_split import is_validation
from llmflow.tasks.train.bpe_tokenizer import (
    SPECIAL_TOKENS,
    TokenizerConfig,
    load_tokenizer,
    special_token_id,
    token_byte_lengths,
    tokenizer_train,
    train_tokenizer,
)

SMALL = TokenizerConfig(vocab_size=600, min_frequency=2)

WORDS = [
    *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven"),
    *("wizards", "quietly", "hex", "every", "jumbled", "pixel", "of", "morning", "light"),
    *("across", "the", "river", "and", "its", "old", "stone", "bridge"),
]

MESSY = [
    "Family: 👨‍👩‍👧‍👦 thumbs 👍🏽👍🏿 flag 🇯🇵 heart ❤️ keycap 1️⃣",
    "中文文本，日本語のテキスト、한국어 텍스트。",
    "Combining: e\u0301 a\u0308 n\u0303 Z\u0336\u0335 and precomposed é ä ñ",
    "RTL: שלום עולם and مرحبا بالعالم \u202bembedded\u202c \u200f",
    "controls \x01\x02\x1b[31mred\x1b[0m \x7f bell\x07 form\x0c feed",
    "windows\r\nline\r\nends\rold mac\n\ttabs\t\tand  double  spaces   ",
    "replacement \ufffd BOM \ufeff at start, zero width \u200b\u200c\u200d joiners",
    "mojibake: Ã©tÃ© â€™ â€œquotedâ€\x9d Ð¿Ñ€Ð¸Ð²ÐµÑ‚",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∀x∈ℝ: x² ≥ 0, private use \ue000, plane 16 \U0010fffd",
    " leading space, trailing newline\n",
    "",
    "<|eos|><|bos|> literal specials <|user|>hi<|end|>",
]


def prose(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=40)) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    root = tmp_path_factory.mktemp("tok")
    corpus = str(root / "pii")
    write_texts(corpus, prose(300) + MESSY)
    stage = str(root / "tokenizer")
    manifest, skipped = train_tokenizer(corpus, stage, SMALL, val_fraction=0.1)
    assert not skipped
    return stage, manifest


def test_special_tokens_have_ids_0_to_6(trained: tuple[str, dict]) -> None:
    stage, manifest = trained
    tokenizer = load_tokenizer(stage)
    assert [special_token_id(tokenizer, t) for t in SPECIAL_TOKENS] == list(range(7))
    assert manifest["special_tokens"] == {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    assert manifest["vocab_size"] == tokenizer.get_vocab_size() <= SMALL.vocab_size
    with pytest.raises(ValueError, match="<\\|nope\\|>"):
        special_token_id(tokenizer, "<|nope|>")


@pytest.mark.parametrize("text", MESSY)
def test_round_trip_is_lossless(trained: tuple[str, dict], text: str) -> None:
    tokenizer = load_tokenizer(trained[0])
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


def test_real_mojibake_round_trips(trained: tuple[str, dict], shared_data: Path) -> None:
    cases = json.loads((shared_data / "mojibake" / "in-the-wild.json").read_text("utf-8"))
    texts = [c[k] for c in cases for k in ("original", "fixed")]
    tokenizer = load_tokenizer(trained[0])
    for text, encoding in zip(texts, tokenizer.encode_batch(texts), strict=True):
        assert tokenizer.decode(encoding.ids) == text


def test_literal_special_token_text_is_plain_text(trained: tuple[str, dict]) -> None:
    tokenizer = load_tokenizer(trained[0])
    text = "end of page <|eos|> then <|assistant|>: hi"
    ids = tokenizer.encode(text).ids
    assert not set(ids) & set(range(len(SPECIAL_TOKENS)))
    assert tokenizer.decode(ids) == text
    # The saved file keeps the library default (chat templates spell the role tokens out), so
    # only the data tokenizer's setting keeps them out of documents.
    raw = Tokenizer.from_file(str(Path(trained[0]) / "tokenizer.json"))
    assert {1, 5} <= set(raw.encode(text).ids)


def test_transformers_loaders_set_bos_eos_pad(trained: tuple[str, dict]) -> None:
    transformers = pytest.importorskip("transformers")
    AutoTokenizer, PreTrainedTokenizerFast = (
        transformers.AutoTokenizer,
        transformers.PreTrainedTokenizerFast,
    )

    stage = trained[0]
    text = MESSY[0] + " " + MESSY[5]
    ours = load_tokenizer(stage).encode(text).ids
    for loaded in (
        PreTrainedTokenizerFast.from_pretrained(stage),
        AutoTokenizer.from_pretrained(stage),
    ):
        assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == SPECIAL_TOKENS[:3]
        assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (0, 1, 2)
        assert loaded.encode(text, add_special_tokens=False) == ours
        assert loaded.decode(ours) == text
        assert len(loaded) == load_tokenizer(stage).get_vocab_size()


def test_token_byte_lengths_count_utf8_bytes(trained: tuple[str, dict]) -> None:
    tokenizer = load_tokenizer(trained[0])
    lengths = token_byte_lengths(tokenizer)
    assert lengths.shape == (tokenizer.get_vocab_size(),)
    assert lengths[: len(SPECIAL_TOKENS)].tolist() == [0] * len(SPECIAL_TOKENS)
    assert (lengths[len(SPECIAL_TOKENS) :] >= 1).all()
    for text in MESSY:
        ids = tokenizer.encode(text).ids
        assert lengths[ids].sum() == len(text.encode("utf-8"))


def test_manifest_and_compression(trained: tuple[str, dict]) -> None:
    stage, manifest = trained
    assert manifest["compression_on"] == "validation" and manifest["heldout_docs"] > 0
    assert 1.0 < manifest["bytes_per_token"] < 20.0
    assert manifest["docs_used"] + manifest["heldout_docs"] == 300 + len(MESSY) - 1  # one empty
    on_disk = json.loads((Path(stage) / "manifest.json").read_text())
    assert on_disk == manifest and "key" in on_disk and on_disk["stage"] == "tokenizer"


def test_rerun_skips_and_changes_retrain(tmp_path: Path) -> None:
    corpus, stage = str(tmp_path / "pii"), str(tmp_path / "tok")
    write_texts(corpus, prose(80))
    first, skipped = train_tokenizer(corpus, stage, SMALL, 0.1)
    assert not skipped
    before = (tmp_path / "tok" / "manifest.json").read_bytes()
    again, skipped = tokenizer_train.fn(corpus, stage, SMALL, 0.1)
    assert skipped and again == first
    assert (tmp_path / "tok" / "manifest.json").read_bytes() == before
    # A new version of the documents with the same shards (a refresh that found nothing new):
    # its manifest differs, what training reads does not.
    manifest_path = tmp_path / "pii" / "manifest.json"
    manifest_path.write_text(json.dumps(json.loads(manifest_path.read_text()) | {"version": 2}))
    _, skipped = train_tokenizer(corpus, stage, SMALL, 0.1)
    assert skipped
    changed, skipped = train_tokenizer(
        corpus, stage, SMALL.model_copy(update={"vocab_size": 400}), 0.1
    )
    assert not skipped and changed["vocab_size"] <= 400 and changed["key"] != first["key"]
    _, skipped = train_tokenizer(corpus, stage, SMALL, 0.2)
    assert not skipped
    # A tokenizer.json changed by hand is not trusted.
    _, skipped = train_tokenizer(corpus, stage, SMALL, 0.2)
    assert skipped
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    _, skipped = train_tokenizer(corpus, stage, SMALL, 0.2)
    assert not skipped


def test_training_is_deterministic(tmp_path: Path) -> None:
    corpus = str(tmp_path / "pii")
    write_texts(corpus, prose(80) + MESSY)
    a, _ = train_tokenizer(corpus, str(tmp_path / "a"), SMALL, 0.1)
    b, _ = train_tokenizer(corpus, str(tmp_path / "b"), SMALL, 0.1)
    assert a["tokenizer_sha256"] == b["tokenizer_sha256"]


def test_validation_documents_are_not_learned(tmp_path: Path) -> None:
    texts = prose(60)
    # Documents that only the validation split holds: a made-up word, repeated.
    secret = " ".join(["zqxjvkw"] * 50)
    candidates = [Document(url=f"http://v/{i}", text=secret, source="t") for i in range(40)]
    ids = [d.row()["id"] for d in candidates]
    held = [d for d, v in zip(candidates, is_validation(ids, 0.5), strict=True) if v]
    assert len(held) >= 5
    corpus = str(tmp_path / "pii")
    write_texts(corpus, texts + held)
    config = TokenizerConfig(vocab_size=700, min_frequency=2)
    manifest, _ = train_tokenizer(corpus, str(tmp_path / "tok"), config, 0.5)
    vocab = load_tokenizer(str(tmp_path / "tok")).get_vocab()
    assert not any("zq" in token for token in vocab)
    assert manifest["compression_on"] == "validation"
    # Control: with no held-out split the same word is learned, so the check above can fail.
    train_tokenizer(corpus, str(tmp_path / "all"), config, 0.0)
    assert "Ġzqxjvkw" in load_tokenizer(str(tmp_path / "all")).get_vocab()


def test_without_heldout_compression_is_on_training(tmp_path: Path) -> None:
    corpus = str(tmp_path / "pii")
    write_texts(corpus, prose(40))
    manifest, _ = train_tokenizer(corpus, str(tmp_path / "tok"), SMALL, 0.0)
    assert manifest["compression_on"] == "training" and manifest["heldout_docs"] == 0
    assert manifest["bytes_per_token"] > 1.0


def test_character_caps(tmp_path: Path) -> None:
    corpus = str(tmp_path / "pii")
    write_texts(corpus, prose(50))
    capped = TokenizerConfig(vocab_size=300, doc_max_chars=100, max_chars=1_000)
    manifest, _ = train_tokenizer(corpus, str(tmp_path / "tok"), capped, 0.0)
    assert manifest["chars_used"] == 1_000 and manifest["docs_used"] == 10


def test_empty_dataset_is_a_clear_error(tmp_path: Path) -> None:
    corpus = str(tmp_path / "pii")
    write_texts(corpus, [], shards=1)
    with pytest.raises(ValueError, match=f"{corpus}.*empty"):
        train_tokenizer(corpus, str(tmp_path / "tok"), SMALL, 0.1)
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        train_tokenizer(str(tmp_path / "nothing-here"), str(tmp_path / "tok"), SMALL, 0.1)


def test_vocab_size_must_leave_room_for_merges() -> None:
    with pytest.raises(ValidationError, match="vocab_size 263"):
        TokenizerConfig(vocab_size=263)
    with pytest.raises(ValidationError, match="extra"):
        TokenizerConfig(vocab=4096)
    assert TokenizerConfig(vocab_size=264).vocab_size == 264
    assert all(f.description for f in TokenizerConfig.model_fields.values())
