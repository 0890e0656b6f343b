"""The crawl stage's web unit: a crawl written batch by batch, checkpointed, resumed, refreshed.

Every ``checkpoint_pages`` pages (:mod:`web_crawler`) the batch's outcomes, sorted by URL, go to
the unit's output and are flushed to a part; the states of the pages it fetched go to
``_state/<unit>.<batch>.parquet`` and its responses to ``warc/<unit>.<batch>.warc.gz``; then the
checkpoint (:mod:`crawl_checkpoint`) is written, last. A crawl that is killed (or stopped with
Ctrl-C, which checkpoints what is complete first) resumes from there on the next run of the same
unit key: no page before the checkpoint is fetched again, and the files a later batch had begun
are replaced. A crawl that ends in one batch writes ``web.parquet``, ``_state/web.parquet`` and
``warc/web.warc.gz``, as it always did.

Across a resume every response is in exactly one WARC file, except those of pages whose
extraction Ctrl-C cut short (at most ``concurrency``): received before the stop, they are asked
for again, and both answers are kept.

In a refresh, the last crawl's page states give conditional requests (held as one map by URL
while the crawl runs: the one thing that still grows with an earlier crawl); after the crawl,
each earlier page is accounted for part by part (:func:`account_refresh`): changed or gone pages
withdraw their documents, pages not reached keep theirs and their state.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import DOCUMENT_SCHEMA, Document, rejected_schema
from llmflow.tasks.core.stage import UnitRecord, WorkUnit
from llmflow.tasks.core.unit_output import (
    SHARD_SUFFIX,
    ShardResult,
    UnitOutput,
    documents_result,
    is_part_of,
    part_name,
)
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_checkpoint import (
    CrawlCheckpoint,
    load_checkpoint,
    remove_checkpoint,
    save_checkpoint,
)
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.ingest.warc_writer import WarcRecorder
from llmflow.tasks.ingest.web_crawler import Batch, crawl_web
from llmflow.tasks.ingest.web_pages import PageState

__all__ = ["STATE_DIR", "WARC_DIR", "account_refresh", "checkpoint_dir", "crawl_web_unit"]

WARC_DIR = "warc"
STATE_DIR = "_state"
WARC_SUFFIX = ".warc.gz"
# Failures that say nothing about the page (it may be back tomorrow): its document stays.
TRANSIENT_FAILURES = frozenset({"timeout", "connection_error", "http_5xx", "robots_unreachable"})
STATE_SCHEMA = pa.schema(
    [
        pa.field("url", pa.string(), nullable=False),
        pa.field("etag", pa.string()),
        pa.field("last_modified", pa.string()),
        pa.field("doc_id", pa.string()),
        pa.field("links", pa.list_(pa.string())),
    ]
)


def checkpoint_dir(stage_dir: str, unit_name: str) -> str:
    return shards.join(stage_dir, STATE_DIR, f"{unit_name}.checkpoint")


def state_parts(crawl_dir: str, unit_name: str) -> list[str]:
    """A crawl's page-state files for one unit, in order (one, or numbered parts)."""
    directory = shards.join(crawl_dir, STATE_DIR)
    names = [n for n in shards.list_names(directory, SHARD_SUFFIX) if is_part_of(n, unit_name)]
    return [shards.join(directory, n) for n in names]


def read_states(paths: list[str]) -> dict[str, PageState]:
    """The last crawl's page states by URL (what conditional requests and 304s need)."""
    states: dict[str, PageState] = {}
    for path in paths:
        for r in shards.read_parquet(path).to_pylist():
            url, links = r["url"], tuple(r["links"])
            states[url] = PageState(url, r["etag"], r["last_modified"], r["doc_id"], links)
    return states


def respell(url: str, old: str, new: str) -> str:
    return new + url.removeprefix(old) if url.startswith(old) else url


def _respell_state(state: PageState, old: str, new: str) -> PageState:
    return replace(
        state,
        url=respell(state.url, old, new),
        links=tuple(respell(link, old, new) for link in state.links),
    )


def _states_table(states: list[PageState]) -> pa.Table:
    rows = [
        {
            "url": s.url,
            "etag": s.etag,
            "last_modified": s.last_modified,
            "doc_id": s.doc_id,
            "links": list(s.links),
        }
        for s in sorted(states, key=lambda s: s.url)
    ]
    return pa.Table.from_pylist(rows, schema=STATE_SCHEMA)


def account_refresh(
    previous: list[str], current: list[str], failures: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], Counter[str], pa.Table]:
    """Which earlier documents leave the dataset, and the earlier states the next refresh keeps.

    ``previous`` and ``current`` are the state files of the last crawl and of this one, read a
    part at a time (this crawl's URLs and ids only). A page whose text changed withdraws its old
    document; a page that now fails for good (404, robots.txt, out of scope...) withdraws it as
    gone; a page not reached, or failing for a while (timeout, 5xx), keeps its document and its
    old state (returned, to be written with this crawl's states).
    """
    now = pa.concat_tables(
        [shards.read_parquet(p, ["url", "doc_id"]) for p in current]
        or [STATE_SCHEMA.empty_table().select(["url", "doc_id"])]
    )
    now_urls, now_doc_ids = (now.column(c).combine_chunks() for c in ("url", "doc_id"))
    failed = {f["url"]: f["reason"] for f in failures}
    withdrawn: list[dict[str, Any]] = []
    stats: Counter[str] = Counter()
    kept: list[pa.Table] = []
    for path in previous:
        before = shards.read_parquet(path)
        position = pc.index_in(before.column("url").combine_chunks(), value_set=now_urls)
        now_ids = now_doc_ids.take(position).to_pylist()
        urls, ids = before.column("url").to_pylist(), before.column("doc_id").to_pylist()
        keep: list[int] = []
        for row, (url, doc_id, found, now_id) in enumerate(
            zip(urls, ids, position.to_pylist(), now_ids, strict=True)
        ):
            if found is not None:
                if doc_id and now_id != doc_id:
                    withdrawn.append({"id": doc_id, "url": url, "reason": "changed"})
                continue
            reason = failed.get(url)
            if reason is not None and reason not in TRANSIENT_FAILURES:
                if doc_id:
                    withdrawn.append({"id": doc_id, "url": url, "reason": f"gone_{reason}"})
                continue
            stats["kept_after_fetch_failure" if reason else "not_revisited"] += 1
            keep.append(row)
        kept.append(before.take(pa.array(keep, pa.int64())))
    return withdrawn, stats, pa.concat_tables(kept) if kept else STATE_SCHEMA.empty_table()


class _UnitBatches:
    """The web unit's :class:`~web_crawler.BatchSink`: each batch to the output, its states and
    WARC file to their parts, then (unless the crawl is complete) the checkpoint."""

    def __init__(
        self,
        unit: WorkUnit,
        config: CrawlConfig,
        stage_dir: str,
        output: UnitOutput,
        stored: Callable[[str], str],
        resumed: CrawlCheckpoint | None,
    ) -> None:
        self.unit, self.config, self.stage_dir, self.output = unit, config, stage_dir, output
        self.stored = stored  # a URL as it is kept (pydoc's without its port)
        self.batches = resumed.batches if resumed else 0
        self.docs_in = resumed.done.docs_in if resumed else 0
        self.stats: Counter[str] = Counter(resumed.done.stats if resumed else {})
        self.failures: list[dict[str, Any]] = list(resumed.done.failures) if resumed else []
        self.crawler_stats: dict[str, int] = {}
        self.warc: WarcRecorder | None = None
        self.remove_from(self.batches)
        self._open_warc()

    def _file(self, directory: str, suffix: str, index: int | None) -> str:
        stem = part_name(self.unit.name, index).removesuffix(SHARD_SUFFIX)
        return shards.join(self.stage_dir, directory, stem + suffix)

    def _open_warc(self) -> None:
        if self.config.write_warc:
            self.warc = WarcRecorder(self._file(WARC_DIR, WARC_SUFFIX, self.batches))

    def batch(self, batch: Batch) -> None:
        outcomes, frontier = batch.outcomes, batch.frontier
        for outcome in outcomes:
            if outcome.url:
                outcome.url = self.stored(outcome.url)
        outcomes.sort(key=lambda r: (r.url or "", not isinstance(r, Document)))
        result = documents_result(outcomes, self.output)
        self.docs_in += result.docs_in
        self.stats.update(result.stats)
        self.failures += result.failures
        self.crawler_stats = dict(frontier.stats)
        stored = [
            replace(s, url=self.stored(s.url), links=tuple(map(self.stored, s.links)))
            for s in batch.states
        ]
        part = f"{STATE_DIR}/{part_name(self.unit.name, self.batches)}"
        shards.write_shard(self.stage_dir, part, _states_table(stored))
        if self.warc is not None:
            self.warc.close()
        self.batches += 1
        if batch.complete:
            self.warc = None
            return
        kept, rejected = self.output.flush()
        saved = replace(
            frontier,
            level=list(map(self.stored, frontier.level)),
            found=list(map(self.stored, frontier.found)),
        )
        done = UnitRecord(
            name=self.unit.name,
            key=self.unit.key,
            docs_in=self.docs_in,
            parts=kept,
            rejected=rejected,
            reasons=dict(self.output.reasons),
            stats=dict(self.stats),
            failures=self.failures,
            seconds=0.0,
        )
        checkpoint = CrawlCheckpoint(done, self.batches, saved)
        save_checkpoint(checkpoint_dir(self.stage_dir, self.unit.name), checkpoint, batch.seen)
        self._open_warc()

    def remove_from(self, first: int) -> None:
        """Drop the unit's state parts and WARC files numbered ``first`` on, and any unnumbered
        or unfinished ones: what an earlier run began after its last checkpoint."""
        unit = re.escape(self.unit.name)
        for directory, suffix in ((STATE_DIR, SHARD_SUFFIX), (WARC_DIR, WARC_SUFFIX)):
            folder = shards.join(self.stage_dir, directory)
            pattern = re.compile(unit + r"(\.(\d{5}))?" + re.escape(suffix) + r"(\.tmp-.*)?")
            for name in shards.list_names(folder, ""):
                match = pattern.fullmatch(name)
                if match and (match[2] is None or int(match[2]) >= first or match[3]):
                    shards.remove(shards.join(folder, name))

    def finish(self, carried: pa.Table) -> None:
        """Write the states a refresh keeps from the last crawl; a unit of one batch gets the
        unnumbered names (``_state/web.parquet``, ``warc/web.warc.gz``)."""
        if carried.num_rows:
            part = f"{STATE_DIR}/{part_name(self.unit.name, self.batches)}"
            shards.write_shard(self.stage_dir, part, carried.sort_by("url"))
            states = self.batches + 1
        else:
            states = self.batches
        for directory, suffix, count in (
            (STATE_DIR, SHARD_SUFFIX, states),
            (WARC_DIR, WARC_SUFFIX, self.batches if self.config.write_warc else 0),
        ):
            if count == 1:
                fs, first = shards.filesystem(self._file(directory, suffix, 0))
                fs.mv(first, shards.filesystem(self._file(directory, suffix, None))[1])


def crawl_web_unit(
    unit: WorkUnit,
    config: CrawlConfig,
    stage_dir: str,
    extractor: BoundedExtractor,
    on_page: Callable[[], None],
    output: UnitOutput,
    seeds: list[str],
    site: str,
    pydoc_seed: str,
) -> tuple[ShardResult, list[dict[str, Any]]]:
    """Crawl the unit's ``seeds`` (with credentials; pydoc's already respelled to ``site``),
    resuming from its checkpoint when one was made for this unit key; (result, withdrawn).

    ``site`` is the pydoc server's URL this run (``""`` when none): its pages are kept as
    ``pydoc:<path>`` (``pydoc_seed``), so ids, states and checkpoints do not depend on the port.
    """

    def stored(url: str) -> str:
        return respell(url, site, pydoc_seed) if site else url

    def live(url: str) -> str:
        return respell(url, pydoc_seed, site) if site else url

    checkpoints = checkpoint_dir(stage_dir, unit.name)
    loaded = load_checkpoint(checkpoints, unit.key, stored)
    if loaded is not None:
        parts = loaded[0].done.parts + loaded[0].done.rejected
        if not all(shards.exists(shards.join(stage_dir, p.path)) for p in parts):
            loaded = None  # its parts are gone: start afresh
    resume = None
    if loaded is not None:
        checkpoint, seen = loaded
        output.resume(checkpoint.done.parts, checkpoint.done.rejected, checkpoint.done.reasons)
        frontier = replace(
            checkpoint.frontier,
            level=list(map(live, checkpoint.frontier.level)),
            found=list(map(live, checkpoint.frontier.found)),
        )
        resume = (frontier, seen)
    else:
        remove_checkpoint(checkpoints)
    sink = _UnitBatches(unit, config, stage_dir, output, stored, loaded[0] if loaded else None)
    previous_paths: list[str] = unit.source.get("previous_states", [])
    previous = read_states(previous_paths)
    if site:
        previous = {live(url): _respell_state(s, pydoc_seed, site) for url, s in previous.items()}
    index, count = unit.source.get("partition", (0, 1))
    try:
        crawl_web(
            seeds,
            config,
            extractor,
            sink,
            on_page=on_page,
            previous=previous,
            kept_as=stored,
            partition=(int(index), int(count)),
            resume=resume,
        )
    except BaseException:
        if sink.warc is not None:
            sink.warc.abort()  # the WARC of a batch no checkpoint covers
        raise
    del previous
    current = state_parts(stage_dir, unit.name)
    withdrawn, refresh_stats, carried = account_refresh(previous_paths, current, sink.failures)
    sink.finish(carried)
    sink.failures.sort(key=lambda f: (f["url"], f["reason"]))
    stats = sink.stats + refresh_stats + Counter(sink.crawler_stats)
    result = ShardResult(
        kept=DOCUMENT_SCHEMA.empty_table(),
        rejected=rejected_schema(DOCUMENT_SCHEMA).empty_table(),
        docs_in=sink.docs_in,
        stats=stats,
        failures=sink.failures,
    )
    return result, withdrawn
