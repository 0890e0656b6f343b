"""dedup: exact and MinHash near-duplicate removal across a dataset and against earlier runs.

Deduplication is the one data stage whose answer for a shard depends on every other shard, so it
runs in three steps, each resumable on its own:

1. **signatures** (per input shard, parallel): every document's exact-text hash, its MinHash
   (datasketch, word 5-gram shingles of FineWeb-normalized text) and its LSH band keys, kept in
   ``<stage>/_signatures/<shard>.parquet`` and reused while the shard and the settings are the same.
2. **resolve** (one process, memory bounded): candidate pairs are documents that share an exact
   hash or any band key — found by sorting one band column at a time, never by holding an LSH
   table of Python objects — then joined into clusters with union-find. Each cluster keeps one
   document, chosen by an order that depends only on the documents (documents already kept by an
   earlier run first, then the lowest hash of the id), so the same input gives the same kept ids
   whatever the shard order or worker count. Decisions go to ``<stage>/_decisions/<shard>.parquet``.
3. **apply** (per input shard, parallel, the usual :func:`~llmflow.tasks.core.stage.run_unit`): kept
   documents gain ``duplicates_removed``; removed ones go to the rejected set with
   ``duplicate_of`` (the kept id) and ``duplicate_similarity`` (MinHash estimate of Jaccard).

The **index** (``<stage>/_index`` unless ``index_dir`` says otherwise) holds the signatures of the
documents each run kept, one Parquet batch per input dataset version (named by its manifest hash)
plus ``index.json`` with the settings they were made with. A run deduplicates against every batch
but its own, then writes its own: re-running the same input is idempotent, a new crawl is
deduplicated against everything kept before, and a document kept earlier (same id) stays kept.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, model_validator

from llmflow.tasks.core import shards
from llmflow.tasks.core.progress import StepProgress
from llmflow.tasks.core.stage import (
    ShardResult,
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    cached_table,
    completed_record,
    finalize_stage,
    manifest_sha256,
    plan_shard_units,
    read_unit_input,
    run_unit,
    with_reason,
)

STAGE = StageSpec(name="dedup", version="1", libraries=("datasketch",))

SIGNATURES_DIR = "_signatures"
DECISIONS_DIR = "_decisions"
INDEX_DIR = "_index"
INDEX_FORMAT = 1
# Bump when shingling, hashing or band keys change: signatures and index batches made by another
# version are not comparable and must not be mixed.
SIGNATURE_VERSION = "2"
_MINHASH_CHUNK = 8192  # shingles per datasketch update: bounds the (shingles x permutations) matrix

RESOLVE_STATS = "_resolve.json"
REASON_EXACT = "exact_duplicate"
REASON_NEAR = "near_duplicate"

DEDUP_COLUMNS = [
    pa.field("duplicates_removed", pa.int32()),
    pa.field("duplicate_of", pa.string()),
    pa.field("duplicate_similarity", pa.float32()),
]


class DedupConfig(StageConfig):
    """Which duplicates are removed, and how near-duplicates are found."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"index_dir"})

    exact: bool = Field(
        True,
        description=(
            "Remove documents whose text equals another's after case folding and whitespace"
            " collapsing."
        ),
    )
    near: bool = Field(True, description="Remove near-duplicates found with MinHash LSH.")
    ngram_size: int = Field(
        5, ge=1, le=32, description="Words per shingle. 5: FineWeb's MinhashConfig(n_grams=5)."
    )
    bands: int = Field(
        14,
        ge=1,
        le=256,
        description=(
            "LSH bands (buckets). 14 x 8 is FineWeb's setting: pairs with Jaccard 0.75 are caught"
            " ~77% of the time, 0.8 ~92%, 0.6 ~20%."
        ),
    )
    rows_per_band: int = Field(
        8, ge=1, le=64, description="MinHash values per band. 8: FineWeb's hashes_per_bucket."
    )
    seed: int = Field(1, description="Seed of datasketch's MinHash permutations.")
    min_similarity: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description=(
            "Candidate pairs whose estimated Jaccard is below this are not merged. 0: every band"
            " collision is a duplicate, as in FineWeb; ~0.7 trades a little recall for precision."
        ),
    )
    incremental: bool = Field(
        True,
        description=(
            "Deduplicate against the documents earlier runs kept (the persistent index) and add"
            " this run's kept documents to it."
        ),
    )
    index_dir: str | None = Field(
        None,
        description="Where the persistent index lives (any fsspec path). Default: <stage>/_index.",
    )

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows_per_band

    @model_validator(mode="after")
    def _something_to_do(self) -> DedupConfig:
        if not (self.exact or self.near):
            raise ValueError("dedup: exact and near are both off; turn one on or skip the stage")
        return self

    def signature_params(self) -> dict[str, Any]:
        """What signatures depend on: index batches made with other values cannot be used."""
        return {
            "signature_version": SIGNATURE_VERSION,
            "ngram_size": self.ngram_size,
            "bands": self.bands,
            "rows_per_band": self.rows_per_band,
            "seed": self.seed,
            "scheme": "affine32",
            "hash": "crc32-words-polynomial-64to32",
            "simplify": "fineweb-re2",
        }


# --- step 1: signatures -------------------------------------------------------------------------

# RE2 (Arrow's regex engine) classes are ASCII unless spelled as Unicode properties.
_NUMBERS = r"\p{Nd}+(?:[.,]\p{Nd}+)?"
_NON_WORD = r"[^\p{L}\p{N}\p{M}\s]"
_MARKS = r"\p{Mn}"
_POLY = np.uint64(0x100000001B3)  # FNV-64 prime: mixes word hashes into one shingle hash
_FOLD = np.uint64(32)
_BAND_MIX = np.uint64(0x9E3779B97F4A7C15)


def simplified_words(texts: pa.Array) -> pa.ListArray:
    """FineWeb's text simplification before shingling (datatrove's ``simplify_text``), as words.

    Lower case, numbers to ``0``, punctuation and symbols to spaces, accents removed: copies that
    differ only in such details get the same shingles. Arrow's compute kernels do it for a whole
    shard at once, in C++.
    """
    texts = pc.utf8_lower(texts)
    texts = pc.replace_substring_regex(texts, _NUMBERS, "0")
    texts = pc.replace_substring_regex(texts, _NON_WORD, " ")
    texts = pc.replace_substring_regex(pc.utf8_normalize(texts, "NFD"), _MARKS, "")
    return pc.utf8_split_whitespace(pc.utf8_trim_whitespace(texts))


def simplify(text: str) -> str:
    """One text through :func:`simplified_words`, joined (for tests and inspection)."""
    return " ".join(simplified_words(pa.array([text], pa.string()))[0].as_py())


def shard_shingles(texts: pa.Array, ngram_size: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of each document's distinct word n-grams, flat, and its offsets into them.

    Each distinct word of the shard is hashed once (crc32) and an n-gram's hash is a polynomial of
    its words' hashes, computed for all n-grams of the shard at once with numpy: the per-shingle
    Python work of hashing joined strings is what makes MinHash slow elsewhere. A document shorter
    than n words is one shingle of all its words; a document without words has none.
    """
    words = simplified_words(texts)
    word_offsets = words.offsets.to_numpy().astype(np.int64)
    flat = pc.list_flatten(words)
    if len(flat) == 0:
        return np.zeros(0, np.uint32), np.zeros(len(texts) + 1, np.int64)
    encoded = pc.dictionary_encode(flat)
    vocabulary = encoded.dictionary.to_pylist()
    vocab_hashes = np.fromiter(
        (zlib.crc32(w.encode("utf-8", "surrogatepass")) for w in vocabulary),
        dtype=np.uint64,
        count=len(vocabulary),
    )
    word_hashes = vocab_hashes[encoded.indices.to_numpy()]
    lengths = np.diff(word_offsets)
    n_shingles = np.where(lengths >= ngram_size, lengths - ngram_size + 1, np.minimum(lengths, 1))
    shingle_offsets = np.concatenate([[0], np.cumsum(n_shingles)])
    # Start word of every shingle, and how many words it spans (n, or all of a short document).
    starts = np.repeat(word_offsets[:-1], n_shingles) + (
        np.arange(shingle_offsets[-1]) - np.repeat(shingle_offsets[:-1], n_shingles)
    )
    spans = np.repeat(np.minimum(lengths, ngram_size), n_shingles)
    acc = np.zeros(len(starts), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(ngram_size):
            take = spans > i
            acc[take] = acc[take] * _POLY + word_hashes[starts[take] + i]
    folded = (acc ^ (acc >> _FOLD)).astype(np.uint32)
    # Keep each document's distinct shingles only: one sort by (document, hash) for the shard.
    doc = np.repeat(np.arange(len(n_shingles)), n_shingles)
    order = np.lexsort((folded, doc))
    folded, doc = folded[order], doc[order]
    first = np.ones(len(folded), dtype=bool)
    first[1:] = (folded[1:] != folded[:-1]) | (doc[1:] != doc[:-1])
    folded, doc = folded[first], doc[first]
    distinct_offsets = np.searchsorted(doc, np.arange(len(n_shingles) + 1))
    return folded, distinct_offsets


def shingle_hashes(text: str, ngram_size: int) -> np.ndarray:
    """The distinct shingle hashes of one text (what its MinHash is made of)."""
    hashes, _ = shard_shingles(pa.array([text], pa.string()), ngram_size)
    return hashes


def exact_keys(texts: pa.Array) -> pa.Array:
    """16-byte hashes of the texts up to case and whitespace."""
    canonical = pc.utf8_trim_whitespace(
        pc.replace_substring_regex(pc.utf8_lower(texts), r"\s+", " ")
    )
    return pa.array(
        [hashlib.blake2b(t.encode(), digest_size=16).digest() for t in canonical.to_pylist()],
        pa.binary(16),
    )


def order_key(doc_id: str) -> int:
    """The document's place in the keep order: a hash of its id, so the order does not depend on
    which shard or worker the document came from."""
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) uint64 keys: documents share a key iff their band's rows are equal
    (up to 64-bit collisions)."""
    n = signatures.shape[0]
    values = signatures[:, : bands * rows].reshape(n, bands, rows).astype(np.uint64)
    keys = np.zeros((n, bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            keys = (keys ^ values[:, :, r]) * _BAND_MIX
            keys ^= keys >> np.uint64(29)
    return keys


def band_column(band: int) -> str:
    return f"band_{band:03d}"


def signature_table(table: pa.Table, config: DedupConfig) -> pa.Table:
    """Step 1 for one shard: row, order key, exact key, band keys and MinHash of each document."""
    texts = table.column("text").combine_chunks()
    ids = table.column("id").to_pylist()
    permutations = MinHash(num_perm=config.num_perm, seed=config.seed, scheme="affine32")
    signatures = np.empty((len(texts), config.num_perm), dtype=np.uint32)
    if config.near:
        hashes, offsets = shard_shingles(texts, config.ngram_size)
    else:
        hashes, offsets = np.zeros(0, np.uint32), np.zeros(len(texts) + 1, np.int64)
    minhash = MinHash(
        num_perm=config.num_perm,
        seed=config.seed,
        hashfunc=int,
        permutations=permutations.permutations,
        scheme="affine32",
    )
    for i in range(len(texts)):
        minhash.clear()
        for start in range(offsets[i], offsets[i + 1], _MINHASH_CHUNK):
            minhash.update_batch(hashes[start : min(start + _MINHASH_CHUNK, offsets[i + 1])])
        signatures[i] = minhash.hashvalues
    columns: dict[str, pa.Array] = {
        "row": pa.array(np.arange(len(texts), dtype=np.int32)),
        "order": pa.array(np.array([order_key(i) for i in ids], dtype=np.uint64)),
        "exact": exact_keys(texts),
    }
    keys = band_keys(signatures, config.bands, config.rows_per_band)
    for b in range(config.bands):
        columns[band_column(b)] = pa.array(keys[:, b])
    flat = pa.array(signatures.reshape(-1))
    columns["minhash"] = pa.FixedSizeListArray.from_arrays(flat, config.num_perm)
    return pa.table(columns)


def signature_key(unit: WorkUnit, config: DedupConfig) -> str:
    material = json.dumps(
        {"input": unit.source["shard"]["sha256"], "params": config.signature_params()},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


def signatures_path(stage_dir: str, unit_name: str) -> str:
    return shards.join(stage_dir, SIGNATURES_DIR, f"{unit_name}.parquet")


def compute_signatures(unit: WorkUnit, config: DedupConfig, stage_dir: str) -> bool:
    """Step 1 for one unit; returns whether cached signatures were reused."""
    _, reused = cached_table(
        signatures_path(stage_dir, unit.name),
        signature_key(unit, config),
        lambda: signature_table(read_unit_input(unit), config),
    )
    return reused


# --- the persistent index -----------------------------------------------------------------------


class DedupIndexError(ValueError):
    """The persistent index cannot be used with this config; the message says what to do."""


@dataclass(frozen=True)
class DedupIndex:
    """The documents earlier runs kept, as signature batches on any fsspec path."""

    directory: str

    @property
    def meta_path(self) -> str:
        return shards.join(self.directory, "index.json")

    def read_meta(self) -> dict[str, Any]:
        if not shards.exists(self.meta_path):
            return {"format": INDEX_FORMAT, "params": None, "batches": {}}
        meta = shards.read_json(self.meta_path)
        if meta.get("format") != INDEX_FORMAT:
            raise DedupIndexError(
                f"dedup index {self.directory}: format {meta.get('format')!r} is not"
                f" {INDEX_FORMAT}; move it away or set dedup.index_dir to a new folder"
            )
        return meta

    def check_params(self, config: DedupConfig) -> dict[str, Any]:
        meta = self.read_meta()
        if meta["params"] is not None and meta["params"] != config.signature_params():
            raise DedupIndexError(
                f"dedup index {self.directory} was built with {meta['params']}, but this run"
                f" uses {config.signature_params()}: signatures made with different settings"
                " cannot be compared. Use the old settings, set dedup.index_dir to a new folder,"
                " or set dedup.incremental=false."
            )
        return meta

    def batches_except(self, config: DedupConfig, own: str) -> dict[str, dict[str, Any]]:
        """Batches a run with input ``own`` deduplicates against: all but its own."""
        meta = self.check_params(config)
        return {k: v for k, v in sorted(meta["batches"].items()) if k != own}

    def read_batch(self, name: str, columns: list[str] | None = None) -> pa.Table:
        entry = self.read_meta()["batches"][name]
        return shards.read_shard(self.directory, shards.ShardFile.from_dict(entry["file"]), columns)

    def write_batch(self, config: DedupConfig, name: str, table: pa.Table) -> None:
        meta = self.check_params(config)
        shard = shards.write_shard(self.directory, f"batches/{name}.parquet", table)
        meta["params"] = config.signature_params()
        meta["batches"][name] = {"rows": table.num_rows, "file": shard.to_dict()}
        meta["batches"] = dict(sorted(meta["batches"].items()))
        shards.write_json_atomic(self.meta_path, meta)


def index_for(config: DedupConfig, stage_dir: str) -> DedupIndex:
    return DedupIndex(config.index_dir or shards.join(stage_dir, INDEX_DIR))


def batch_name(input_digest: str) -> str:
    return f"input-{input_digest[:24]}"


# --- planning -----------------------------------------------------------------------------------


def plan_dedup_units(
    config: DedupConfig, input_dir: str, stage_dir: str, withdrawn: str | None = None
) -> tuple[list[WorkUnit], str]:
    """One apply-unit per input shard, keyed by the shard AND everything it is compared with.

    A shard's outcome depends on the whole input dataset and on the index batches it is checked
    against, so both go into every unit's key: any change redoes the (cheap) resolve and apply
    steps, while unchanged shards keep their signatures. ``withdrawn`` is a Parquet file of
    document ids that have left the dataset (a refresh's changed and gone pages): the index's
    copies of them are no longer "already kept", so a page's new text is never removed as a
    duplicate of its own old text.
    """
    input_digest = manifest_sha256(input_dir)
    against: dict[str, Any] = {}
    if config.incremental:
        batches = index_for(config, stage_dir).batches_except(config, batch_name(input_digest))
        against = {k: v["file"]["sha256"] for k, v in batches.items()}
    if withdrawn is not None and shards.exists(withdrawn):
        against["withdrawn"] = hashlib.sha256(shards.read_bytes(withdrawn)).hexdigest()
    else:
        withdrawn = None
    context = hashlib.sha256(
        json.dumps({"input": input_digest, "index": against}, sort_keys=True).encode()
    ).hexdigest()
    source = {"context": context, "input_digest": input_digest, "withdrawn": withdrawn}
    return plan_shard_units(STAGE, config, input_dir, context=context, source=source)


# --- step 2: resolve ----------------------------------------------------------------------------


class _UnionFind:
    """Union-find over node numbers whose root is always the cluster's highest-priority node."""

    def __init__(self, rank: np.ndarray) -> None:
        self.parent = np.arange(len(rank), dtype=np.int64)
        self.rank = rank

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.rank[ra] < self.rank[rb]:
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb


def _adjacent_equal_pairs(keys: np.ndarray) -> np.ndarray:
    """(k, 2) node pairs that share a key: each node paired with the next one of its key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    return np.stack([order[same], order[same + 1]], axis=1)


def _estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values, row by row (what datasketch's ``MinHash.jaccard`` returns)."""
    return (a == b).mean(axis=1)


def resolve_duplicates(
    units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str, signatures_reused: int = 0
) -> Counter[str]:
    """Step 2: cluster every document of the run (and the index it is checked against) and write
    each shard's decisions. Memory: a few numpy arrays of one entry per document, one band at a
    time; signatures are read back only for documents that are in a candidate pair."""
    stats: Counter[str] = Counter({"signature_shards_reused": signatures_reused})
    context = units[0].source["context"] if units else ""
    sig_paths = [signatures_path(stage_dir, u.name) for u in units]
    tables = [shards.read_parquet(p, ["order", "exact"]) for p in sig_paths]
    sizes = [t.num_rows for t in tables]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_run = int(offsets[-1])

    index = index_for(config, stage_dir)
    batches: dict[str, dict[str, Any]] = {}
    if config.incremental and units:
        batches = index.batches_except(config, batch_name(units[0].source["input_digest"]))
    index_tables = [index.read_batch(b, ["order", "exact"]) for b in batches]
    index_sizes = [t.num_rows for t in index_tables]

    order = _concat_np([t.column("order") for t in tables + index_tables], np.uint64)
    n_nodes = len(order)
    is_index = np.zeros(n_nodes, dtype=bool)
    is_index[n_run:] = True
    gone = _withdrawn_nodes(units, index, list(batches), n_run, n_nodes)
    stats["index_documents_withdrawn"] = int(gone.sum())
    # Documents kept by an earlier run come first (they are already in the corpus), then the
    # lowest order key; node number breaks ties between copies of the same id.
    previously_kept = is_index & ~gone
    if n_nodes > n_run:
        previously_kept[:n_run] = np.isin(order[:n_run], order[n_run:][~gone[n_run:]])
    rank = np.empty(n_nodes, dtype=np.int64)
    rank[np.lexsort((np.arange(n_nodes), order, ~previously_kept))] = np.arange(n_nodes)
    stats["index_documents"] = n_nodes - n_run

    pairs: list[np.ndarray] = []
    if config.exact:
        exact = _concat_exact([t.column("exact") for t in tables + index_tables])
        pairs.append(_adjacent_equal_pairs(exact))
        del exact
    del tables, index_tables
    if config.near:
        with StepProgress("dedup-bands", "dedup: LSH bands", config.bands) as progress:
            for b in range(config.bands):
                column = band_column(b)
                keys = _concat_np(
                    [shards.read_parquet(p, [column]).column(0) for p in sig_paths]
                    + [index.read_batch(name, [column]).column(0) for name in batches],
                    np.uint64,
                )
                pairs.append(_adjacent_equal_pairs(keys))
                progress.advance()
    candidates = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    candidates = np.sort(candidates, axis=1)
    candidates = candidates[~(is_index[candidates[:, 0]] & is_index[candidates[:, 1]])]
    candidates = candidates[~(gone[candidates[:, 0]] | gone[candidates[:, 1]])]
    candidates = np.unique(candidates, axis=0)
    stats["candidate_pairs"] = len(candidates)

    involved = np.unique(candidates)
    store = _NodeStore(offsets, sig_paths, units, index, list(batches), index_sizes)
    minhash = np.array(store.values(involved, "minhash"), dtype=np.uint32)
    minhash = minhash.reshape(-1, config.num_perm)
    if config.min_similarity > 0 and len(candidates):
        similarity = _estimated_jaccard(
            minhash[np.searchsorted(involved, candidates[:, 0])],
            minhash[np.searchsorted(involved, candidates[:, 1])],
        )
        keep = similarity >= config.min_similarity
        stats["candidate_pairs_below_min_similarity"] = int((~keep).sum())
        candidates = candidates[keep]

    clusters = _UnionFind(rank)
    for a, b in candidates.tolist():
        clusters.union(a, b)
    roots = np.array([clusters.find(int(x)) for x in involved], dtype=np.int64)
    removed = (roots != involved) & (involved < n_run) & ~previously_kept[involved]
    dup_nodes, dup_roots = involved[removed], roots[removed]
    similarity = _estimated_jaccard(
        minhash[np.searchsorted(involved, dup_nodes)], minhash[np.searchsorted(involved, dup_roots)]
    )
    exact_dup = np.array(store.values(dup_nodes, "exact"), dtype=object) == np.array(
        store.values(dup_roots, "exact"), dtype=object
    )
    root_ids = store.values(dup_roots, "id")
    removed_count = np.bincount(dup_roots, minlength=n_nodes)
    stats["clusters"] = int(len(np.unique(dup_roots)))

    for u, unit in enumerate(units):
        lo, hi = offsets[u], offsets[u + 1]
        mine = (dup_nodes >= lo) & (dup_nodes < hi)
        rows = dup_nodes[mine] - lo
        reason: list[str | None] = [None] * (hi - lo)
        dup_of: list[str | None] = [None] * (hi - lo)
        sim: list[float | None] = [None] * (hi - lo)
        for row, is_exact, root_id, s in zip(
            rows.tolist(),
            exact_dup[mine].tolist(),
            _select(root_ids, mine),
            similarity[mine],
            strict=True,
        ):
            reason[row] = REASON_EXACT if is_exact else REASON_NEAR
            dup_of[row] = root_id
            sim[row] = round(float(s), 4)
        decisions = pa.table(
            {
                "reason": pa.array(reason, pa.string()),
                "duplicate_of": pa.array(dup_of, pa.string()),
                "duplicate_similarity": pa.array(sim, pa.float32()),
                "duplicates_removed": pa.array(removed_count[lo:hi].astype(np.int32)),
            }
        )
        decisions = decisions.replace_schema_metadata({b"llmflow.context": context.encode()})
        shards.write_shard(stage_dir, f"{DECISIONS_DIR}/{unit.name}.parquet", decisions)
    shards.write_json_atomic(
        shards.join(stage_dir, DECISIONS_DIR, RESOLVE_STATS),
        {"context": context, "stats": dict(sorted(stats.items()))},
    )
    return stats


def _withdrawn_nodes(
    units: Sequence[WorkUnit], index: DedupIndex, batches: list[str], n_run: int, n_nodes: int
) -> np.ndarray:
    """Which nodes are index documents that have since left the dataset (never a keeper)."""
    gone = np.zeros(n_nodes, dtype=bool)
    path = units[0].source.get("withdrawn") if units else None
    if path is None or not batches:
        return gone
    withdrawn_ids = shards.read_parquet(path, ["id"]).column("id")
    if len(withdrawn_ids):
        ids = pa.concat_arrays(
            [index.read_batch(b, ["id"]).column("id").combine_chunks() for b in batches]
        )
        member = pc.is_in(ids, value_set=withdrawn_ids.combine_chunks())
        gone[n_run:] = member.to_numpy(zero_copy_only=False)
    return gone


def resolve_stats(units: Sequence[WorkUnit], stage_dir: str) -> dict[str, int]:
    """The counts of the resolve step that made the current decisions (for the manifest)."""
    path = shards.join(stage_dir, DECISIONS_DIR, RESOLVE_STATS)
    if not units or not shards.exists(path):
        return {}
    saved = shards.read_json(path)
    if saved.get("context") != units[0].source["context"]:
        return {}
    return {f"resolve_{k}": v for k, v in saved["stats"].items()}


def _select(values: list[str], mask: np.ndarray) -> list[str]:
    return [v for v, m in zip(values, mask.tolist(), strict=True) if m]


def _concat_np(arrays: Iterable[pa.ChunkedArray | pa.Array], dtype: type) -> np.ndarray:
    parts: list[np.ndarray] = [np.asarray(a.to_numpy(), dtype=dtype) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _concat_exact(arrays: Iterable[pa.ChunkedArray]) -> np.ndarray:
    """16-byte exact keys as one numpy void array (sortable, comparable)."""
    parts = []
    for a in arrays:
        combined = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
        raw = np.frombuffer(combined.buffers()[1], dtype="V16", count=len(combined), offset=0)
        parts.append(raw[combined.offset : combined.offset + len(combined)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype="V16")


def _locate(nodes: np.ndarray, offsets: np.ndarray, index_sizes: list[int]) -> list[tuple]:
    """Node number → ("run", unit number, row) or ("index", batch number, row)."""
    n_run = int(offsets[-1])
    index_offsets = np.concatenate([[n_run], n_run + np.cumsum(index_sizes)]).astype(np.int64)
    out = []
    for node in nodes.tolist():
        if node < n_run:
            u = int(np.searchsorted(offsets, node, side="right") - 1)
            out.append(("run", u, node - int(offsets[u])))
        else:
            b = int(np.searchsorted(index_offsets, node, side="right") - 1)
            out.append(("index", b, node - int(index_offsets[b])))
    return out


def _gather(
    nodes: np.ndarray,
    offsets: np.ndarray,
    read_run: Callable[[int], pa.Table],
    read_index: Callable[[int], pa.Table],
    index_sizes: list[int],
    column: str,
) -> list[Any]:
    """Values of ``column`` for the given nodes, reading each file at most once."""
    located = _locate(nodes, offsets, index_sizes)
    wanted: dict[tuple[str, int], list[int]] = {}
    for kind, f, row in located:
        wanted.setdefault((kind, f), []).append(row)
    values: dict[tuple[str, int, int], Any] = {}
    for (kind, f), rows in wanted.items():
        table = read_run(f) if kind == "run" else read_index(f)
        taken = table.column(column).take(pa.array(rows)).to_pylist()
        values.update({(kind, f, r): v for r, v in zip(rows, taken, strict=True)})
    return [values[loc] for loc in located]


@dataclass(frozen=True)
class _NodeStore:
    """Where each node's rows live: the run's shards (signatures, input ids), then index batches."""

    offsets: np.ndarray
    sig_paths: list[str]
    units: Sequence[WorkUnit]
    index: DedupIndex
    batch_names: list[str]
    index_sizes: list[int]

    def values(self, nodes: np.ndarray, column: str) -> list[Any]:
        """``column`` ("id" or a signature column) of the given nodes, in their order."""

        def run(u: int) -> pa.Table:
            if column == "id":
                return read_unit_input(self.units[u], ["id"])
            return shards.read_parquet(self.sig_paths[u], [column])

        def indexed(b: int) -> pa.Table:
            return self.index.read_batch(self.batch_names[b], [column])

        return _gather(nodes, self.offsets, run, indexed, self.index_sizes, column)


# --- step 3: apply ------------------------------------------------------------------------------


def apply_decisions(table: pa.Table, decisions: pa.Table) -> ShardResult:
    """Split one shard by its decisions: kept rows and the rejected set, with the dedup columns."""
    if decisions.num_rows != table.num_rows:
        raise RuntimeError(
            f"dedup decisions have {decisions.num_rows} rows for a shard of {table.num_rows}"
        )
    for field in DEDUP_COLUMNS:
        table = table.append_column(field, decisions.column(field.name).cast(field.type))
    reasons = decisions.column("reason")
    removed = pc.is_valid(reasons)
    rejected_rows = table.filter(removed)
    removed_reasons = reasons.filter(removed).to_pylist()
    details = [
        f"duplicate of {of} (estimated Jaccard {sim:.2f})"
        for of, sim in zip(
            rejected_rows.column("duplicate_of").to_pylist(),
            rejected_rows.column("duplicate_similarity").to_pylist(),
            strict=True,
        )
    ]
    kept = table.filter(pc.invert(removed))
    with_duplicates = pc.sum(pc.greater(kept.column("duplicates_removed"), 0)).as_py() or 0
    return ShardResult(
        kept=kept,
        rejected=with_reason(rejected_rows, removed_reasons, details),
        docs_in=table.num_rows,
        stats=Counter({"kept_with_duplicates": int(with_duplicates)}),
    )


def read_decisions(unit: WorkUnit, stage_dir: str) -> pa.Table:
    table = shards.read_parquet(shards.join(stage_dir, DECISIONS_DIR, f"{unit.name}.parquet"), None)
    context = (table.schema.metadata or {}).get(b"llmflow.context", b"").decode()
    if context != unit.source["context"]:
        raise RuntimeError(
            f"dedup decisions for {unit.name} belong to another run; resolve must run first"
        )
    return table


def deduplicate_shard_plain(unit: WorkUnit, stage_dir: str) -> UnitRecord:
    return run_unit(
        stage_dir,
        unit,
        lambda: apply_decisions(read_unit_input(unit), read_decisions(unit, stage_dir)),
    )


@task(name="dedup-signatures", cache_policy=NO_CACHE, persist_result=False)
def signatures_shard(unit: WorkUnit, config: DedupConfig, stage_dir: str) -> bool:
    return compute_signatures(unit, config, stage_dir)


@task(name="dedup-resolve", cache_policy=NO_CACHE, persist_result=False)
def resolve_task(
    units: list[WorkUnit], config: DedupConfig, stage_dir: str, signatures_reused: int = 0
) -> dict[str, int]:
    return dict(resolve_duplicates(units, config, stage_dir, signatures_reused))


@task(name="dedup-shard", cache_policy=NO_CACHE, persist_result=False)
def dedup_shard(unit: WorkUnit, config: DedupConfig, stage_dir: str) -> UnitRecord:
    return deduplicate_shard_plain(unit, stage_dir)


# --- after the stage: grow the index ------------------------------------------------------------


def update_index(units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str) -> int:
    """Add this run's kept documents to the persistent index (as its input's batch)."""
    if not config.incremental or not units:
        return 0
    parts = []
    for unit in units:
        decisions = read_decisions(unit, stage_dir)
        kept = pc.invert(pc.is_valid(decisions.column("reason")))
        signatures = shards.read_parquet(signatures_path(stage_dir, unit.name), None)
        ids = read_unit_input(unit, ["id"]).column("id")
        rows = signatures.append_column("id", ids).filter(kept).drop_columns(["row"])
        parts.append(rows.replace_schema_metadata(None))
    batch = pa.concat_tables(parts)
    index_for(config, stage_dir).write_batch(
        config, batch_name(units[0].source["input_digest"]), batch
    )
    return batch.num_rows


# --- the whole stage without Prefect (tests, benchmarks) ----------------------------------------

Mapper = Callable[[Callable[[WorkUnit], Any], list[WorkUnit]], list[Any]]


def _serial_map(fn: Callable[[WorkUnit], Any], units: list[WorkUnit]) -> list[Any]:
    return [fn(u) for u in units]


def all_complete(units: list[WorkUnit], stage_dir: str) -> bool:
    """Whether every apply-unit already has its marker: then signatures and resolve are skipped."""
    return all(completed_record(stage_dir, u) is not None for u in units)


def prepare(
    units: list[WorkUnit], config: DedupConfig, stage_dir: str, mapper: Mapper = _serial_map
) -> Counter[str]:
    """Steps 1 and 2, unless every unit is already complete."""
    if all_complete(units, stage_dir):
        return Counter()
    reused = mapper(lambda u: compute_signatures(u, config, stage_dir), units)
    return resolve_duplicates(units, config, stage_dir, sum(bool(r) for r in reused))


def deduplicate(
    input_dir: str,
    stage_dir: str,
    config: DedupConfig,
    index_dir: str | None = None,
    mapper: Mapper = _serial_map,
) -> dict[str, Any]:
    """Run the whole stage on a dataset: the plain-Python path the pipeline's tasks also take."""
    if index_dir is not None:
        config = config.model_copy(update={"index_dir": index_dir})
    units, input_digest = plan_dedup_units(config, input_dir, stage_dir)
    prepare(units, config, stage_dir, mapper)
    records = mapper(lambda u: deduplicate_shard_plain(u, stage_dir), units)
    return finish(units, config, stage_dir, records, input_digest)


def finish(
    units: list[WorkUnit],
    config: DedupConfig,
    stage_dir: str,
    records: list[UnitRecord],
    input_digest: str | None,
) -> dict[str, Any]:
    """Write the manifest (with the resolve step's counts), drop leftovers, grow the index.

    ``input_digest`` is optional only in the one signature every stage's finish shares (crawl,
    a source, has none); dedup always reads a dataset, whose digest names the index batch.
    """
    if input_digest is None:
        raise ValueError(f"dedup in {stage_dir}: no input manifest digest to name its batch")
    manifest = finalize_stage(
        stage_dir, STAGE, config, records, input_digest, resolve_stats(units, stage_dir)
    )
    index = index_for(config, stage_dir)
    batch = batch_name(input_digest)
    if not (all(r.skipped for r in records) and batch in index.read_meta()["batches"]):
        update_index(units, config, stage_dir)
    return manifest
