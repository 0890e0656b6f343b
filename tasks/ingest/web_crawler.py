"""The HTTP crawler: a polite, bounded breadth-first crawl that accounts for every URL it tries.

Each URL tried ends as exactly one outcome: a :class:`Document` (kept, or rejected with a reason)
or a :class:`FetchFailure`. The crawl is level by level (BFS), and within a level the frontier
keeps the order links were found in, so the same site crawled twice tries the same URLs even when
``max_pages`` cuts it short.

Outcomes go to a :class:`BatchSink` a batch at a time: every ``checkpoint_pages`` pages the
crawl hands over the batch's outcomes, the page states it saw, the frontier and the seen set,
and the sink (the crawl stage) writes them and a checkpoint; a crawl started from that frontier
(``resume``) goes on where it stopped. So memory holds one batch, the frontier and the seen set
(digests, :mod:`crawl_checkpoint`), however large the crawl. With ``partition`` (``i`` of ``n``)
the crawl keeps to the hosts whose hash falls in ``i`` (:func:`web_scope.host_partition`): a link
to another partition's host is counted (``links_to_other_partition``, once per URL) and left to
that partition, a redirect there fails as ``other_partition``.

Redirects are followed by hand so that every hop passes the same scope, exclusion and robots
checks as a link would. On a refresh, pages the last crawl saw that no link reaches any more are
asked for after the breadth-first crawl, so a page that is gone is noticed.

This module holds the frontier and its scheduling; the other parts of a crawl are beside it:
URL spelling and scope in :mod:`web_scope`, requests, politeness and robots.txt in
:mod:`web_fetcher`, what a page becomes (and what a refresh remembers of it) in :mod:`web_pages`.

Every request (robots.txt and its redirects included) passes the scope check, and with
``allow_private_addresses`` off the address check at connect time (:mod:`crawl_guards`). Seed
credentials are used for their origin's requests and stored nowhere: URLs are kept without
userinfo. Ctrl-C (or :func:`crawl_guards.stop_crawls`) stops a crawl within a fraction of a
second, in a worker thread too: the pages whose outcome is known go to the sink as a last batch
with the frontier left, then :class:`CrawlInterrupted` is raised.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urljoin

from llmflow.tasks.core.documents import FetchFailure
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_checkpoint import Frontier, SeenSet
from llmflow.tasks.ingest.crawl_config import CrawlConfig, redact_url
from llmflow.tasks.ingest.crawl_guards import (
    CrawlInterrupted,
    install_interrupt_handler,
    interrupt_count,
    seed_credentials,
)
from llmflow.tasks.ingest.warc_writer import WarcRecorder
from llmflow.tasks.ingest.web_fetcher import Failed, Fetcher
from llmflow.tasks.ingest.web_pages import Outcome, PageOutcomes, PageState
from llmflow.tasks.ingest.web_scope import Scope, host_partition, normalize_url, origin_of

__all__ = ["Batch", "BatchSink", "crawl_web"]

# How often a running crawl looks for an interrupt (Ctrl-C, stop_crawls()).
INTERRUPT_POLL_S = 0.1
# URLs whose refusal (scope, exclusions, partition) is remembered: a site's pages repeat the same
# navigation links, and checking every link of every page was a third of the crawling process's
# CPU on rust-doc. Bounded, so memory does not grow with the crawl.
REFUSAL_CACHE = 1 << 14
OTHER_PARTITION = "other_partition"


@dataclass
class Batch:
    """One batch of a crawl: its outcomes (in the order tried), the states of the pages it
    fetched, the frontier after it and the seen set; ``complete`` says the crawl is over (else
    it was checkpointed or interrupted, and ``frontier`` is where to resume)."""

    outcomes: list[Outcome]
    states: list[PageState]
    frontier: Frontier
    seen: SeenSet
    complete: bool


class BatchSink(Protocol):
    """Where a crawl's batches go: the crawl stage's unit (:mod:`web_unit`), or a test's list.

    ``warc`` is the recorder the batch's responses go to; the crawl reads it again after each
    batch, so a sink may start a file per batch.
    """

    warc: WarcRecorder | None

    def batch(self, batch: Batch) -> None: ...


class _Crawler:
    def __init__(
        self,
        config: CrawlConfig,
        extractor: BoundedExtractor,
        sink: BatchSink,
        on_page: Callable[[], None] | None,
        previous: Mapping[str, PageState],
        kept_as: Callable[[str], str],
        partition: tuple[int, int],
    ) -> None:
        self.config = config
        self.sink = sink
        self.previous = previous
        self.on_page = on_page
        self.partition = partition
        self.kept_as = kept_as
        self.exclude = [re.compile(p) for p in config.exclude_patterns]
        self.frontier = Frontier()
        self.position = 0  # the next URL of frontier.level to try
        self.found: set[str] = set()  # frontier.found, for lookups
        self.seen = SeenSet(kept_as)
        # The batch so far: its outcomes, the pages it fetched, the states they left.
        self.outcomes: list[Outcome] = []
        self.batch_pages = 0
        self.states: dict[str, PageState] = {}
        # Redirect targets a visit put in the seen set: taken back when the visit is.
        self.claimed: dict[str, list[str]] = {}
        # A pure function of the URL once start() has set the scope.
        self._refusal = functools.lru_cache(maxsize=REFUSAL_CACHE)(self._refusal_of)
        self.fetcher = Fetcher(config, sink.warc, self._refusal)
        self.page_outcomes = PageOutcomes(
            config, extractor, previous, self.states, kept_as, self._wanted
        )
        self.interrupted = False
        self.scope: Scope

    def start(self, seeds: list[str], resume: tuple[Frontier, SeenSet] | None) -> None:
        """The scope (every seed's, whichever partition owns it) and the first level: this
        partition's seeds, or the frontier a checkpoint saved."""
        urls: list[str] = []
        for seed in seeds:
            credentials = seed_credentials(seed)
            try:
                url = normalize_url(redact_url(seed))
            except ValueError as e:
                if resume is None and self.partition[0] == 0:
                    self.outcomes.append(FetchFailure(redact_url(seed), "invalid_url", str(e)))
                continue
            if credentials is not None:
                self.fetcher.credentials[origin_of(url)] = credentials
            urls.append(url)
        self.scope = Scope(self.config.allowed_prefixes, urls)
        if resume is not None:
            self.frontier, self.seen = resume
            self.found = set(self.frontier.found)
            return
        for url in urls:
            if self._owns(url) and url not in self.seen:
                self.seen.add(url)
                self.frontier.level.append(url)

    async def run_interruptible(self) -> None:
        """:meth:`run`, cancelled within INTERRUPT_POLL_S of an interrupt (``self.interrupted``).

        Cancelling closes every connection in flight; an extraction already handed to the
        worker finishes first (bounded by extract_cpu_s), as asyncio waits for its thread.
        """
        start = interrupt_count()
        crawl = asyncio.create_task(self.run())
        while not crawl.done():
            await asyncio.wait([crawl], timeout=INTERRUPT_POLL_S)
            if interrupt_count() != start and not crawl.done():
                self.interrupted = True
                crawl.cancel()
                with suppress(asyncio.CancelledError):
                    await crawl
                return
        crawl.result()

    async def run(self) -> None:
        """Level by level while pages are left, a checkpoint every ``checkpoint_pages`` pages;
        then the orphans of a refresh."""
        f, config = self.frontier, self.config
        async with self.fetcher.session():
            while True:
                if self.position < len(f.level) and f.pages < config.max_pages:
                    await self._crawl_some()
                    if self.batch_pages >= config.checkpoint_pages:
                        self.save(complete=False)
                elif f.phase == "links" and f.found and f.pages < config.max_pages:
                    level = [url for url in f.found if url not in self.seen]
                    self.seen.update(level)
                    self._next_level(level, f.depth + 1)
                elif f.phase == "links":
                    # Pages the last crawl saw that nothing links to now: asked again (their
                    # links not followed), so one that is gone leaves the dataset and one that
                    # is not stays.
                    orphans = [url for url in sorted(self.previous) if url not in self.seen]
                    self.seen.update(orphans)
                    f.phase = "orphans"
                    self._next_level(orphans, config.max_depth)
                else:
                    return

    def _next_level(self, level: list[str], depth: int) -> None:
        f = self.frontier
        f.level, f.found, f.depth = level, [], depth
        self.position, self.found = 0, set()
        self.seen.compact()

    async def _crawl_some(self) -> None:
        """Visit the next URLs of the level: at most the pages left, in this batch and in all.

        On an interrupt the visits that finished, up to the first that did not, join the batch
        (their links in order, so the next level is the same as an uninterrupted crawl's); the
        rest are taken back and tried again on resume."""
        f = self.frontier
        room = min(self.config.max_pages - f.pages, self.config.checkpoint_pages - self.batch_pages)
        urls = f.level[self.position : self.position + room]
        tasks: list[asyncio.Task[tuple[Outcome, list[str], bool]]] = []
        try:
            async with asyncio.TaskGroup() as group:
                tasks += [group.create_task(self._visit(url, f.depth)) for url in urls]
        except ExceptionGroup as group_error:
            # A bug or a failing on_page: the caller sees that error, not a group.
            raise group_error.exceptions[0] from group_error
        except asyncio.CancelledError:
            finished = 0
            while finished < len(tasks) and _succeeded(tasks[finished]):
                finished += 1
            for url, task in zip(urls[finished:], tasks[finished:], strict=False):
                for target in self.claimed.pop(url, []):
                    self.seen.discard(target)
                if _succeeded(task):
                    self.states.pop(task.result()[0].url or "", None)
            self._take(urls[:finished], tasks[:finished])
            raise
        self._take(urls, tasks)

    def _take(
        self, urls: list[str], tasks: list[asyncio.Task[tuple[Outcome, list[str], bool]]]
    ) -> None:
        f = self.frontier
        for url, task in zip(urls, tasks, strict=True):
            outcome, links, requested = task.result()
            self.claimed.pop(url, None)
            self.outcomes.append(outcome)
            f.pages += requested
            self.batch_pages += requested
            for link in links:
                if link not in self.found and link not in self.seen:
                    self.found.add(link)
                    f.found.append(link)
        self.position += len(urls)

    def save(self, complete: bool) -> None:
        """Hand the batch to the sink with the frontier left; the next batch starts empty."""
        f = self.frontier
        f.level, self.position = f.level[self.position :], 0
        self.seen.compact()
        outcomes, states = self.outcomes, list(self.states.values())
        self.outcomes, self.batch_pages = [], 0
        self.states.clear()
        self.sink.batch(Batch(outcomes, states, f, self.seen, complete))
        self.fetcher.warc = self.sink.warc

    def _owns(self, url: str) -> bool:
        """Whether this partition owns the URL's host (as kept: pydoc's site is ``pydoc:``)."""
        index, count = self.partition
        return count == 1 or host_partition(self.kept_as(url), count) == index

    def _refusal_of(self, url: str) -> str | None:
        if not self.scope.allows(url):
            return "out_of_scope"
        if any(pattern.search(url) for pattern in self.exclude):
            return "excluded"
        if not self._owns(url):
            return OTHER_PARTITION
        return None

    def _wanted(self, url: str) -> bool:
        """Whether a link found on a page joins the frontier (never requested otherwise)."""
        refusal = self._refusal(url)
        if refusal == OTHER_PARTITION and url not in self.seen:
            # Left to the partition that owns its host, counted once.
            self.seen.add(url)
            stats = self.frontier.stats
            stats["links_to_other_partition"] = stats.get("links_to_other_partition", 0) + 1
        return refusal is None

    async def _visit(self, url: str, depth: int) -> tuple[Outcome, list[str], bool]:
        outcome, links, requested = await self._follow(url, depth)
        if requested and self.on_page is not None:
            self.on_page()
        return outcome, links, requested

    async def _follow(self, origin: str, depth: int) -> tuple[Outcome, list[str], bool]:
        """Fetch ``origin`` and its redirect hops; (outcome, links found, whether it requested)."""
        chain = [origin]
        current = origin
        requested = False

        def failure(reason: str, detail: str = "", status: int | None = None) -> FetchFailure:
            if current != origin:
                detail = f"{detail} (after redirects to {current})".strip()
            return FetchFailure(origin, reason, detail, status)

        while True:
            refusal = self._refusal(current)
            if refusal is not None:
                return failure(refusal, current), [], requested
            if self.config.respect_robots_txt:
                robots = await self.fetcher.robots_for(current)
                if not robots.allows(current, self.config.user_agent):
                    return failure(robots.reason, robots.detail), [], requested
            response = await self.fetcher.fetch(
                current,
                self.config.max_page_bytes,
                self.page_outcomes.read_body,
                self.page_outcomes.validators(current),
            )
            requested = True
            if isinstance(response, Failed):
                return failure(response.reason, response.detail, response.status), [], True
            location = response.headers.get("location")
            if not (300 <= response.status < 400 and location):
                break
            try:
                target = normalize_url(urljoin(current, location.strip()))
            except ValueError as e:
                return failure("invalid_redirect", str(e), response.status), [], True
            if target in chain:
                loop = " -> ".join([*chain, target])
                return FetchFailure(origin, "redirect_loop", loop, response.status), [], True
            if len(chain) > self.config.max_redirects:
                return failure("too_many_redirects", f"next: {target}", response.status), [], True
            refusal = self._refusal(target)
            if refusal is not None:
                return failure(refusal, f"redirect to {target}", response.status), [], True
            if target in self.seen:
                # Its page is fetched under its own URL; this one adds no second document.
                return failure("duplicate", f"redirect to {target}", response.status), [], True
            self.seen.add(target)
            self.claimed.setdefault(origin, []).append(target)
            chain.append(target)
            current = target
        outcome, links = await self.page_outcomes.outcome(response, depth)
        if isinstance(outcome, FetchFailure):
            outcome = failure(outcome.reason, outcome.detail, outcome.status)
        return outcome, links, True


def _succeeded(task: asyncio.Task[tuple[Outcome, list[str], bool]]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def crawl_web(
    seeds: list[str],
    config: CrawlConfig,
    extractor: BoundedExtractor,
    sink: BatchSink,
    *,
    on_page: Callable[[], None] | None = None,
    previous: Mapping[str, PageState] | None = None,
    kept_as: Callable[[str], str] | None = None,
    partition: tuple[int, int] = (0, 1),
    resume: tuple[Frontier, SeenSet] | None = None,
) -> None:
    """Crawl from ``seeds`` (or from ``resume``, a checkpoint's frontier and seen set) and hand
    every outcome to ``sink``, one batch of at most ``checkpoint_pages`` pages at a time.

    Each URL tried gives one outcome; a batch's are in the order tried (the sink sorts them).
    ``previous`` (a refresh: what the last crawl saw, by URL) turns on conditional requests and
    :class:`Unchanged` outcomes; the sink receives what this crawl saw of every page it
    fetched, for the next refresh. ``kept_as`` gives the URL a page's document will be kept
    under, when the caller renames URLs (its id, and the seen set, depend on it). ``partition``
    (index, count) keeps the crawl to the hosts that partition owns.

    Documents carry their final URL (after redirects); failures the URL that was tried.
    ``on_page`` is called once per URL that cost at least one request (what ``max_pages``
    counts); robots.txt fetches are not counted, but they are spaced like any request and kept in
    the WARC. Runs its own event loop, in a helper thread when the caller is inside one already.

    Raises :class:`CrawlInterrupted` (a KeyboardInterrupt) when interrupted, after handing the
    sink the pages whose outcome is known and the frontier to resume from.
    """
    if threading.current_thread() is threading.main_thread():
        install_interrupt_handler()
    crawler = _Crawler(
        config,
        extractor,
        sink,
        on_page,
        previous or {},
        kept_as or (lambda url: url),
        partition,
    )
    crawler.start(seeds, resume)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(crawler.run_interruptible())
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crawl_web") as pool:
            pool.submit(asyncio.run, crawler.run_interruptible()).result()
    crawler.save(complete=not crawler.interrupted)
    if crawler.interrupted:
        raise CrawlInterrupted(f"crawl interrupted after {crawler.frontier.pages} pages")
