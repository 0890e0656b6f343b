"""dedup: exact and MinHash near-duplicate removal across a dataset and against earlier runs.

Deduplication is the one data stage whose answer for a shard depends on every other shard, so it
runs in three steps, each resumable on its own:

1. **signatures** (per input shard, parallel; :mod:`~llmflow.tasks.curate.dedup_minhash`): every
   document's exact-text hash, MinHash and LSH band keys, kept per shard and reused while the
   shard and the settings are the same.
2. **resolve** (one process, memory bounded; :mod:`~llmflow.tasks.curate.dedup_resolve`):
   candidate pairs joined into clusters, one document kept per cluster by an order that depends
   only on the documents; decisions written per shard.
3. **apply** (per input shard, parallel, the usual :func:`~llmflow.tasks.core.stage.run_unit`;
   here): kept documents gain ``duplicates_removed``; removed ones go to the rejected set with
   ``duplicate_of`` (the kept id) and ``duplicate_similarity`` (MinHash estimate of Jaccard).

After the manifest, :func:`finish` adds this run's kept documents to the persistent index
(:mod:`~llmflow.tasks.curate.dedup_index`), which later runs deduplicate against. This module is
the stage itself: its config, the plan, the Prefect tasks the pipeline maps, and the plain-Python
path (:func:`deduplicate`) that tests and benchmarks take.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, model_validator

from llmflow.tasks.core import shards
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.shards import manifest_sha256
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    completed_record,
    plan_shard_units,
    read_unit_input,
    run_unit,
    with_reason,
)
from llmflow.tasks.core.unit_output import ShardResult
from llmflow.tasks.curate.dedup_index import batch_name, index_for
from llmflow.tasks.curate.dedup_minhash import (
    SIGNATURE_VERSION,
    band_column,
    compute_signatures,
    signatures_path,
)
from llmflow.tasks.curate.dedup_resolve import read_decisions, resolve_duplicates, resolve_stats

STAGE = StageSpec(name="dedup", version="1", libraries=("datasketch",))
# Rows of a shard per index file: an index update holds one such slice (~7 MB of signatures).
INDEX_PART_ROWS = 10_000

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
        against = {k: [f["sha256"] for f in v["files"]] for k, v in batches.items()}
    if withdrawn is not None and shards.exists(withdrawn):
        against["withdrawn"] = hashlib.sha256(shards.read_bytes(withdrawn)).hexdigest()
    else:
        withdrawn = None
    context = hashlib.sha256(
        json.dumps({"input": input_digest, "index": against}, sort_keys=True).encode()
    ).hexdigest()
    source = {"context": context, "input_digest": input_digest, "withdrawn": withdrawn}
    return plan_shard_units(STAGE, config, input_dir, context=context, source=source)


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


def deduplicate_shard_plain(unit: WorkUnit, config: DedupConfig, stage_dir: str) -> UnitRecord:
    return run_unit(
        stage_dir,
        unit,
        lambda _: apply_decisions(read_unit_input(unit), read_decisions(unit, config, stage_dir)),
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
    return deduplicate_shard_plain(unit, config, stage_dir)


# --- after the stage: grow the index ------------------------------------------------------------


def update_index(units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str) -> int:
    """Append this run's kept documents to the persistent index (as its input's batch).

    Index files of at most ``INDEX_PART_ROWS`` of a shard's rows, each built from that slice of
    the shard's signatures, decisions and ids alone: memory is a slice's, whatever the shard's,
    the run's or the index's size. Returns the rows appended.
    """
    if not config.incremental or not units:
        return 0
    columns = ["order", "exact", *(band_column(b) for b in range(config.bands)), "minhash"]

    def kept_rows(unit: WorkUnit) -> Iterator[tuple[str, pa.Table]]:
        kept = pc.invert(pc.is_valid(read_decisions(unit, config, stage_dir).column("reason")))
        ids = read_unit_input(unit, ["id"]).column("id")
        path = signatures_path(stage_dir, unit.name)
        fs, local = shards.filesystem(path)
        start = 0
        with fs.open(local, "rb") as f:
            signatures = pq.ParquetFile(f).iter_batches(INDEX_PART_ROWS, columns=columns)
            for part, batch in enumerate(signatures):
                stop = start + batch.num_rows
                rows = pa.Table.from_batches([batch]).add_column(
                    0, "id", ids.slice(start, stop - start)
                )
                yield f"{unit.name}.{part:04d}", rows.filter(kept.slice(start, stop - start))
                start = stop

    source = units[0].source
    return index_for(config, stage_dir).append(
        config,
        batch_name(source["input_digest"]),
        source["context"][:16],
        (part for unit in units for part in kept_rows(unit)),
    )


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
    records = mapper(lambda u: deduplicate_shard_plain(u, config, stage_dir), units)
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
        stage_dir, STAGE, config, records, input_digest, resolve_stats(units, config, stage_dir)
    )
    index = index_for(config, stage_dir)
    batch = batch_name(input_digest)
    if not (all(r.skipped for r in records) and batch in index.read_meta()["batches"]):
        update_index(units, config, stage_dir)
    return manifest
