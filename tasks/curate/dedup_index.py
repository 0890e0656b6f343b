"""The persistent dedup index: documents kept by earlier runs, shared across dataset versions.

The index (``<stage>/_index`` unless ``index_dir`` says otherwise, any fsspec path) holds the
signatures of the documents each run kept, one Parquet batch per input dataset version (named by
its manifest hash) plus ``index.json`` with the settings they were made with. A run deduplicates
against every batch but its own, then writes its own: re-running the same input is idempotent, a
new crawl is deduplicated against everything kept before, and a document kept earlier (same id)
stays kept. Batches made with other signature settings are refused, never mixed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from llmflow.tasks.core import shards

if TYPE_CHECKING:
    # The config belongs to the stage (flows build it); this module only reads its fields.
    from llmflow.tasks.curate.dedup import DedupConfig

INDEX_DIR = "_index"
INDEX_FORMAT = 1


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
