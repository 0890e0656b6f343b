"""The persistent dedup index: documents kept by earlier runs, shared across dataset versions.

The index (``<stage>/_index`` unless ``index_dir`` says otherwise, any fsspec path) holds what
matching needs of the documents each run kept: id, order key, exact key, LSH band keys and
MinHash (the resolve step reports a duplicate's estimated Jaccard with the kept copy, which may be
an indexed document). It is one batch per input dataset version (named by its manifest hash),
each batch one Parquet file per input shard, listed in ``index.json`` with the settings they were
made with. A run deduplicates against every batch but its own, then **appends** its own: new
files in a new folder first, then ``index.json`` replaced atomically, so a half-written append is
never listed and the old files are never read to write the new ones. Re-running the same input
is idempotent, a new crawl is deduplicated against everything kept before, and a document kept
earlier (same id) stays kept. Batches made with other signature settings are refused, never
mixed.

Reading is :class:`IndexView`: one column at a time, a row group at a time, keeping only the rows
whose key a run has, so a refresh's memory is its own documents plus their matches, not the
index's size. Format 1 (one file per batch) is read as a batch of one file and rewritten as
format 2 on the next append.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from llmflow.tasks.core import shards

if TYPE_CHECKING:
    # The config belongs to the stage (flows build it); this module only reads its fields.
    from llmflow.tasks.curate.dedup import DedupConfig

INDEX_DIR = "_index"
INDEX_FORMAT = 2


class DedupIndexError(ValueError):
    """The persistent index cannot be used with this config; the message says what to do."""


def key_array(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A key column as numpy, sortable and comparable: uint64 (order and band keys) or 16-byte
    void (exact keys), without a Python object per row."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_fixed_size_binary(values.type):
        width = values.type.byte_width
        raw = np.frombuffer(values.buffers()[1], dtype=f"V{width}")
        return raw[values.offset : values.offset + len(values)]
    return np.asarray(values.to_numpy(), dtype=np.uint64)


def members(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Which ``values`` are in ``sorted_set`` (sorted, unique): a binary search, no hash table."""
    if not len(sorted_set) or not len(values):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_set, values), len(sorted_set) - 1)
    return sorted_set[at] == values


@dataclass(frozen=True)
class IndexView:
    """The index files one run is checked against, as one sequence of rows numbered from 0."""

    directory: str
    files: list[shards.ShardFile]
    starts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        rows = np.cumsum([0] + [f.rows for f in self.files]).astype(np.int64)
        object.__setattr__(self, "starts", rows)

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def verify(self) -> None:
        """Every file's bytes against index.json, streamed (before any column is trusted)."""
        for f in self.files:
            shards.verify_shard(self.directory, f)

    def scan(self, column: str) -> Iterator[tuple[int, pa.Array]]:
        """(first row number, values) of one column, file by file, one row group at a time
        (``write_shard`` writes groups of 10,000 rows)."""
        for f in range(len(self.files)):
            yield from self._scan_file(f, column)

    def _scan_file(
        self, f: int, column: str, wanted: np.ndarray | None = None
    ) -> Iterator[tuple[int, pa.Array]]:
        """One file's row groups of ``column``; only those holding a row of ``wanted`` (sorted
        row numbers) when given."""
        path = shards.join(self.directory, self.files[f].path)
        fs, p = shards.filesystem(path)
        start = int(self.starts[f])
        try:
            with fs.open(p, "rb") as handle:
                reader = pq.ParquetFile(handle)
                for group in range(reader.num_row_groups):
                    rows = reader.metadata.row_group(group).num_rows
                    if wanted is None or np.any((wanted >= start) & (wanted < start + rows)):
                        table = reader.read_row_group(group, columns=[column])
                        yield start, table.column(0).combine_chunks()
                    start += rows
        except (pa.ArrowException, OSError) as error:
            raise shards.CorruptShardError(
                f"dedup index file {path} cannot be read ({error}); move the index away or"
                " set dedup.index_dir to a new folder"
            ) from error

    def matching(self, column: str, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row numbers (ascending) and keys of the rows whose ``column`` is in ``sorted_keys``:
        one row group of the index in memory at a time, plus the matches."""
        rows, keys = [np.zeros(0, np.int64)], [sorted_keys[:0]]
        for start, values in self.scan(column):
            batch = key_array(values)
            hit = np.flatnonzero(members(batch, sorted_keys))
            rows.append(start + hit)
            keys.append(batch[hit])
        return np.concatenate(rows), np.concatenate(keys)

    def rows_in(self, column: str, value_set: pa.Array) -> np.ndarray:
        """Row numbers whose ``column`` (an id) is in ``value_set``."""
        found = [np.zeros(0, np.int64)]
        for start, values in self.scan(column):
            hit = pc.is_in(values, value_set=value_set).to_numpy(zero_copy_only=False)
            found.append(start + np.flatnonzero(hit))
        return np.concatenate(found)

    def take(self, rows: np.ndarray, column: str) -> pa.Array:
        """``column`` at the given row numbers (at least one), in their order, reading only the
        row groups that hold them, one at a time."""
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]
        parts = []
        for f in np.unique(np.searchsorted(self.starts, wanted, side="right") - 1).tolist():
            for start, values in self._scan_file(f, column, wanted):
                lo, hi = np.searchsorted(wanted, [start, start + len(values)])
                if hi > lo:
                    parts.append(values.take(pa.array(wanted[lo:hi] - start)))
        inverse = np.empty(len(order), dtype=np.int64)
        inverse[order] = np.arange(len(order))
        return pa.concat_arrays(parts).take(pa.array(inverse))


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
        if meta.get("format") == 1:
            # Format 1 wrote one file per batch, with the columns format 2 keeps (and "row").
            batches = {
                name: {"rows": b["rows"], "files": [b["file"]]}
                for name, b in meta["batches"].items()
            }
            return {"format": INDEX_FORMAT, "params": meta["params"], "batches": batches}
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

    def view(self, batches: dict[str, dict[str, Any]]) -> IndexView:
        """The given batches' files, in batch-name order, as one sequence of rows."""
        files = [shards.ShardFile.from_dict(f) for b in batches.values() for f in b["files"]]
        return IndexView(self.directory, files)

    def append(
        self, config: DedupConfig, name: str, folder: str, tables: Iterable[tuple[str, pa.Table]]
    ) -> int:
        """Write batch ``name`` as one file per (part, table), under ``batches/<name>/<folder>``,
        then list it in index.json (atomically replaced): readers see the old batch or the new
        one, never part of it. Files of the batch's previous listing are removed afterwards."""
        meta = self.check_params(config)
        files = [
            shards.write_shard(
                self.directory, f"batches/{name}/{folder}/{part}.parquet", t, keep_identical=True
            )
            for part, t in tables
        ]
        previous = meta["batches"].get(name, {"files": []})["files"]
        meta["format"] = INDEX_FORMAT
        meta["params"] = config.signature_params()
        meta["batches"][name] = {
            "rows": sum(f.rows for f in files),
            "files": [f.to_dict() for f in files],
        }
        meta["batches"] = dict(sorted(meta["batches"].items()))
        shards.write_json_atomic(self.meta_path, meta)
        listed = {f.path for f in files}
        for old in previous:
            if old["path"] not in listed:
                shards.remove(shards.join(self.directory, old["path"]))
        return sum(f.rows for f in files)


def index_for(config: DedupConfig, stage_dir: str) -> DedupIndex:
    return DedupIndex(config.index_dir or shards.join(stage_dir, INDEX_DIR))


def batch_name(input_digest: str) -> str:
    return f"input-{input_digest[:24]}"
