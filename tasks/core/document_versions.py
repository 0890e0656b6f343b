"""Versions of the curated documents: each refresh adds a version, none rewrites an older one.

Layout under ``<data_root>/documents``::

    manifest.json                  the newest version (the pointer: replaced atomically, last)
    versions/v0002.json            every published version, never changed once a newer one exists
    versions/v0002.withdrawn.parquet   every document withdrawn up to that version, and why
    v0001/crawl … v0001/pii        the first run's stages, over everything it read
    v0002/crawl … v0002/pii        a refresh's stages, over only what was new or changed
    v0002/withdrawn/*.parquet      older shards with the refresh's withdrawn documents taken out
    dedup-index/                   the persistent MinHash index every version is checked against

A version is a stage-style manifest (the same reader serves it) whose shards are the previous
version's, less the documents the refresh withdrew (a page that changed or is gone; a file that
changed or left the seeds), plus the refresh's own final shards. Shards are shared between
versions and never rewritten: a shard that loses documents is copied without them into the new
version's folder (copy-on-write, as Iceberg and Delta do). The pointer moves only when a version
is complete, so a reader never sees a half-made one, and a refresh that is interrupted resumes
its version instead of starting another.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from llmflow.tasks.core import shards

DOCUMENTS = "documents"
VERSIONS_DIR = "versions"
STARTED_NAME = "version.json"
# the crawl's record of a version (beside its units' files, never taken for one of them)
WITHDRAWN_NAME = "refresh/withdrawn.parquet"
SOURCES_NAME = "refresh/sources.json"
INDEX_DIR = "dedup-index"
WITHDRAWN_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("url", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("version", pa.int32(), nullable=False),
    ]
)
_VERSION = re.compile(r"^v(\d{4,})$")


def version_name(number: int) -> str:
    return f"v{number:04d}"


def version_number(name: str) -> int | None:
    """``v0002`` → 2; None for a name that is not a version's."""
    match = _VERSION.match(name)
    return int(match.group(1)) if match else None


def stage_version(stage_dir: str) -> tuple[str, int] | None:
    """``<documents>/v0002/<stage>`` → (``<documents>``, 2); None for a stage dir outside the
    versioned documents (a stage run on its own, in tests or benchmarks)."""
    parts = stage_dir.rstrip("/").rsplit("/", 2)
    number = version_number(parts[-2]) if len(parts) == 3 else None
    return None if number is None else (parts[0], number)


def _numbers(directory: str, suffix: str = "") -> list[int]:
    names = [n.removesuffix(suffix) for n in shards.list_names(directory, suffix)]
    return sorted(n for n in map(version_number, names) if n is not None)


def published(documents_dir: str) -> list[int]:
    """The published versions, oldest first."""
    return _numbers(shards.join(documents_dir, VERSIONS_DIR), ".json")


def started(documents_dir: str) -> list[int]:
    """Versions whose stages have begun (published or not)."""
    return [
        n
        for n in _numbers(documents_dir)
        if shards.exists(shards.join(documents_dir, version_name(n), STARTED_NAME))
    ]


def working_version(documents_dir: str) -> int:
    """The version the document stages write: the newest one begun (1 before any)."""
    return max(started(documents_dir), default=1)


def previous_version(documents_dir: str, number: int) -> int | None:
    """The newest published version before ``number``: what a refresh builds on."""
    return max((n for n in published(documents_dir) if n < number), default=None)


def begin(documents_dir: str, refresh: bool) -> int:
    """The version this run's document stages write, begun if it is new.

    An unpublished version is always resumed (an interrupted refresh finishes, it is not
    abandoned); otherwise ``refresh`` starts the next version and a plain run re-runs the newest
    one (skipping what is done, redoing what a changed config changes).
    """
    begun, done = started(documents_dir), set(published(documents_dir))
    if not begun:
        number = 1
    elif begun[-1] not in done or not refresh:
        number = begun[-1]
    else:
        number = begun[-1] + 1
    marker = shards.join(documents_dir, version_name(number), STARTED_NAME)
    if not shards.exists(marker):
        previous = previous_version(documents_dir, number)
        shards.write_json_atomic(marker, {"version": number, "previous": previous})
    return number


def version_path(documents_dir: str, number: int) -> str:
    return shards.join(documents_dir, VERSIONS_DIR, f"{version_name(number)}.json")


def read_version(documents_dir: str, number: int) -> dict[str, Any]:
    """A published version's manifest; its shard paths are relative to ``documents_dir``."""
    path = version_path(documents_dir, number)
    if not shards.exists(path):
        have = ", ".join(version_name(n) for n in published(documents_dir)) or "none"
        raise FileNotFoundError(f"{documents_dir}: no version {number} (published: {have})")
    return shards.read_json(path)


def version_with_digest(documents_dir: str, digest: str) -> int | None:
    """The published version whose manifest has this sha256 (what a dataset records as its input
    digest), so a model's run can name the documents version it was trained on."""
    for number in reversed(published(documents_dir)):
        path = version_path(documents_dir, number)
        if hashlib.sha256(shards.read_bytes(path)).hexdigest() == digest:
            return number
    return None


def withdrawn_table(documents_dir: str, number: int) -> pa.Table:
    """Every document withdrawn up to published version ``number``."""
    manifest = read_version(documents_dir, number)
    shard = shards.ShardFile.from_dict(manifest["withdrawn"])
    return shards.read_shard(documents_dir, shard)


def publish(documents_dir: str, number: int, first: str, last: str) -> dict[str, Any]:
    """Make version ``number`` from its stages' outputs, then move the pointer to it.

    ``first`` and ``last`` are the data phase's first stage (the crawl: what was fetched and
    withdrawn) and last stage (whose documents join the version), as the stage graph orders them.

    Idempotent: the same inputs write the same bytes, so re-running a finished version changes
    nothing. Returns the version's manifest.
    """
    delta = shards.join(documents_dir, version_name(number))
    previous = previous_version(documents_dir, number)
    crawl_dir = shards.join(delta, first)
    final = shards.read_manifest(shards.join(delta, last))
    crawl = shards.read_manifest(crawl_dir)
    withdrawn = shards.read_parquet(shards.join(crawl_dir, WITHDRAWN_NAME))
    mine = withdrawn.filter(pc.equal(withdrawn.column("version"), number)).to_pylist()
    reason_of = {row["id"]: row["reason"] for row in mine}

    shard_files: list[shards.ShardFile] = []
    removed: Counter[str] = Counter()
    earlier = read_version(documents_dir, previous) if previous is not None else {"shards": []}
    withdrawn_ids = pa.array(list(reason_of), pa.string())
    for shard in shards.manifest_shards(earlier):
        if not reason_of:  # a refresh that withdrew nothing reuses every shard unread
            shard_files.append(shard)
            continue
        ids = shards.read_shard(documents_dir, shard, ["id"]).column("id")
        gone = pc.is_in(ids, value_set=withdrawn_ids)
        if not pc.any(gone).as_py():
            shard_files.append(shard)
            continue
        removed.update(reason_of[doc_id] for doc_id in ids.filter(gone).to_pylist())
        table = shards.read_shard(documents_dir, shard).filter(pc.invert(gone))
        name = shard.path.removesuffix(".parquet").replace("/", "-")
        path = f"{version_name(number)}/withdrawn/{name}.parquet"
        shard_files.append(shards.write_shard(documents_dir, path, table, keep_identical=True))
    prefix = f"{version_name(number)}/{last}/"
    added = [
        shards.ShardFile(prefix + s.path, s.rows, s.bytes, s.sha256)
        for s in shards.manifest_shards(final)
        if s.rows
    ]
    shard_files.extend(added)
    withdrawn_path = f"{VERSIONS_DIR}/{version_name(number)}.withdrawn.parquet"
    withdrawn_file = shards.write_shard(
        documents_dir, withdrawn_path, withdrawn, keep_identical=True
    )
    stats = crawl["stats"]
    unchanged = {k: v for k, v in stats.items() if k.startswith("unchanged_")}
    refresh = {
        "fetched": crawl["counts"]["docs_in"]
        + crawl["counts"]["fetch_failures"]
        + sum(unchanged.values()),
        "new_or_changed": crawl["counts"]["docs_in"],
        "unchanged": sum(unchanged.values()),
        **unchanged,
        "fetch_failures": crawl["counts"]["fetch_failures"],
        "added": sum(s.rows for s in added),
        "rejected_by_stages": crawl["counts"]["docs_in"] - sum(s.rows for s in added),
        "removed": sum(removed.values()),
        "removed_by_reason": dict(sorted(removed.items())),
    }
    manifest = {
        "format": shards.MANIFEST_FORMAT,
        "stage": DOCUMENTS,
        "version": number,
        "previous": previous,
        "schema": final["schema"],
        "shards": [s.to_dict() for s in shard_files],
        "rejected_shards": [],
        "counts": {
            "docs_in": sum(s.rows for s in shard_files) + sum(removed.values()),
            "kept": sum(s.rows for s in shard_files),
            "rejected": sum(removed.values()),
            "bytes": sum(s.bytes for s in shard_files),
            "rejected_by_reason": dict(sorted(removed.items())),
            "fetch_failures": 0,
        },
        "refresh": refresh,
        "sources": shards.read_json(shards.join(crawl_dir, SOURCES_NAME)),
        "withdrawn": withdrawn_file.to_dict(),
    }
    shards.write_json_atomic(version_path(documents_dir, number), manifest)
    shards.write_json_atomic(shards.join(documents_dir, shards.MANIFEST_NAME), manifest)
    return manifest
