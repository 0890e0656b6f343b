"""The HTTP crawler: a polite, bounded breadth-first crawl that accounts for every URL it tries.

Each URL tried ends as exactly one outcome: a :class:`Document` (kept, or rejected with a reason)
or a :class:`FetchFailure`. The crawl is level by level (BFS), and within a level the frontier
keeps the order links were found in, so the same site crawled twice tries the same URLs even when
``max_pages`` cuts it short; the result is sorted by URL for the same reason.

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
second with :class:`CrawlInterrupted`, in a worker thread too.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from urllib.parse import urljoin

from llmflow.tasks.core.documents import Document, FetchFailure
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
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
from llmflow.tasks.ingest.web_scope import Scope, normalize_url, origin_of

__all__ = ["crawl_web"]

# How often a running crawl looks for an interrupt (Ctrl-C, stop_crawls()).
INTERRUPT_POLL_S = 0.1


class _Crawler:
    def __init__(
        self,
        config: CrawlConfig,
        extractor: BoundedExtractor,
        warc: WarcRecorder | None,
        on_page: Callable[[], None] | None,
        previous: Mapping[str, PageState],
        states: dict[str, PageState],
        kept_as: Callable[[str], str],
    ) -> None:
        self.config = config
        self.previous = previous
        self.on_page = on_page
        self.exclude = [re.compile(p) for p in config.exclude_patterns]
        self.pages = 0
        self.seen: set[str] = set()
        self.fetcher = Fetcher(config, warc, self._refusal)
        self.page_outcomes = PageOutcomes(
            config, extractor, previous, states, kept_as, self._wanted
        )
        self.interrupted = False
        self.scope: Scope

    async def run_interruptible(self, seeds: list[str]) -> list[Outcome]:
        """:meth:`run`, cancelled within INTERRUPT_POLL_S of an interrupt (``self.interrupted``).

        Cancelling closes every connection in flight; an extraction already handed to the
        worker finishes first (bounded by extract_cpu_s), as asyncio waits for its thread.
        """
        start = interrupt_count()
        crawl = asyncio.create_task(self.run(seeds))
        while not crawl.done():
            await asyncio.wait([crawl], timeout=INTERRUPT_POLL_S)
            if interrupt_count() != start and not crawl.done():
                self.interrupted = True
                crawl.cancel()
                with suppress(asyncio.CancelledError):
                    await crawl
                return []
        return crawl.result()

    async def run(self, seeds: list[str]) -> list[Outcome]:
        results: list[Outcome] = []
        level: list[str] = []
        for seed in seeds:
            credentials = seed_credentials(seed)
            try:
                url = normalize_url(redact_url(seed))
            except ValueError as e:
                results.append(FetchFailure(redact_url(seed), "invalid_url", str(e)))
                continue
            if credentials is not None:
                self.fetcher.credentials[origin_of(url)] = credentials
            if url not in self.seen:
                self.seen.add(url)
                level.append(url)
        self.scope = Scope(self.config.allowed_prefixes, level)
        async with self.fetcher.session():
            depth = 0
            while level and self.pages < self.config.max_pages:
                found = await self._crawl_level(level, depth, results)
                level = []
                for link in found:
                    if link not in self.seen:
                        self.seen.add(link)
                        level.append(link)
                depth += 1
            # Pages the last crawl saw that nothing links to now: asked again (their links not
            # followed), so one that is gone leaves the dataset and one that is not stays.
            orphans = [url for url in sorted(self.previous) if url not in self.seen]
            self.seen.update(orphans)
            await self._crawl_level(orphans, self.config.max_depth, results)
        return results

    async def _crawl_level(self, level: list[str], depth: int, results: list[Outcome]) -> list[str]:
        """Visit one level's URLs while pages are left; the links found, in order."""
        found: list[str] = []
        start = 0
        while start < len(level) and self.pages < self.config.max_pages:
            # Never more URLs in flight than pages left, so max_pages is exact.
            batch = level[start : start + self.config.max_pages - self.pages]
            start += len(batch)
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._visit(url, depth)) for url in batch]
            except ExceptionGroup as group_error:
                # A bug or a failing on_page: the caller sees that error, not a group.
                raise group_error.exceptions[0] from group_error
            for task in tasks:
                outcome, links = task.result()
                results.append(outcome)
                found.extend(links)
        return found

    def _refusal(self, url: str) -> str | None:
        if not self.scope.allows(url):
            return "out_of_scope"
        if any(pattern.search(url) for pattern in self.exclude):
            return "excluded"
        return None

    def _wanted(self, url: str) -> bool:
        """Whether a link found on a page joins the frontier (never requested otherwise)."""
        return self._refusal(url) is None

    async def _visit(self, url: str, depth: int) -> tuple[Outcome, list[str]]:
        outcome, links, requested = await self._follow(url, depth)
        if requested:
            self.pages += 1
            if self.on_page is not None:
                self.on_page()
        return outcome, links

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
            chain.append(target)
            current = target
        outcome, links = await self.page_outcomes.outcome(response, depth)
        if isinstance(outcome, FetchFailure):
            outcome = failure(outcome.reason, outcome.detail, outcome.status)
        return outcome, links, True


def crawl_web(
    seeds: list[str],
    config: CrawlConfig,
    extractor: BoundedExtractor,
    warc: WarcRecorder | None = None,
    on_page: Callable[[], None] | None = None,
    previous: Mapping[str, PageState] | None = None,
    states: dict[str, PageState] | None = None,
    kept_as: Callable[[str], str] | None = None,
) -> list[Outcome]:
    """Crawl from ``seeds`` and return one outcome per URL tried, sorted by URL.

    ``previous`` (a refresh: what the last crawl saw, by URL) turns on conditional requests and
    :class:`Unchanged` outcomes; ``states``, when given, receives what this crawl saw of every
    page it fetched, for the next refresh. ``kept_as`` gives the URL a page's document will be
    kept under, when the caller renames URLs (its id, and so "same content", depends on it).

    Documents carry their final URL (after redirects); failures the URL that was tried.
    ``on_page`` is called once per URL that cost at least one request (what ``max_pages``
    counts); robots.txt fetches are not counted, but they are spaced like any request and kept in
    the WARC. Runs its own event loop, in a helper thread when the caller is inside one already.

    Raises :class:`CrawlInterrupted` (a KeyboardInterrupt) when interrupted, returning nothing:
    the caller writes no output that would look complete, and a re-run does the crawl again.
    """
    if threading.current_thread() is threading.main_thread():
        install_interrupt_handler()
    crawler = _Crawler(
        config,
        extractor,
        warc,
        on_page,
        previous or {},
        states if states is not None else {},
        kept_as or (lambda url: url),
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        results = asyncio.run(crawler.run_interruptible(seeds))
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="crawl_web") as pool:
            results = pool.submit(asyncio.run, crawler.run_interruptible(seeds)).result()
    if crawler.interrupted:
        raise CrawlInterrupted(f"crawl interrupted after {crawler.pages} pages")
    return sorted(results, key=lambda r: (r.url or "", not isinstance(r, Document)))
