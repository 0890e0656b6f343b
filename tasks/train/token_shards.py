"""Token shards: the training data on disk, one flat array of token ids per file, memory-mapped.

The format is ours and small on purpose (llm.c and nanoGPT use the same idea: a header, then raw
ids), so any reader can check what it is about to map before trusting it::

    offset  size  field
         0     8  magic  b"LLMFTOKS"
         8     4  format version (uint32, little-endian), currently 1
        12     4  bytes per token: 2 (uint16, vocab below 65,536) or 4 (uint32)
        16     8  token count (uint64)
        24     8  reserved, zero
        32     …  the token ids, little-endian

Documents follow each other with ``<|eos|>`` between them; which shard holds which document is in
the tokenize stage's per-document index. Shards are written atomically, like every other file.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from llmflow.tasks.core import shards

MAGIC = b"LLMFTOKS"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQ")
HEADER_SIZE = HEADER.size  # 32
TOKEN_SHARD_SUFFIX = ".bin"


class TokenShardError(ValueError):
    """A file that is not a token shard this code can read; the message names it and why."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id of a vocabulary."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def encode_token_shard(tokens: np.ndarray, dtype: np.dtype) -> bytes:
    """Header plus ids as bytes; ids that do not fit ``dtype`` are an error, never wrapped."""
    dtype = np.dtype(dtype).newbyteorder("<")
    if dtype.itemsize not in (2, 4) or dtype.kind != "u":
        raise ValueError(f"token shards hold uint16 or uint32 ids, not {dtype}")
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or int(tokens.max()) > np.iinfo(dtype).max):
        raise ValueError(f"token ids out of range for {dtype}: {tokens.min()}..{tokens.max()}")
    header = HEADER.pack(MAGIC, FORMAT_VERSION, dtype.itemsize, tokens.size, 0)
    return header + tokens.astype(dtype, copy=False).tobytes()


def write_token_shard(path: str, tokens: np.ndarray, dtype: np.dtype) -> int:
    """Write one shard atomically (any fsspec path); returns its size in bytes."""
    data = encode_token_shard(tokens, dtype)
    shards.write_bytes_atomic(path, data)
    return len(data)


def read_header(path: str | Path) -> tuple[np.dtype, int]:
    """The shard's dtype and token count, after checking the header against the file's size."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as error:
        raise TokenShardError(f"token shard {path}: cannot read it ({error})") from error
    if len(raw) < HEADER_SIZE:
        raise TokenShardError(f"token shard {path}: {len(raw)} bytes, shorter than the header")
    magic, version, itemsize, count, _ = HEADER.unpack(raw)
    if magic != MAGIC:
        raise TokenShardError(f"token shard {path}: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise TokenShardError(
            f"token shard {path}: format version {version}, this code reads {FORMAT_VERSION}"
        )
    if itemsize not in (2, 4):
        raise TokenShardError(f"token shard {path}: {itemsize} bytes per token, expected 2 or 4")
    expected = HEADER_SIZE + itemsize * count
    actual = path.stat().st_size
    if actual != expected:
        raise TokenShardError(
            f"token shard {path}: {actual} bytes, header says {count} tokens ({expected} bytes);"
            " the file is truncated or was not written by llmflow"
        )
    return np.dtype("<u2" if itemsize == 2 else "<u4"), count


def open_token_shard(path: str | Path) -> np.ndarray:
    """The shard's ids as a read-only memory map (no copy; pages load as the loader reads)."""
    dtype, count = read_header(path)
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,))


class TokenStream:
    """Several shards read as one stream of ids: windows may cross from one shard to the next."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.shards = [open_token_shard(p) for p in self.paths]
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """``length`` ids from global position ``start``, as int64 (what embeddings index)."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens {start}..{start + length} outside a stream of {len(self)}")
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            offset = start + filled - int(self.starts[shard])
            take = min(length - filled, len(self.shards[shard]) - offset)
            out[filled : filled + take] = self.shards[shard][offset : offset + take]
            filled += take
            shard += 1
        return out
