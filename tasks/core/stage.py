"""How every stage runs: units of work keyed by content, completion markers, manifests.

A stage is a module in ``tasks/`` with three things: a pydantic config, a plain function that turns
one unit of input (a shard, a file, a crawl) into a :class:`ShardResult`, and a thin Prefect task
that hands that function to :func:`run_unit`. Everything else lives here, once:

* A unit's key is the hash of its input's content, the stage config and the stage's code version
  (its own version string plus the versions of the libraries doing the work). A unit whose
  completion marker carries the same key is skipped; a re-run does no work and an interrupted run
  resumes at the first unit without a marker. This is the one resume mechanism (datatrove's
  completion markers, not Prefect's result cache: the markers live with the data, on any fsspec
  root, and work the same with or without a Prefect API).
* Kept rows go to ``<stage>/<unit>.parquet``, removed rows to ``<stage>/rejected/<unit>.parquet``
  with their reason, fetch failures into the marker; all writes are atomic. A unit with a part
  size (a source reading a big file) writes numbered parts instead
  (:mod:`~llmflow.tasks.core.unit_output`).
* :func:`~llmflow.tasks.core.manifests.finalize_stage` builds the manifest from the markers and
  removes outputs of units that no longer exist, so the manifest always describes exactly the
  files beside it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar, NamedTuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import rejected_schema
from llmflow.tasks.core.unit_output import SHARD_SUFFIX, ShardResult, UnitOutput


class StageConfig(BaseModel):
    """Base of every stage's config: unknown keys are errors, and some fields never change output.

    ``RUNTIME_FIELDS`` names fields that change how fast or how politely work is done but not what
    it produces (concurrency, for instance); they are left out of the unit key so that changing
    them does not redo finished work. NaN and infinities are refused: a threshold or learning
    rate of ``Infinity`` (valid JSON to ``--set``) is a typo, never a setting.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def output_hash(self) -> str:
        """Hash of the fields that decide the stage's output."""
        return self.fields_hash(exclude=self.RUNTIME_FIELDS)

    def fields_hash(
        self, include: frozenset[str] | None = None, exclude: frozenset[str] = frozenset()
    ) -> str:
        """Hash of some of the fields (a stage's key for a derived table, such as its signals)."""
        payload = self.model_dump(
            mode="json", include=set(include) if include is not None else None, exclude=set(exclude)
        )
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StageSpec:
    """Identity of a stage: bump ``version`` whenever the same input would give different output."""

    name: str
    version: str
    libraries: tuple[str, ...] = ()

    def code_version(self) -> str:
        """The stage version plus the versions of the libraries whose output it keeps."""
        parts = [self.version]
        for library in self.libraries:
            try:
                parts.append(f"{library}=={version(library)}")
            except PackageNotFoundError:
                parts.append(f"{library}==missing")
        return "+".join(parts)


@dataclass(frozen=True)
class WorkUnit:
    """One unit of a stage's work: its output name, its key, and what it reads."""

    name: str
    key: str
    source: dict[str, Any]


def unit_key(
    spec: StageSpec,
    config: StageConfig,
    input_digest: str,
    fields: frozenset[str] | None = None,
) -> str:
    """The one key of llmflow's resume: the stage, its code version, the config fields that
    decide the output (``fields`` when a derived table depends on fewer of them: quality's
    signals, toxicity's scores) and a digest of what the work reads. A unit, a step and a
    cached table are all keyed here."""
    material = json.dumps(
        {
            "stage": spec.name,
            "code": spec.code_version(),
            "config": config.output_hash() if fields is None else config.fields_hash(fields),
            "input": input_digest,
        },
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass
class UnitRecord:
    """The completion marker of one unit: what it wrote and what it counted."""

    name: str
    key: str
    docs_in: int
    parts: list[shards.ShardFile]
    rejected: list[shards.ShardFile]
    reasons: dict[str, int]
    stats: dict[str, int]
    failures: list[dict[str, Any]]
    seconds: float
    skipped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key": self.key,
            "docs_in": self.docs_in,
            "parts": [p.to_dict() for p in self.parts],
            "rejected": [r.to_dict() for r in self.rejected],
            "reasons": self.reasons,
            "stats": self.stats,
            "failures": self.failures,
            "seconds": self.seconds,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], skipped: bool = False) -> UnitRecord:
        return cls(
            name=d["name"],
            key=d["key"],
            docs_in=d["docs_in"],
            parts=[shards.ShardFile.from_dict(p) for p in d["parts"]],
            rejected=[shards.ShardFile.from_dict(r) for r in d["rejected"]],
            reasons=d["reasons"],
            stats=d["stats"],
            failures=d["failures"],
            seconds=d["seconds"],
            skipped=skipped,
        )


def marker_path(stage_dir: str, unit_name: str) -> str:
    return shards.join(stage_dir, shards.DONE_DIR, f"{unit_name}.json")


def completed_record(stage_dir: str, unit: WorkUnit) -> UnitRecord | None:
    """The unit's marker if it was made with the same key and its files are still there."""
    path = marker_path(stage_dir, unit.name)
    if not shards.exists(path):
        return None
    try:
        record = UnitRecord.from_dict(shards.read_json(path), skipped=True)
    except (ValueError, KeyError, TypeError):
        return None  # a marker from an older format: redo the unit
    if record.key != unit.key:
        return None
    outputs = record.parts + record.rejected
    if not all(shards.exists(shards.join(stage_dir, s.path)) for s in outputs):
        return None
    return record


def run_unit(
    stage_dir: str,
    unit: WorkUnit,
    process: Callable[[UnitOutput], ShardResult],
    max_rows: int | None = None,
    max_bytes: int | None = None,
) -> UnitRecord:
    """Skip the unit if it is complete; else run ``process`` and write its outputs atomically.

    ``process`` returns its rows as tables, or streams them into the :class:`UnitOutput` it is
    handed (a source reading a big file); either way they land in parts of at most
    ``max_rows`` rows / ``max_bytes`` bytes (one part, under the unit's name, without limits).
    The marker is written last: a crash before it means the unit is redone, never half-trusted.
    """
    done = completed_record(stage_dir, unit)
    if done is not None:
        return done
    started = time.perf_counter()
    output = UnitOutput(stage_dir, unit.name, max_rows, max_bytes)
    result = process(output)
    output.keep(result.kept)
    if result.rejected.num_rows:
        output.reject(result.rejected)
    parts, rejected = output.close(result.kept.schema)
    kept_rows, rejected_rows = sum(p.rows for p in parts), sum(r.rows for r in rejected)
    if kept_rows + rejected_rows > result.docs_in:
        raise RuntimeError(
            f"unit {unit.name}: {kept_rows} kept + {rejected_rows} rejected exceeds"
            f" {result.docs_in} documents in"
        )
    record = UnitRecord(
        name=unit.name,
        key=unit.key,
        docs_in=result.docs_in,
        parts=parts,
        rejected=rejected,
        reasons=dict(sorted(output.reasons.items())),
        stats=dict(sorted(result.stats.items())),
        failures=result.failures,
        seconds=round(time.perf_counter() - started, 3),
    )
    shards.write_json_atomic(marker_path(stage_dir, unit.name), record.to_dict())
    return record


CACHE_KEY_METADATA = b"llmflow.cache_key"
# Counters that say how much work was reused rather than what the data is (see finalize_stage).
WORK_COUNTER_SUFFIXES = ("_reused", "_computed")
# Folders of per-unit derived tables (quality signals, dedup signatures and decisions, the crawl's
# page states and withdrawals): files of units that no longer exist go with the units' outputs.
UNIT_CACHE_DIRS = ("_signals", "_signatures", "_decisions", "_state", "_withdrawn", "_scores")


def cached_table(path: str, key: str, compute: Callable[[], pa.Table]) -> tuple[pa.Table, bool]:
    """A table derived from one unit's input, kept at ``path`` and reused while ``key`` matches.

    For the expensive half of a stage whose other half is cheap: quality signals that thresholds
    re-decide, dedup signatures that a new global resolution reuses. The key travels inside the
    Parquet file's schema metadata, so the table and the key that made it cannot drift apart;
    the write is atomic. Returns the table and whether it was reused.
    """
    if shards.exists(path):
        fs, p = shards.filesystem(path)
        try:
            with fs.open(p, "rb") as f:
                table = pq.read_table(f)
        except (OSError, pa.ArrowInvalid):
            table = None  # unreadable leftovers are recomputed, never trusted
        if (
            table is not None
            and (table.schema.metadata or {}).get(CACHE_KEY_METADATA) == key.encode()
        ):
            return table, True
    table = compute()
    metadata = dict(table.schema.metadata or {}) | {CACHE_KEY_METADATA: key.encode()}
    table = table.replace_schema_metadata(metadata)
    directory, _, name = path.rpartition("/")
    shards.write_shard(directory, name, table)
    return table, False


def plan_shard_units(
    spec: StageSpec,
    config: StageConfig,
    input_dir: str,
    context: str = "",
    source: dict[str, Any] | None = None,
) -> tuple[list[WorkUnit], str]:
    """One unit per shard of the input dataset, keyed by that shard's content hash.

    ``context`` names anything else a unit's output depends on (the tokenizer that encodes it,
    the dedup index it is checked against): it joins the key, and ``source`` joins what each unit
    reads. Returns the units and the input manifest's digest. The output shard keeps the input
    shard's name, so a document can be followed from stage to stage by file name.
    """
    manifest = shards.read_manifest(input_dir)
    units = []
    for shard in shards.manifest_shards(manifest):
        # a versioned dataset's shards sit in folders (v0002/pii/web.parquet): one flat name
        name = shard.path.removesuffix(SHARD_SUFFIX).replace("/", "-")
        digest = f"{shard.sha256}:{context}" if context else shard.sha256
        units.append(
            WorkUnit(
                name=name,
                key=unit_key(spec, config, digest),
                source={"dir": input_dir, "shard": shard.to_dict()} | (source or {}),
            )
        )
    return units, shards.manifest_sha256(input_dir)


def read_unit_input(unit: WorkUnit, columns: list[str] | None = None) -> pa.Table:
    """The input shard of a unit planned by :func:`plan_shard_units` (or some of its columns)."""
    shard = shards.ShardFile.from_dict(unit.source["shard"])
    return shards.read_shard(unit.source["dir"], shard, columns)


def put_column(table: pa.Table, field: pa.Field, column: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Add a column, or replace it where the input already has one (a stage run again over its
    own output, or a column such as ``text`` that a stage rewrites)."""
    index = table.schema.get_field_index(field.name)
    if index >= 0:
        return table.set_column(index, field, column)
    return table.append_column(field, column)


class Rejection(NamedTuple):
    """Why a curation rule removed a document: a stable ``reason`` (a metric name) and a
    ``detail`` a person can read (the measured value against its threshold)."""

    reason: str
    detail: str


def route(
    table: pa.Table, decisions: Sequence[Rejection | None], stats: Counter[str] | None = None
) -> ShardResult:
    """A shard's result from one decision per row: ``None`` keeps the row, a :class:`Rejection`
    sends it, in order, to the rejected set with its reason and detail.

    Rules return values and this one helper counts and routes, so no stage keeps aligned lists
    of flags, reasons and details."""
    if len(decisions) != table.num_rows:
        raise ValueError(f"{len(decisions)} decisions for {table.num_rows} rows")
    mask = pa.array([d is None for d in decisions], pa.bool_())
    rejections = [d for d in decisions if d is not None]
    return ShardResult(
        kept=table.filter(mask),
        rejected=with_reason(
            table.filter(pc.invert(mask)),
            [r.reason for r in rejections],
            [r.detail for r in rejections],
        ),
        docs_in=table.num_rows,
        stats=stats if stats is not None else Counter(),
    )


def with_reason(table: pa.Table, reasons: list[str], details: list[str]) -> pa.Table:
    """A rejected-set table: the removed rows plus why each was removed."""
    schema = rejected_schema(table.schema)
    table = table.append_column(schema.field("reason"), pa.array(reasons, pa.string()))
    return table.append_column(schema.field("detail"), pa.array(details, pa.string()))
