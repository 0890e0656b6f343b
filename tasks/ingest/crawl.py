"""crawl: documents from the web, from Common Crawl WARC/WET files, or from local files.

The seeds decide the reader: http(s) URLs (and ``pydoc:``, the embedded default's local site) are
crawled together as one unit of work, since they share one frontier (or ``web_partitions`` units,
each owning a share of the hosts), which checkpoints as it goes and resumes from its last batch
(:mod:`web_unit`); every file a seed names is a unit of its own, so a directory of WARC files
resumes file by file. Every document read is
accounted for: kept, rejected with a reason, or listed as a fetch failure in the manifest.

In a refresh (a version after the first, :mod:`llmflow.tasks.core.document_versions`) the crawl
reads only what may have changed: the web is re-crawled with conditional requests against the last
crawl's page states, a file whose size and time (or ETag) are unchanged is not read again, and a
changed file is read whole. The documents that leave the dataset are written down with a reason:
``changed`` (the page's text is not what it was), ``gone_<why>`` (the page now fails: 404,
robots.txt forbids it, out of scope), ``source_changed`` (no longer in its changed file) and
``source_removed`` (its file left the seeds). Transient failures (timeouts, 5xx, an unreachable
robots.txt) withdraw nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.tasks.core import document_versions, shards
from llmflow.tasks.core.document_versions import SOURCES_NAME, WITHDRAWN_NAME, WITHDRAWN_SCHEMA
from llmflow.tasks.core.documents import Document, FetchFailure
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.progress import StepProgress
from llmflow.tasks.core.stage import (
    StageSpec,
    UnitRecord,
    WorkUnit,
    completed_record,
    marker_path,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import ShardResult, UnitOutput, documents_result, is_part_of
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_checkpoint import remove_checkpoint
from llmflow.tasks.ingest.crawl_config import CrawlConfig, redact_url
from llmflow.tasks.ingest.crawl_guards import install_interrupt_handler
from llmflow.tasks.ingest.file_sources import expand_file_seed, is_file_seed, iter_file_documents
from llmflow.tasks.ingest.installed_docs import (
    INSTALLED_SEED,
    installed_digest,
    installed_documents,
)
from llmflow.tasks.ingest.pydoc_site import PYDOC_SEED, pydoc_site
from llmflow.tasks.ingest.web_scope import host_partition, normalize_url
from llmflow.tasks.ingest.web_unit import (
    TRANSIENT_FAILURES,
    checkpoint_dir,
    crawl_web_unit,
    respell,
    state_parts,
)

STAGE = StageSpec(
    name="crawl", version="1", libraries=("httpx", "warcio", "resiliparse", "trafilatura")
)
WEB_UNIT = "web"
INSTALLED_UNIT = "installed"
WITHDRAWN_DIR = "_withdrawn"

__all__ = [
    "STAGE",
    "CrawlConfig",
    "PreviousCrawl",
    "crawl_documents",
    "crawl_unit",
    "finish",
    "plan_crawl_units",
    "previous_crawl",
]


@dataclass(frozen=True)
class PreviousCrawl:
    """What a refresh builds on: the last published version and the crawl units it holds."""

    documents_dir: str
    version: int
    sources: dict[str, dict[str, Any]]

    def crawl_dir(self, version: int) -> str:
        return shards.join(self.documents_dir, document_versions.version_name(version), STAGE.name)


def previous_crawl(stage_dir: str) -> PreviousCrawl | None:
    """The version a crawl into ``stage_dir`` (``<documents>/vNNNN/crawl``) refreshes, if any."""
    located = document_versions.stage_version(stage_dir)
    if located is None:
        return None
    documents_dir, number = located
    previous = document_versions.previous_version(documents_dir, number)
    if previous is None:
        return None
    sources = document_versions.read_version(documents_dir, previous)["sources"]
    return PreviousCrawl(documents_dir, previous, sources)


def _is_web_seed(seed: str) -> bool:
    return seed.startswith((PYDOC_SEED, "http://", "https://"))


def _file_unit_name(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", path.rsplit("/", 1)[-1]).strip("-")[:40] or "file"
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def _seed_partition(seed: str, count: int) -> int:
    """The partition that owns a web seed's host, as the crawler decides it for a link
    (``pydoc:`` pages are kept as ``pydoc:<path>``); an invalid seed's failure is unit 0's."""
    if seed.startswith(PYDOC_SEED):
        return host_partition(seed, count)
    try:
        return host_partition(normalize_url(redact_url(seed)), count)
    except ValueError:
        return 0


def plan_crawl_units(config: CrawlConfig, previous: PreviousCrawl | None = None) -> list[WorkUnit]:
    """The crawl's units of work, keyed by what they read; in a refresh, only what may be new.

    A file's key uses fsspec's ``ukey`` (size and modification time locally, the ETag on object
    stores): cheap for multi-GB WARC files, and it changes when the file does. The web unit is
    keyed by its seeds (and, in a refresh, the page states it starts from); pydoc's pages also
    depend on the Python version serving them.
    """
    units = _all_units(config, previous)
    if any(u.source["kind"] == "web" for u in units):
        # Planning runs in the flow's main thread, the crawl in a task runner's worker thread,
        # where Ctrl-C never arrives: this lets it stop the crawl (a no-op off the main thread).
        install_interrupt_handler()
    if previous is None:
        return units
    return [
        u
        for u in units
        if u.source["kind"] == "web" or previous.sources.get(u.name, {}).get("key") != u.key
    ]


def _all_units(config: CrawlConfig, previous: PreviousCrawl | None) -> list[WorkUnit]:
    units: list[WorkUnit] = []
    web_seeds = [s for s in config.seeds if _is_web_seed(s)]
    count = config.web_partitions
    owners = [_seed_partition(seed, count) for seed in web_seeds]
    for index in sorted(set(owners)):
        name = WEB_UNIT if count == 1 else f"{WEB_UNIT}-{index}"
        states: list[str] = []
        if previous is not None and name in previous.sources:
            states = state_parts(previous.crawl_dir(previous.version), name)
        # Credentials change the key (a hash), but the unit carries the seeds without them: a
        # unit is passed around (task parameters, logs), and crawl_documents takes them back
        # from the config. Every unit has every seed (the scope is theirs together) and crawls
        # from those it owns.
        material: dict[str, Any] = {"seeds": web_seeds, "python": sys.version}
        if count > 1:
            material["partition"] = [index, count]
        if states:
            # One file's hash as it always was; the parts' hashes joined for a longer crawl.
            material["state"] = "+".join(
                hashlib.sha256(shards.read_bytes(path)).hexdigest() for path in states
            )
        digest = json.dumps(material, sort_keys=True)
        units.append(
            WorkUnit(
                name=name,
                key=unit_key(STAGE, config, hashlib.sha256(digest.encode()).hexdigest()),
                source={
                    "kind": "web",
                    "seeds": [redact_url(s) for s in web_seeds],
                    "partition": [index, count],
                    "previous_states": states,
                },
            )
        )
    if INSTALLED_SEED in config.seeds:
        units.append(
            WorkUnit(
                name=INSTALLED_UNIT,
                key=unit_key(STAGE, config, installed_digest()),
                source={
                    "kind": "installed",
                    "previous_parts": _previous_parts(previous, INSTALLED_UNIT),
                },
            )
        )
    for seed in config.seeds:
        if _is_web_seed(seed) or seed == INSTALLED_SEED:
            continue
        if not is_file_seed(seed):
            raise ValueError(
                f"crawl.seeds: {redact_url(seed)!r} is neither an http(s) URL, 'pydoc:', nor a"
                " file path"
            )
        for path in expand_file_seed(seed):
            fs, p = shards.filesystem(path)
            name = _file_unit_name(path)
            units.append(
                WorkUnit(
                    name=name,
                    key=unit_key(STAGE, config, f"{path}\0{fs.ukey(p)}"),
                    source={
                        "kind": "file",
                        "path": path,
                        "previous_parts": _previous_parts(previous, name),
                    },
                )
            )
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("crawl.seeds: the same file is named by more than one seed")
    return units


def _previous_parts(previous: PreviousCrawl | None, name: str) -> list[str]:
    """The kept crawl shards the last version holds for a file unit (what a changed file's new
    read is compared with): one, or the parts of a big file."""
    if previous is None or name not in previous.sources:
        return []
    crawl_dir = previous.crawl_dir(previous.sources[name]["version"])
    manifest = shards.read_manifest(crawl_dir)
    return [
        shards.join(crawl_dir, s.path)
        for s in shards.manifest_shards(manifest)
        if is_part_of(s.path, name)
    ]


def _write_withdrawn(stage_dir: str, unit: WorkUnit, rows: list[dict[str, Any]]) -> None:
    """A unit's withdrawn documents (id, url, reason), replaced on every run of the unit."""
    path = shards.join(stage_dir, WITHDRAWN_DIR, f"{unit.name}.parquet")
    if not rows:
        shards.remove(path)
        return
    table = pa.Table.from_pylist([r | {"version": 0} for r in rows], schema=WITHDRAWN_SCHEMA)
    shards.write_shard(stage_dir, f"{WITHDRAWN_DIR}/{unit.name}.parquet", table)


def _no_longer_in(previous_parts: list[str], kept_ids: set[str]) -> list[dict[str, Any]]:
    """Documents of a file's last read that its new read does not have."""
    gone: list[dict[str, Any]] = []
    value_set = pa.array(sorted(kept_ids), pa.string())
    for path in previous_parts:
        if shards.exists(path):
            old = shards.read_parquet(path, ["id", "url"])
            missing = pc.invert(pc.is_in(old.column("id"), value_set=value_set))
            gone += [r | {"reason": "source_changed"} for r in old.filter(missing).to_pylist()]
    return gone


def crawl_documents(
    unit: WorkUnit,
    config: CrawlConfig,
    stage_dir: str,
    on_document: Callable[[], None],
    output: UnitOutput,
) -> ShardResult:
    """Read one unit: crawl the web seeds, or read one file, and account for every outcome.

    Documents stream into ``output`` as they are read, so a big file becomes several shards
    (``shard_docs``/``shard_bytes``) and memory is bounded by a shard, not by the file."""
    with ExitStack() as stack:
        extractor = stack.enter_context(
            BoundedExtractor(
                cpu_s=config.extract_cpu_s,
                wall_s=config.extract_wall_s,
                memory_mb=config.extract_memory_mb,
                workers=config.extract_workers,
            )
        )
        if unit.source["kind"] in ("installed", "file"):
            if unit.source["kind"] == "installed":
                outcomes: Iterator[Document | FetchFailure] = installed_documents(
                    config.max_page_bytes
                )
            else:
                outcomes = iter_file_documents(
                    unit.source["path"], extractor, config.max_page_bytes, config.content_types
                )
            kept_ids: set[str] = set()
            result = documents_result(_counting(outcomes, on_document), output, kept_ids)
            withdrawn = _no_longer_in(unit.source.get("previous_parts", []), kept_ids)
            _write_withdrawn(stage_dir, unit, withdrawn)
            result.stats.update(f"withdrawn_{w['reason']}" for w in withdrawn)
            return result
        # The unit names its seeds without credentials; the config has them as given.
        with_credentials = {redact_url(s): s for s in config.seeds}
        seeds = [with_credentials.get(s, s) for s in unit.source["seeds"]]
        site = ""
        if any(s.startswith(PYDOC_SEED) for s in seeds):
            site = stack.enter_context(pydoc_site()).rstrip("/") + "/"
            if all(s.startswith(PYDOC_SEED) for s in seeds):
                # Our own server on localhost, started for this crawl: politeness protects
                # other people's servers, and here it would only make the default run slow; the
                # private-address guard protects other services, and this one is ours.
                config = config.model_copy(
                    update={"politeness_delay_s": 0.0, "allow_private_addresses": True}
                )
            seeds = [respell(s, PYDOC_SEED, site) for s in seeds]
        result, withdrawn = crawl_web_unit(
            unit, config, stage_dir, extractor, on_document, output, seeds, site, PYDOC_SEED
        )
        _write_withdrawn(stage_dir, unit, withdrawn)
        result.stats.update(f"withdrawn_{w['reason']}" for w in withdrawn)
        return result


def _counting(
    outcomes: Iterator[Document | FetchFailure], tick: Callable[[], None]
) -> Iterator[Document | FetchFailure]:
    for outcome in outcomes:
        tick()
        yield outcome


def finish(
    units: list[WorkUnit],
    config: CrawlConfig,
    stage_dir: str,
    records: list[UnitRecord],
    input_digest: str | None,
) -> dict[str, Any]:
    """The manifest, then what the version needs: its sources and every withdrawal so far.

    ``refresh/sources.json`` names every crawl unit the version holds and the version whose crawl
    read it (units a refresh did not read again keep their older version).
    ``refresh/withdrawn.parquet`` is the last version's withdrawals plus this crawl's: what the
    dedup index must not match and what publishing the version takes out of older shards.
    """
    # The manifest shows the config without the seeds' credentials (its config_hash is then the
    # redacted config's: a description, never compared with the unit keys).
    shown = config.model_copy(update={"seeds": [redact_url(s) for s in config.seeds]})
    manifest = finalize_stage(stage_dir, STAGE, shown, records, input_digest)
    for record in records:  # complete: their checkpoints are spent
        remove_checkpoint(checkpoint_dir(stage_dir, record.name))
    previous = previous_crawl(stage_dir)
    located = document_versions.stage_version(stage_dir)
    number = located[1] if located is not None else 1
    ran = {u.name for u in units}
    sources = {
        u.name: {
            "key": u.key,
            "version": number
            if u.name in ran or previous is None
            else previous.sources[u.name]["version"],
        }
        for u in _all_units(config, previous)
    }
    parts = [
        document_versions.withdrawn_table(previous.documents_dir, previous.version)
        if previous is not None
        else WITHDRAWN_SCHEMA.empty_table()
    ]
    rows: list[dict[str, Any]] = []
    withdrawn_dir = shards.join(stage_dir, WITHDRAWN_DIR)
    for name in shards.list_names(withdrawn_dir, ".parquet"):
        rows += shards.read_parquet(shards.join(withdrawn_dir, name)).to_pylist()
    if previous is not None:
        for name in sorted(set(previous.sources) - set(sources)):
            for old in _previous_parts(previous, name):
                if not shards.exists(old):
                    continue
                table = shards.read_parquet(old, ["id", "url"])
                rows += [
                    {"id": r["id"], "url": r["url"], "reason": "source_removed"}
                    for r in table.select(["id", "url"]).to_pylist()
                ]
    parts.append(
        pa.Table.from_pylist([r | {"version": number} for r in rows], schema=WITHDRAWN_SCHEMA)
    )
    shards.write_shard(stage_dir, WITHDRAWN_NAME, pa.concat_tables(parts), keep_identical=True)
    shards.write_json_atomic(shards.join(stage_dir, SOURCES_NAME), sources)
    return manifest


def _forget_outage(unit: WorkUnit, stage_dir: str) -> None:
    """A finished web crawl that read nothing at all, every URL failing for a reason that
    passes (robots.txt unreachable, 5xx, timeout, lost connection), is not kept as done: that
    run stopped after the crawl, and the next one should try the server again, not report the
    same outage from the record."""
    if unit.source["kind"] != "web":
        return
    done = completed_record(stage_dir, unit)
    if done is None or done.docs_in or not done.failures:
        return
    if all(f["reason"] in TRANSIENT_FAILURES for f in done.failures):
        shards.remove(marker_path(stage_dir, unit.name))


@task(name="crawl-unit", cache_policy=NO_CACHE, persist_result=False)
def crawl_unit(unit: WorkUnit, config: CrawlConfig, stage_dir: str) -> UnitRecord:
    _forget_outage(unit, stage_dir)
    total = config.max_pages if unit.source["kind"] == "web" else None
    label = "pages" if unit.source["kind"] == "web" else "records"
    with StepProgress(f"crawl-{unit.name}", f"crawl {unit.name} ({label})", total) as progress:
        return run_unit(
            stage_dir,
            unit,
            lambda output: crawl_documents(unit, config, stage_dir, progress.advance, output),
            max_rows=config.shard_docs,
            max_bytes=config.shard_bytes,
        )
