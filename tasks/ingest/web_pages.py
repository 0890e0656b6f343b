"""What a fetched page becomes: its outcome (a document, a rejection, a failure or Unchanged)
and the links it adds to the frontier, with what a refresh remembers of it.

A refresh passes what the last crawl saw of each page (:class:`PageState`): its ETag and
Last-Modified go out as If-None-Match / If-Modified-Since, a 304 answer reuses the page's stored
links (so the crawl still reaches what it links to), and a page whose extracted text is unchanged
gives :class:`Unchanged` instead of a document. Text and links are extracted in the bounded
workers, so a hostile page costs at most the extraction's CPU budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TypeAlias

import httpx

from llmflow.tasks.core.documents import Document, FetchFailure, Unchanged, document_id
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.ingest.html_text import ExtractionError
from llmflow.tasks.ingest.page_decoding import DecodeError, decode_body
from llmflow.tasks.ingest.web_fetcher import Response
from llmflow.tasks.ingest.web_scope import normalize_url

__all__ = ["Outcome", "PageOutcomes", "PageState"]

Outcome: TypeAlias = Document | FetchFailure | Unchanged

SOURCE = "http"


@dataclass(frozen=True, slots=True)
class PageState:
    """What a crawl remembers of a page for the next refresh: the validators its server sent,
    the document it gave (None when it gave none that was kept) and the in-scope links on it."""

    url: str
    etag: str | None = None
    last_modified: str | None = None
    doc_id: str | None = None
    links: tuple[str, ...] = field(default=())


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


class PageOutcomes:
    """Turns fetched pages into outcomes and frontier links, and records each page's state.

    ``wanted`` says whether a link joins the frontier (the crawl's scope and exclusions);
    ``kept_as`` gives the URL a page's document will be kept under (its id depends on it).
    """

    def __init__(
        self,
        config: CrawlConfig,
        extractor: BoundedExtractor,
        previous: Mapping[str, PageState],
        states: dict[str, PageState],
        kept_as: Callable[[str], str],
        wanted: Callable[[str], bool],
    ) -> None:
        self.config = config
        self.extractor = extractor
        self.previous = previous
        self.states = states
        self.kept_as = kept_as
        self.wanted = wanted
        self.content_types = {t.strip().lower() for t in config.content_types}

    def validators(self, url: str) -> dict[str, str]:
        """The conditional-request headers for a page the last crawl saw (RFC 9110 §13.1)."""
        state = self.previous.get(url)
        headers: dict[str, str] = {}
        if state is not None and state.etag:
            headers["If-None-Match"] = state.etag
        if state is not None and state.last_modified:
            headers["If-Modified-Since"] = state.last_modified
        return headers

    def read_body(self, status: int, headers: httpx.Headers) -> bool:
        """Skip the body of a page whose type is refused: an image is never downloaded."""
        if 200 <= status < 300:
            return _media_type(headers.get("content-type")) in self.content_types
        return True

    async def outcome(self, response: Response, depth: int) -> tuple[Outcome, list[str]]:
        """The page's outcome, remembered for the next refresh; Unchanged when it has not."""
        previous = self.previous.get(response.url)
        etag, modified = response.headers.get("etag"), response.headers.get("last-modified")
        if response.status == 304 and previous is not None:
            self.states[response.url] = replace(
                previous,
                etag=etag or previous.etag,
                last_modified=modified or previous.last_modified,
            )
            links = self._frontier_links(list(previous.links))
            unchanged = Unchanged(response.url, "not_modified", previous.doc_id)
            return unchanged, links if depth < self.config.max_depth else []
        outcome, links = await self._page(response)
        if not isinstance(outcome, Document):
            return outcome, []
        kept_url = self.kept_as(response.url)
        doc_id = None if outcome.reject_reason else document_id(kept_url, outcome.text)
        self.states[response.url] = PageState(response.url, etag, modified, doc_id, tuple(links))
        links = links if depth < self.config.max_depth else []
        if previous is not None and doc_id is not None and doc_id == previous.doc_id:
            return Unchanged(response.url, "same_content", doc_id), links
        return outcome, links

    async def _page(self, response: Response) -> tuple[Document | FetchFailure, list[str]]:
        """A fetched page's document (or why it gave none) and every in-scope link on it."""
        status = response.status
        if not 200 <= status < 300:
            return FetchFailure(response.url, f"http_{status // 100}xx", "", status), []
        content_type = response.headers.get("content-type")
        media = _media_type(content_type)
        if media not in self.content_types:
            return FetchFailure(
                response.url, "content_type_not_allowed", media or "no Content-Type", status
            ), []

        def document(text: str, reject: str | None = None, detail: str = "") -> Document:
            return Document(
                url=response.url,
                text=text,
                source=SOURCE,
                fetched_at=response.fetched_at,
                reject_reason=reject,
                detail=detail,
            )

        if response.oversize:
            return document("", "oversize", f"body over {self.config.max_page_bytes} bytes"), []
        if response.undecodable:
            return document("", "undecodable", response.undecodable), []
        try:
            text, _charset = decode_body(response.body, content_type)
        except DecodeError as e:
            return document("", e.reason, str(e)), []
        if "html" not in media:
            return (document(text) if text.strip() else document("", "empty")), []
        # Links and text both come from the bounded worker: a hostile page costs at most the
        # extraction's CPU budget. Links are kept even when the page's own text is rejected (a hub
        # page with no prose still leads to pages that have some), and at any depth (a refresh
        # may reach the page from higher up).
        try:
            extracted, found = await asyncio.to_thread(
                self.extractor.extract_with_links, text, response.url
            )
        except ExtractionError as e:
            return document("", e.reason, e.detail), self._frontier_links(e.links)
        links = self._frontier_links(found)
        if not extracted.strip():
            return document("", "empty"), links
        return document(extracted), links

    def _frontier_links(self, found: list[str]) -> list[str]:
        links: list[str] = []
        for link in found:
            try:
                url = normalize_url(link)
            except ValueError:
                continue
            if self.wanted(url):
                links.append(url)
        return links
