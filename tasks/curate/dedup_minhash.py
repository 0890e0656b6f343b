"""dedup step 1, signatures: what each document is compared by, computed per input shard.

Every document gets its exact-text hash, its MinHash (datasketch, word 5-gram shingles of
FineWeb-normalized text) and its LSH band keys. Shingling and hashing run on a whole shard at once
with Arrow's compute kernels and numpy, since per-shingle Python work is what makes MinHash slow
elsewhere. A shard's signatures are kept in ``<stage>/_signatures/<shard>.parquet`` and reused
while the shard and the settings (:meth:`~llmflow.tasks.curate.dedup.DedupConfig.signature_params`)
are the same. The resolve step (:mod:`~llmflow.tasks.curate.dedup_resolve`) and the persistent
index (:mod:`~llmflow.tasks.curate.dedup_index`) read these columns back.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasketch import MinHash

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import WorkUnit, cached_table, read_unit_input

if TYPE_CHECKING:
    # The config belongs to the stage (flows build it); this module only reads its fields.
    from llmflow.tasks.curate.dedup import DedupConfig

SIGNATURES_DIR = "_signatures"
# Bump when shingling, hashing or band keys change: signatures and index batches made by another
# version are not comparable and must not be mixed.
SIGNATURE_VERSION = "2"
_MINHASH_CHUNK = 8192  # shingles per datasketch update: bounds the (shingles x permutations) matrix
_SHINGLE_DOCS = 1000  # documents shingled at once: bounds the per-word arrays, not the shard

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
    minhash = MinHash(
        num_perm=config.num_perm,
        seed=config.seed,
        hashfunc=int,
        permutations=permutations.permutations,
        scheme="affine32",
    )
    exact = []
    # A slice of documents at a time: shingling holds several arrays per word of its input.
    for first in range(0, len(texts), _SHINGLE_DOCS):
        chunk = texts.slice(first, _SHINGLE_DOCS)
        exact.append(exact_keys(chunk))
        if config.near:
            hashes, offsets = shard_shingles(chunk, config.ngram_size)
        else:
            hashes, offsets = np.zeros(0, np.uint32), np.zeros(len(chunk) + 1, np.int64)
        for i in range(len(chunk)):
            minhash.clear()
            for start in range(offsets[i], offsets[i + 1], _MINHASH_CHUNK):
                minhash.update_batch(hashes[start : min(start + _MINHASH_CHUNK, offsets[i + 1])])
            signatures[first + i] = minhash.hashvalues
    columns: dict[str, pa.Array] = {
        "row": pa.array(np.arange(len(texts), dtype=np.int32)),
        "order": pa.array(np.array([order_key(i) for i in ids], dtype=np.uint64)),
        "exact": pa.concat_arrays(exact) if exact else exact_keys(texts),
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
