"""The manifests: what a stage's folder holds, as typed models with one shape per kind.

A stage that maps over units writes a :class:`StageManifest` (its shards and rejected shards,
the schema, counts, stats, failures); a stage may add fields of its own beside them (tokenize's
token shards, the crawl's sources), declared by the stage. A one-step stage writes a
:class:`~llmflow.tasks.core.steps.StepManifest`, which declares the files it made. The hash of
a manifest's bytes names the dataset (:func:`~llmflow.tasks.core.shards.manifest_sha256`) and
keys every later stage, so nothing time-dependent goes in.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import (
    SHARD_SUFFIX,
    UNIT_CACHE_DIRS,
    WORK_COUNTER_SUFFIXES,
    StageConfig,
    StageSpec,
    UnitRecord,
)

# The number of a unit's part (unit_output.part_name): "web.00003" is a part of unit "web".
_NUMBERED = re.compile(r"\.\d{5}$")


class Counts(BaseModel):
    """The stage's funnel: documents in, kept, removed (per reason), bytes kept, fetch failures."""

    docs_in: int
    kept: int
    rejected: int
    bytes: int
    rejected_by_reason: dict[str, int]
    fetch_failures: int


class StageManifest(BaseModel):
    """The manifest of a stage that maps over units; a stage's own fields may follow these."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    format: int
    stage: str
    code_version: str
    config_hash: str
    config: dict[str, Any]
    input_manifest_sha256: str | None
    # "schema" in the file; a pydantic model cannot have a field of that name
    schema_description: list[Any] = Field(alias="schema")
    shards: list[dict[str, Any]]
    rejected_shards: list[dict[str, Any]]
    counts: Counts
    stats: dict[str, int]
    failures: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """The manifest as written: fields in declaration order, ``schema`` by its name."""
        return self.model_dump(mode="json", by_alias=True)


def finalize_stage(
    stage_dir: str,
    spec: StageSpec,
    config: StageConfig,
    records: Iterable[UnitRecord],
    input_manifest_sha256: str | None,
    extra_stats: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Write the stage's manifest from its unit records and drop files of units that are gone.

    Units are listed by name so the manifest does not depend on the order in which workers
    finished; nothing time-dependent goes in, so a re-run that skipped every unit rewrites the
    same bytes. ``extra_stats`` are counts of the stage as a whole (dedup's resolve step).

    Counters of reused or recomputed work (names ending in ``_reused`` or ``_computed``) depend
    on what earlier, perhaps interrupted, runs left behind rather than on the data, so they stay
    out of the file, whose hash keys every later stage; the returned manifest carries them under
    ``work`` for the run's report.
    """
    records = sorted(records, key=lambda r: r.name)
    live = {r.name for r in records}
    for name in shards.list_names(shards.join(stage_dir, shards.DONE_DIR), ".json"):
        if name.removesuffix(".json") not in live:
            shards.remove(shards.join(stage_dir, shards.DONE_DIR, name))
    # A unit's output parts by path; its cached tables (signals, signatures...) by its name.
    written = {p.path for r in records for p in r.parts + r.rejected}
    for sub in ("", shards.REJECTED_DIR, *UNIT_CACHE_DIRS):
        directory = shards.join(stage_dir, sub) if sub else stage_dir
        for name in shards.list_names(directory, SHARD_SUFFIX):
            path = f"{sub}/{name}" if sub else name
            if sub in UNIT_CACHE_DIRS:
                # one table per unit, or numbered parts of it (a long crawl's page states)
                stem = name.removesuffix(SHARD_SUFFIX)
                if stem not in live and _NUMBERED.sub("", stem) not in live:
                    shards.remove(shards.join(directory, name))
            elif path not in written:
                shards.remove(shards.join(directory, name))

    reasons: Counter[str] = Counter()
    stats: Counter[str] = Counter()
    for r in records:
        reasons.update(r.reasons)
        stats.update(r.stats)
    stats.update(extra_stats or {})
    work = {k: v for k, v in stats.items() if k.endswith(WORK_COUNTER_SUFFIXES)}
    shard_files = [p for r in records for p in r.parts]
    rejected = [p for r in records for p in r.rejected]
    schema = _first_schema(stage_dir, shard_files)
    typed = StageManifest(
        format=shards.MANIFEST_FORMAT,
        stage=spec.name,
        code_version=spec.code_version(),
        config_hash=config.output_hash(),
        config=config.model_dump(mode="json"),
        input_manifest_sha256=input_manifest_sha256,
        schema_description=shards.schema_description(schema) if schema else [],
        shards=[s.to_dict() for s in shard_files],
        rejected_shards=[s.to_dict() for s in rejected],
        counts=Counts(
            docs_in=sum(r.docs_in for r in records),
            kept=sum(s.rows for s in shard_files),
            rejected=sum(s.rows for s in rejected),
            bytes=sum(s.bytes for s in shard_files),
            rejected_by_reason=dict(sorted(reasons.items())),
            fetch_failures=sum(len(r.failures) for r in records),
        ),
        stats={k: v for k, v in sorted(stats.items()) if k not in work},
        failures=[f for r in records for f in r.failures],
    )
    manifest = typed.to_json()
    shards.write_json_atomic(shards.join(stage_dir, shards.MANIFEST_NAME), manifest)
    return manifest | {"work": dict(sorted(work.items()))}


def _first_schema(stage_dir: str, shard_files: list[shards.ShardFile]) -> pa.Schema | None:
    for shard in shard_files:
        fs, p = shards.filesystem(shards.join(stage_dir, shard.path))
        with fs.open(p, "rb") as f:
            return pq.read_schema(f)
    return None
