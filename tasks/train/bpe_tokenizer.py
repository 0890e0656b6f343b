"""tokenizer: train a byte-level BPE tokenizer on the training documents of the cleaned corpus.

Byte-level BPE (GPT-2's scheme, with HF ``tokenizers``) starts from the 256 byte values, so every
string encodes and decodes back to itself: no unknown token, no normalizer that would quietly
rewrite text the model is meant to reproduce. Merges are learned from the training split only
(the split the tokenize stage fixes by document id); the held-out documents then measure how well
the tokenizer compresses text it never saw, the honest figure.

The stage directory holds ``tokenizer.json`` plus the two small files that let
``transformers.AutoTokenizer.from_pretrained(dir)`` load it with bos/eos/pad set, and a manifest.
Special tokens get ids 0..6 in :data:`SPECIAL_TOKENS` order; the chat-role tokens are reserved now
so that SFT later does not change the vocabulary the base model was trained with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, field_validator
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from llmflow.tasks.core import shards
from llmflow.tasks.core.graph import DOCUMENTS, StageContext, StepReport
from llmflow.tasks.core.heldout_split import is_validation
from llmflow.tasks.core.progress import StepProgress
from llmflow.tasks.core.shards import manifest_sha256
from llmflow.tasks.core.stage import StageConfig, StageSpec
from llmflow.tasks.core.steps import run_step, step_key
from llmflow.tasks.train.chat_format import chat_template_config

# Version 2: tokenizer_config.json carries the chat template.
STAGE = StageSpec("tokenizer", "2", ("tokenizers",))

SPECIAL_TOKENS = (
    "<|bos|>",
    "<|eos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
BOS, EOS, PAD = SPECIAL_TOKENS[:3]
BYTE_ALPHABET = frozenset(pre_tokenizers.ByteLevel.alphabet())
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
# What a Hugging Face loader reads: copied into every model export and logged to MLflow.
HF_TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)
_TRAIN_BATCH = 1000  # documents per list handed to the trainer (fewer Python -> Rust crossings)


class TokenizerConfig(StageConfig):
    """How big the vocabulary is and how much of the corpus it is learned from."""

    vocab_size: int = Field(
        1024,
        description=(
            "Tokens in the vocabulary, special tokens and the 256 bytes included. Small by"
            " default for the embedded default's ~150 KB corpus (a larger one leaves most merges"
            " seen once and the tiny model overfits them); real corpora want 32k-64k (GPT-2"
            " 50,257, nanochat 65,536): a larger vocabulary packs more text into each token of"
            " context but costs embedding parameters. Ids fit uint16 up to 65,536. The result"
            " can be smaller when the corpus has too few pairs above min_frequency."
        ),
    )
    min_frequency: int = Field(
        2,
        ge=1,
        description=(
            "A pair must occur at least this often to be merged: a pair seen once is noise (a"
            " typo, an id) and would waste a vocabulary slot."
        ),
    )
    max_chars: int = Field(
        2_000_000_000,
        ge=1,
        description=(
            "Characters of training text fed to the trainer, at most. BPE statistics settle"
            " after a few GB (nanochat trains on 2B chars); beyond that, training only costs"
            " time and memory."
        ),
    )
    doc_max_chars: int = Field(
        10_000,
        ge=1,
        description=(
            "Each document contributes at most its first N characters (nanochat: 10,000), so a"
            " few huge documents (a log dump, a book) cannot dominate the pair counts."
        ),
    )
    max_token_length: int | None = Field(
        None,
        ge=1,
        description=(
            "Longest token, in characters of its byte-level form, the trainer may create; None"
            " for no limit (GPT-2). A limit such as 16 keeps runs like '================' or"
            " boilerplate from taking vocabulary slots on a small or repetitive corpus."
        ),
    )
    eval_max_chars: int = Field(
        10_000_000,
        ge=1,
        description=(
            "Characters of held-out text on which compression (UTF-8 bytes per token) is"
            " measured. A few MB give a stable figure; the sample is kept in memory while"
            " training reads the corpus once."
        ),
    )

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset()

    @field_validator("vocab_size")
    @classmethod
    def _room_for_merges(cls, value: int) -> int:
        floor = 256 + len(SPECIAL_TOKENS)
        if value <= floor:
            raise ValueError(
                f"vocab_size {value} leaves no room for merges: it must exceed 256 bytes +"
                f" {len(SPECIAL_TOKENS)} special tokens = {floor} (real corpora want 32k-64k)"
            )
        if value > 2**32:
            raise ValueError(f"vocab_size {value} does not fit uint32 token ids")
        return value


def new_tokenizer() -> Tokenizer:
    """An untrained byte-level BPE with GPT-2's pre-tokenizer split and no normalizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    # Offsets only (token -> character span); ids and text are untouched.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def load_tokenizer(stage_dir: str) -> Tokenizer:
    """The tokenizer for data: literal special-token strings in text encode as plain text.

    A web page that contains "<|eos|>" must not end a document in the middle, nor let a crawled
    page inject chat-role tokens; only code that means to emit a special token (by its id) does.
    """
    path = shards.join(stage_dir, TOKENIZER_FILE)
    if not shards.exists(path):
        raise FileNotFoundError(f"no tokenizer at {stage_dir}: {TOKENIZER_FILE} is missing")
    tokenizer = Tokenizer.from_str(shards.read_bytes(path).decode("utf-8"))
    tokenizer.encode_special_tokens = True
    return tokenizer


def special_token_id(tokenizer: Tokenizer, token: str) -> int:
    """The id of a special token, or a clear error if this tokenizer lacks it."""
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise ValueError(f"special token {token!r} is not in this tokenizer's vocabulary")
    return token_id


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes each id stands for; 0 for special tokens, which stand for no text.

    Bits per byte (loss summed over tokens / bytes of text they cover) compares models with
    different tokenizers; the trainer needs each target's byte count for it (nanochat's
    token_bytes). A byte-level token is one alphabet character per byte, so its length is its
    byte count, even for tokens that are half a UTF-8 character (decoding those alone would give
    U+FFFD and the wrong length).
    """
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    special = {
        token_id
        for token_id, added in tokenizer.get_added_tokens_decoder().items()
        if added.special
    }
    lengths = np.zeros(size, dtype=np.int64)
    for token_id in range(size):
        if token_id in special:
            continue
        token = tokenizer.id_to_token(token_id)
        if token is None or not set(token) <= BYTE_ALPHABET:
            raise ValueError(f"token id {token_id} ({token!r}) is not a byte-level token")
        lengths[token_id] = len(token)
    return lengths


def _key(config: TokenizerConfig, val_fraction: float, input_dir: str) -> str:
    """The run's key over what training reads: the input's shards (their hashes, in order), not
    its manifest, so a new version of the documents with the same shards (a refresh that found
    nothing new) does not retrain."""
    shard_files = [s.sha256 for s in shards.manifest_shards(shards.read_manifest(input_dir))]
    return step_key(STAGE, config, {"val_fraction": val_fraction, "input_shards": shard_files})


_HF_FILES = (TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE)


class _Corpus:
    """One pass over the input's documents, shard by shard: training text and held-out samples.

    Validation documents are never yielded to the trainer; up to ``eval_max_chars`` of them (and
    of training documents, used only when there is no held-out text) are kept for measuring
    compression afterwards.
    """

    def __init__(self, input_dir: str, config: TokenizerConfig, val_fraction: float) -> None:
        self.input_dir = input_dir
        self.config = config
        self.val_fraction = val_fraction
        self.shards = shards.manifest_shards(shards.read_manifest(input_dir))
        self.total_docs = sum(s.rows for s in self.shards)
        self.docs_used = 0
        self.chars_used = 0
        self.heldout_docs = 0
        self.val_sample: list[str] = []
        self.train_sample: list[str] = []
        self._val_chars = 0
        self._train_chars = 0

    def _sample(self, text: str, validation: bool) -> None:
        cap = self.config.eval_max_chars
        if validation:
            room = cap - self._val_chars
            if room > 0:
                self.val_sample.append(text[:room])
                self._val_chars += min(room, len(text))
        else:
            room = cap - self._train_chars
            if room > 0:
                self.train_sample.append(text[:room])
                self._train_chars += min(room, len(text))

    def batches(self) -> Iterator[list[str]]:
        with StepProgress(
            "tokenizer-train", "tokenizer: documents read", self.total_docs
        ) as progress:
            for shard in self.shards:
                table = shards.read_shard(self.input_dir, shard, ["id", "text"])
                ids = table.column("id").to_pylist()
                texts = table.column("text").to_pylist()
                del table
                held_out = is_validation(ids, self.val_fraction)
                batch: list[str] = []
                for text, validation in zip(texts, held_out, strict=True):
                    if not text or not text.strip():
                        continue
                    self._sample(text, validation)
                    if validation:
                        self.heldout_docs += 1
                        continue
                    room = self.config.max_chars - self.chars_used
                    piece = text[: min(self.config.doc_max_chars, room)]
                    batch.append(piece)
                    self.docs_used += 1
                    self.chars_used += len(piece)
                    if len(batch) >= _TRAIN_BATCH:
                        yield batch
                        batch = []
                    if self.chars_used >= self.config.max_chars:
                        break
                if batch:
                    yield batch
                progress.advance(len(texts))
                if self.chars_used >= self.config.max_chars:
                    return


def bytes_per_token(tokenizer: Tokenizer, texts: list[str]) -> float:
    """UTF-8 bytes per token over some texts (the usual compression figure, eos not counted)."""
    if not texts:
        return 0.0
    tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    return nbytes / tokens if tokens else 0.0


def hf_files() -> dict[str, dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for transformers' loaders.

    bos/eos/pad are named so that generation and padding work; the chat-role tokens are listed as
    additional special tokens so that decoding with skip_special_tokens drops them. No bos is
    added automatically (the data path decides where bos goes) and spaces are never "cleaned up"
    on decode: decode must give back the exact text. The chat template is
    :mod:`llmflow.tasks.train.chat_format`'s.
    """
    extra = list(SPECIAL_TOKENS[3:])
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": extra,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        # SFT's chat layout, so that apply_chat_template gives the ids llmflow trains on
        **chat_template_config(),
    }
    return {
        TOKENIZER_CONFIG_FILE: config,
        SPECIAL_TOKENS_MAP_FILE: {**special, "additional_special_tokens": extra},
    }


def train_tokenizer(
    input_dir: str, stage_dir: str, config: TokenizerConfig, val_fraction: float
) -> tuple[dict[str, Any], bool]:
    """Train on the training split of ``input_dir`` into ``stage_dir``; returns (manifest, skipped).

    ``val_fraction`` is the tokenize stage's split: the same documents held out there are held
    out here. Skipped when the last run had the same key (code, config, split, input shards)
    and its files are intact (:func:`~llmflow.tasks.core.steps.run_step`).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    corpus = _Corpus(input_dir, config, val_fraction)  # raises clearly if there is no dataset
    key = _key(config, val_fraction, input_dir)
    return run_step(
        stage_dir, STAGE, key, lambda: _train(corpus, input_dir, stage_dir, config, val_fraction)
    )


def _train(
    corpus: _Corpus, input_dir: str, stage_dir: str, config: TokenizerConfig, val_fraction: float
) -> tuple[list[str], dict[str, Any]]:
    """Train and write the tokenizer's files; their names and the manifest's fields."""
    if corpus.total_docs == 0:
        raise ValueError(f"no documents to train a tokenizer on: {input_dir} is an empty dataset")

    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=config.max_token_length,
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus.batches(), trainer=trainer, length=corpus.total_docs)
    if corpus.docs_used == 0:
        raise ValueError(
            f"no training documents in {input_dir}: {corpus.total_docs} documents, all empty or"
            f" in the validation split (val_fraction={val_fraction})"
        )
    for expected, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected:
            raise RuntimeError(f"special token {token!r} got id {tokenizer.token_to_id(token)}")

    data = tokenizer.to_str().encode("utf-8")
    for name, content in hf_files().items():
        shards.write_json_atomic(shards.join(stage_dir, name), content)
    shards.write_bytes_atomic(shards.join(stage_dir, TOKENIZER_FILE), data)

    measured = load_tokenizer(stage_dir)
    on_validation = bool(corpus.val_sample)
    sample = corpus.val_sample if on_validation else corpus.train_sample
    fields = {
        "config": config.model_dump(mode="json"),
        "config_hash": config.output_hash(),
        "val_fraction": val_fraction,
        "input_manifest_sha256": manifest_sha256(input_dir),
        "vocab_size": measured.get_vocab_size(with_added_tokens=True),
        "special_tokens": {t: special_token_id(measured, t) for t in SPECIAL_TOKENS},
        "docs_used": corpus.docs_used,
        "chars_used": corpus.chars_used,
        "heldout_docs": corpus.heldout_docs,
        "bytes_per_token": round(bytes_per_token(measured, sample), 4),
        "compression_on": "validation" if on_validation else "training",
        "tokenizer_sha256": hashlib.sha256(data).hexdigest(),
    }
    return [TOKENIZER_FILE, *_HF_FILES], fields


@task(name="tokenizer-train", cache_policy=NO_CACHE, persist_result=False)
def tokenizer_train(
    input_dir: str, stage_dir: str, config: TokenizerConfig, val_fraction: float
) -> tuple[dict[str, Any], bool]:
    return train_tokenizer(input_dir, stage_dir, config, val_fraction)


def tokenizer_step(ctx: StageContext) -> StepReport:
    """The tokenizer stage: train on the documents' newest version, record it in MLflow.

    ``val_fraction`` is the tokenize stage's: both stages hold out the same documents.
    """
    config: TokenizerConfig = ctx.settings
    val_fraction = ctx.stage_config("tokenize").val_fraction
    params = config.model_dump(mode="json") | {"val_fraction": val_fraction}
    tags = {"llmflow.code_version": STAGE.code_version(), "llmflow.dataset": ctx.dir}
    with ctx.start_run(params, tags) as run:
        manifest, skipped = tokenizer_train(ctx.stage_dir(DOCUMENTS), ctx.dir, config, val_fraction)
        run.log(
            metrics={
                "vocab_size": manifest["vocab_size"],
                "bytes_per_token": manifest["bytes_per_token"],
                "docs_used": manifest["docs_used"],
                "chars_used": manifest["chars_used"],
                "heldout_docs": manifest["heldout_docs"],
                "units": 1,
                "units_skipped": int(skipped),
            },
            tags={"llmflow.compression_on": manifest["compression_on"]},
        )
        run.log_dict(manifest, "manifest.json")
        for file in HF_TOKENIZER_FILES:
            run.log_artifacts(shards.join(ctx.dir, file), "tokenizer")
    size = sum(len(shards.read_bytes(shards.join(ctx.dir, f))) for f in HF_TOKENIZER_FILES)
    return StepReport(
        run_id=run.run_id,
        skipped=skipped,
        table={
            "vocabulary": manifest["vocab_size"],
            "bytes per token": manifest["bytes_per_token"],
            "measured on": f"{manifest['compression_on']} documents",
            "documents trained on": manifest["docs_used"],
            "documents held out": manifest["heldout_docs"],
        },
        docs_in=manifest["docs_used"] + manifest["heldout_docs"],
        kept=manifest["docs_used"],
        bytes=size,
        summary=(
            f"vocab {manifest['vocab_size']}, {manifest['bytes_per_token']:.2f} bytes/token on"
            f" {manifest['compression_on']} documents"
        ),
    )
