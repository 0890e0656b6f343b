"""tokenize: turn the cleaned documents into token shard_files, train and validation, split by id.

Each document shard of the input (the pii stage's output) becomes one unit: its documents are
encoded with the trained tokenizer, ``<|eos|>`` after each, and written as two token shards,
``train/<unit>.bin`` and ``val/<unit>.bin`` (format in :mod:`llmflow.tasks.train.token_shards`). The
unit's kept table is a per-document index (id, split, where its tokens start, how many, how many
bytes of text) so any token can be traced back to its document.

Which split a document is in depends only on its id (:mod:`~llmflow.tasks.core.heldout_split`): the
held-out set never leaks into training, and stays the same as the corpus grows. A unit is keyed
by its input shard's content AND the tokenizer's hash, so a new tokenizer re-encodes everything
while an unchanged one skips finished shards.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field
from tokenizers import Tokenizer

from llmflow.tasks.core import shards
from llmflow.tasks.core.heldout_split import is_validation
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    completed_record,
    marker_path,
    plan_shard_units,
    read_unit_input,
    run_unit,
    with_reason,
)
from llmflow.tasks.core.unit_output import ShardResult
from llmflow.tasks.train.bpe_tokenizer import EOS, TOKENIZER_FILE
from llmflow.tasks.train.token_shards import (
    TOKEN_SHARD_SUFFIX,
    TokenShardError,
    encode_token_shard,
    token_dtype,
)

STAGE = StageSpec("tokenize", "1", ("tokenizers",))
SPLITS = ("train", "val")
# The unit's token shards (path, tokens, bytes, sha256 per split), its dtype and tokenizer travel
# in the index shard's schema metadata: the index and the shards it describes cannot drift apart.
SHARDS_METADATA = b"llmflow.token_shards"
INDEX_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("token_start", pa.int64(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
    ]
)


class TokenizeConfig(StageConfig):
    """How documents are split into training and validation, and how many are encoded at once."""

    val_fraction: float = Field(
        0.1,
        gt=0.0,
        lt=1.0,
        description=(
            "Fraction of documents held out for validation, chosen by a hash of the document id"
            " (not by position), so the same document is always on the same side. The"
            " tokenizer stage receives the same value and learns its merges from the training"
            " side only."
        ),
    )
    batch_size: int = Field(
        1000,
        ge=1,
        description=(
            "Documents per encode_batch call: the Rust side encodes a batch on all cores. Only"
            " speed and memory depend on it, never the tokens."
        ),
    )

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"batch_size"})


def _tokenizer_bytes(tokenizer_dir: str) -> bytes:
    path = shards.join(tokenizer_dir, TOKENIZER_FILE)
    if not shards.exists(path):
        raise FileNotFoundError(
            f"no tokenizer at {tokenizer_dir}: {TOKENIZER_FILE} is missing (has the tokenizer"
            " stage run?)"
        )
    return shards.read_bytes(path)


def plan_tokenize_units(
    config: TokenizeConfig, input_dir: str, tokenizer_dir: str
) -> tuple[list[WorkUnit], str]:
    """One unit per input shard, keyed by the shard's content and the tokenizer's hash."""
    tokenizer_sha = hashlib.sha256(_tokenizer_bytes(tokenizer_dir)).hexdigest()
    return plan_shard_units(
        STAGE,
        config,
        input_dir,
        context=tokenizer_sha,
        source={"tokenizer_dir": tokenizer_dir, "tokenizer_sha256": tokenizer_sha},
    )


def _unit_tokenizer(unit: WorkUnit) -> Tokenizer:
    """The data tokenizer the unit was planned with; a tokenizer replaced since is an error."""
    data = _tokenizer_bytes(unit.source["tokenizer_dir"])
    sha = hashlib.sha256(data).hexdigest()
    if sha != unit.source["tokenizer_sha256"]:
        raise RuntimeError(
            f"tokenizer at {unit.source['tokenizer_dir']} changed after the tokenize stage was"
            f" planned (sha256 {sha}, planned {unit.source['tokenizer_sha256']}); plan again"
        )
    tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    # Literal "<|eos|>" in a document is text, not the end of the document.
    tokenizer.encode_special_tokens = True
    return tokenizer


def shard_path(split: str, unit_name: str) -> str:
    """A unit's token shard, relative to the stage directory."""
    return f"{split}/{unit_name}{TOKEN_SHARD_SUFFIX}"


def tokenize_documents(unit: WorkUnit, config: TokenizeConfig, stage_dir: str) -> ShardResult:
    """Encode one shard's documents into its train and val token shards and a document index.

    Both shards are always written (an empty split is a valid 0-token shard), before run_unit
    writes the index and the marker: a marker always means the shards are there.
    """
    tokenizer = _unit_tokenizer(unit)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = token_dtype(vocab_size)
    eos = tokenizer.token_to_id(EOS)
    if eos is None:
        raise ValueError(f"tokenizer at {unit.source['tokenizer_dir']} has no {EOS} token")
    table = read_unit_input(unit)
    ids = table.column("id").to_pylist()
    texts = [t or "" for t in table.column("text").to_pylist()]
    held_out = is_validation(ids, config.val_fraction)
    keep = [bool(t.strip()) for t in texts]
    kept_rows = [i for i, k in enumerate(keep) if k]

    pieces: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    position = dict.fromkeys(SPLITS, 0)
    index: dict[str, list[Any]] = {f.name: [] for f in INDEX_SCHEMA}
    stats: Counter[str] = Counter(
        {f"{k}_{s}": 0 for k in ("tokens", "docs", "bytes") for s in SPLITS}
    )
    eos_array = np.array([eos], dtype=dtype)
    for start in range(0, len(kept_rows), config.batch_size):
        rows = kept_rows[start : start + config.batch_size]
        encodings = tokenizer.encode_batch([texts[r] for r in rows], add_special_tokens=False)
        for row, encoding in zip(rows, encodings, strict=True):
            split = "val" if held_out[row] else "train"
            tokens = np.array(encoding.ids, dtype=dtype)
            pieces[split] += [tokens, eos_array]
            count = len(tokens) + 1
            nbytes = len(texts[row].encode("utf-8"))
            for name, value in zip(
                INDEX_SCHEMA.names, (ids[row], split, position[split], count, nbytes), strict=True
            ):
                index[name].append(value)
            position[split] += count
            stats[f"tokens_{split}"] += count
            stats[f"docs_{split}"] += 1
            stats[f"bytes_{split}"] += nbytes

    shard_files: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        tokens = np.concatenate(pieces[split]) if pieces[split] else np.zeros(0, dtype=dtype)
        data = encode_token_shard(tokens, dtype)
        path = shard_path(split, unit.name)
        shards.write_bytes_atomic(shards.join(stage_dir, path), data)
        shard_files[split] = {
            "path": path,
            "tokens": int(tokens.size),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    metadata = {
        "shards": shard_files,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "tokenizer_sha256": unit.source["tokenizer_sha256"],
    }
    kept = pa.Table.from_pydict(index, schema=INDEX_SCHEMA).replace_schema_metadata(
        {SHARDS_METADATA: json.dumps(metadata, sort_keys=True).encode()}
    )
    mask = pa.array(keep, pa.bool_())
    empty = table.filter(pc.invert(mask))
    details = [
        f"{len(t)} characters, none but whitespace"
        for t, k in zip(texts, keep, strict=True)
        if not k
    ]
    return ShardResult(
        kept=kept,
        rejected=with_reason(empty, ["empty_text"] * empty.num_rows, details),
        docs_in=table.num_rows,
        stats=stats,
    )


def unit_shards(stage_dir: str, record: UnitRecord) -> dict[str, Any]:
    """What a finished unit wrote: its token shard_files, dtype and tokenizer (from its index)."""
    (index,) = record.parts  # one index file per unit: tokenize sets no part limits
    fs, path = shards.filesystem(shards.join(stage_dir, index.path))
    with fs.open(path, "rb") as f:
        metadata = pq.read_schema(f).metadata or {}
    if SHARDS_METADATA not in metadata:
        raise RuntimeError(f"{index.path} in {stage_dir} is not a tokenize index")
    return json.loads(metadata[SHARDS_METADATA])


def _shards_intact(stage_dir: str, shard_files: dict[str, Any], check_hash: bool = True) -> bool:
    """Whether a unit's token shards hold exactly the bytes it wrote (size, then sha256).

    ``check_hash=False`` checks sizes only: for the manifest step, whose units were hashed by
    their skip check or written moments ago in the same run (one pass over the tokens, not two).
    """
    for split in SPLITS:
        shard = shard_files["shards"][split]
        path = shards.join(stage_dir, shard["path"])
        fs, local = shards.filesystem(path)
        if not fs.exists(local) or fs.size(local) != shard["bytes"]:
            return False
        if check_hash and shards.file_sha256(path) != shard["sha256"]:
            return False
    return True


def tokenize_unit(unit: WorkUnit, config: TokenizeConfig, stage_dir: str) -> UnitRecord:
    """run_unit, after dropping the marker of a unit whose token shards were lost or damaged.

    run_unit checks the Parquet outputs a marker names; the token shards are checked here, so a
    deleted, truncated or corrupted .bin is re-encoded instead of being trusted.
    """
    done = completed_record(stage_dir, unit)
    if done is not None and not _shards_intact(stage_dir, unit_shards(stage_dir, done)):
        shards.remove(marker_path(stage_dir, unit.name))
    return run_unit(stage_dir, unit, lambda _: tokenize_documents(unit, config, stage_dir))


@task(name="tokenize-shard", cache_policy=NO_CACHE, persist_result=False)
def tokenize_shard(unit: WorkUnit, config: TokenizeConfig, stage_dir: str) -> UnitRecord:
    return tokenize_unit(unit, config, stage_dir)


def finish(
    units: list[WorkUnit],
    config: TokenizeConfig,
    stage_dir: str,
    records: list[UnitRecord],
    input_digest: str | None,
) -> dict[str, Any]:
    """Write the manifest with the token shards of every unit; drop shards of vanished units.

    Nothing time-dependent goes in: a re-run that skipped every unit rewrites the same bytes.
    """
    manifest = finalize_stage(stage_dir, STAGE, config, records, input_digest)
    live = {r.name for r in records}
    for split in SPLITS:
        directory = shards.join(stage_dir, split)
        for name in shards.list_names(directory, TOKEN_SHARD_SUFFIX):
            if name.removesuffix(TOKEN_SHARD_SUFFIX) not in live:
                shards.remove(shards.join(directory, name))

    token_shards: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    tokenizers: set[tuple[str, int, str]] = set()
    for record in sorted(records, key=lambda r: r.name):
        unit = unit_shards(stage_dir, record)
        if not _shards_intact(stage_dir, unit, check_hash=False):
            raise RuntimeError(
                f"token shards of unit {record.name} in {stage_dir} are missing or cut short;"
                " run the tokenize stage again to re-encode it"
            )
        tokenizers.add((unit["tokenizer_sha256"], unit["vocab_size"], unit["dtype"]))
        for split in SPLITS:
            shard = unit["shards"][split]
            token_shards[split].append(
                {"path": shard["path"], "tokens": shard["tokens"], "sha256": shard["sha256"]}
            )
    if len(tokenizers) > 1:
        raise RuntimeError(f"units of {stage_dir} were encoded with different tokenizers")
    tokenizer = None
    if tokenizers:
        sha, vocab_size, dtype = tokenizers.pop()
        tokenizer = {"sha256": sha, "vocab_size": vocab_size, "dtype": dtype}
    manifest |= {
        "token_shards": token_shards,
        "tokenizer": tokenizer,
        "tokens": {s: sum(e["tokens"] for e in token_shards[s]) for s in SPLITS},
    }
    shards.write_json_atomic(shards.join(stage_dir, shards.MANIFEST_NAME), manifest)
    return manifest


Mapper = Callable[[Callable[[WorkUnit], Any], list[WorkUnit]], list[Any]]


def _serial_map(fn: Callable[[WorkUnit], Any], units: list[WorkUnit]) -> list[Any]:
    return [fn(u) for u in units]


def tokenize(
    input_dir: str,
    tokenizer_dir: str,
    stage_dir: str,
    config: TokenizeConfig,
    mapper: Mapper = _serial_map,
) -> dict[str, Any]:
    """The whole stage without Prefect (tests, benchmarks): plan, encode every unit, finish."""
    units, input_digest = plan_tokenize_units(config, input_dir, tokenizer_dir)
    records = mapper(lambda u: tokenize_unit(u, config, stage_dir), units)
    return finish(units, config, stage_dir, records, input_digest)


def token_shard_paths(stage_dir: str, split: str) -> list[Path]:
    """Local paths of a split's token shard_files, in manifest order, for the trainer to memory-map.

    Each is checked against the sha256 tokenize recorded before anything maps it: a flipped bit
    in a token file would otherwise train silently on a wrong token."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = shards.local_path(stage_dir, "the trainer memory-maps token shards")
    manifest = shards.read_manifest(stage_dir)
    if "token_shards" not in manifest:
        raise ValueError(f"{stage_dir} is not a tokenize stage output (no token_shards)")
    paths = []
    for entry in manifest["token_shards"][split]:
        path = root / entry["path"]
        digest = shards.file_sha256(str(path)) if path.exists() else "missing"
        if digest != entry["sha256"]:
            raise TokenShardError(
                f"token shard {path} is {'missing' if digest == 'missing' else 'corrupt'}:"
                f" its sha256 is not the {entry['sha256'][:16]}… the tokenize manifest recorded."
                " Run the tokenize stage again (llmflow run --stages tokenize): it re-encodes"
                " that unit"
            )
        paths.append(path)
    return paths
