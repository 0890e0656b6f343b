"""The HTTP crawler against a real local web site (tests/http_test_site.py, run as a subprocess).

The site logs every request it receives; each crawl here uses a User-Agent of its own, so a test
can check from the server's side what was (and was never) requested, and when.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from warcio.archiveiterator import ArchiveIterator

from llmflow.tasks.core.documents import Document, FetchFailure
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.ingest.warc_writer import WarcRecorder
from llmflow.tasks.ingest.web_crawler import Batch, crawl_web
from llmflow.tasks.ingest.web_pages import PageState
from llmflow.tasks.ingest.web_scope import normalize_url

SITE_PROGRAM = Path(__file__).with_name("http_test_site.py")
sys.path.insert(0, str(SITE_PROGRAM.parent))
import http_test_site  # noqa: E402  (the site's fixed texts, to compare against)
from conftest import stop_process  # noqa: E402

Outcome = Document | FetchFailure


@dataclass
class Site:
    ports: dict[str, int]

    def url(self, path: str, site: str = "main") -> str:
        return f"http://127.0.0.1:{self.ports[site]}{path}"

    def log(self, user_agent: str, site: str | None = None) -> list[dict]:
        with urllib.request.urlopen(self.url("/_log"), timeout=5) as response:
            entries = json.load(response)
        return [
            e
            for e in entries
            if e["user_agent"] == user_agent and (site is None or e["site"] == site)
        ]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    folder = tmp_path_factory.mktemp("http-site")
    portfile = folder / "ports.json"
    with open(folder / "server.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, str(SITE_PROGRAM), "--port", "0", "--portfile", str(portfile)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 15
        while not portfile.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"test site did not start: {(folder / 'server.log').read_text()}"
                )
            time.sleep(0.05)
        yield Site(json.loads(portfile.read_text()))
    finally:
        stop_process(process)


@pytest.fixture(scope="module")
def extractor() -> Iterator[BoundedExtractor]:
    with BoundedExtractor(cpu_s=20.0) as bounded:
        yield bounded


def config(name: str, **overrides: object) -> CrawlConfig:
    """Small delays and timeouts keep the module fast; the agent names this crawl in the log."""
    values: dict[str, object] = {
        "user_agent": f"llmflow-test/{name}",
        "politeness_delay_s": 0.0,
        "concurrency": 4,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 0.5,
        "retries": 1,
        "retry_backoff_s": 0.05,
        "max_page_bytes": 100_000,
        "max_redirects": 3,
        "exclude_patterns": [r"/excluded/"],
    }
    values.update(overrides)
    return CrawlConfig(**values)


class Collected:
    """A crawl's batches kept in memory (the crawl stage writes them to disk instead)."""

    def __init__(self, warc: WarcRecorder | None = None) -> None:
        self.warc = warc
        self.outcomes: list[Outcome] = []
        self.states: list[PageState] = []
        self.batches: list[int] = []  # outcomes per batch
        self.complete = False

    def batch(self, batch: Batch) -> None:
        self.outcomes += batch.outcomes
        self.states += batch.states
        self.batches.append(len(batch.outcomes))
        self.complete = batch.complete


def crawl(
    seeds: list[str],
    cfg: CrawlConfig,
    bounded: BoundedExtractor,
    warc: WarcRecorder | None = None,
    **options: Any,
) -> list[Outcome]:
    """Every outcome of a crawl, sorted by URL (documents before failures of one URL)."""
    sink = Collected(warc)
    crawl_web(seeds, cfg, bounded, sink, **options)
    assert sink.complete
    return sorted(sink.outcomes, key=lambda r: (r.url or "", not isinstance(r, Document)))


def by_url(outcomes: list[Outcome]) -> dict[str, Outcome]:
    table: dict[str, Outcome] = {}
    for outcome in outcomes:
        assert outcome.url not in table, f"two outcomes for {outcome.url}"
        table[outcome.url] = outcome
    return table


@dataclass
class MainCrawl:
    outcomes: list[Outcome]
    table: dict[str, Outcome]
    agent: str
    warc: Path
    pages_reported: int
    seconds: float


@pytest.fixture(scope="module")
def main_crawl(
    site: Site, extractor: BoundedExtractor, tmp_path_factory: pytest.TempPathFactory
) -> MainCrawl:
    """One crawl of the main site's index, which links to every scenario."""
    cfg = config("main")
    warc_path = tmp_path_factory.mktemp("warc") / "crawl" / "main.warc.gz"
    ticks: list[None] = []
    started = time.monotonic()
    with WarcRecorder(str(warc_path)) as warc:
        outcomes = crawl(
            [site.url("/")], cfg, extractor, warc=warc, on_page=lambda: ticks.append(None)
        )
    seconds = time.monotonic() - started
    return MainCrawl(outcomes, by_url(outcomes), cfg.user_agent, warc_path, len(ticks), seconds)


def paths(entries: list[dict]) -> list[str]:
    return [e["path"] for e in entries]


# --------------------------------------------------------------------------- normalize_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("HTTP://Example.COM/a", "http://example.com/a"),
        ("http://example.com", "http://example.com/"),
        ("http://example.com:80/a", "http://example.com/a"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("https://example.com:80/a", "https://example.com:80/a"),
        ("http://example.com/a#frag", "http://example.com/a"),
        ("http://example.com/./a", "http://example.com/a"),
        ("http://example.com/b/../a", "http://example.com/a"),
        ("http://example.com/a/b/..", "http://example.com/a/"),
        ("http://example.com/../../a", "http://example.com/a"),
        ("http://example.com/%7euser/%41", "http://example.com/~user/A"),
        ("http://example.com/a%2fb", "http://example.com/a%2Fb"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/caf\u00e9", "http://example.com/caf%C3%A9"),
        ("http://example.com/100%", "http://example.com/100%25"),
        ("http://example.com/%4g%4", "http://example.com/%254g%254"),
        ("http://example.com/\U0001f600", "http://example.com/%F0%9F%98%80"),
        (
            "https://play.example/?code=%23!%5b%0Afn%20main()%7B%7d&edition=2021",
            "https://play.example/?code=%23!%5B%0Afn%20main()%7B%7D&edition=2021",
        ),
        ("http://example.com/?b=2&a=1&b=1", "http://example.com/?b=2&a=1&b=1"),
        ("http://example.com/p?q=%2f", "http://example.com/p?q=%2F"),
        ("http://example.com/p?", "http://example.com/p"),
        ("http://B\u00fccher.example/", "http://xn--bcher-kva.example/"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected
    assert normalize_url(expected) == expected  # idempotent


@pytest.mark.parametrize("url", ["/relative", "mailto:a@example.com", "http://example.com:99999/"])
def test_normalize_url_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_url(url)


# --------------------------------------------------------------------------- the main crawl


def test_same_page_under_several_spellings_is_fetched_once(site: Site, main_crawl: MainCrawl):
    """/a, /a#section, /./a and /b/../a are one page; /to-a redirects there too."""
    assert paths(site.log(main_crawl.agent)).count("/a") == 1
    documents = [o for o in main_crawl.outcomes if isinstance(o, Document)]
    assert [d.url for d in documents].count(site.url("/a")) == 1
    page = main_crawl.table[site.url("/a")]
    assert isinstance(page, Document) and page.reject_reason is None
    assert "This is the page called a." in page.text
    assert page.source == "http"
    duplicate = main_crawl.table[site.url("/to-a")]
    assert isinstance(duplicate, FetchFailure) and duplicate.reason == "duplicate"


def test_robots_txt_disallowed_urls_are_never_requested(site: Site, main_crawl: MainCrawl):
    requested = paths(site.log(main_crawl.agent))
    assert requested.count("/robots.txt") == 1  # cached per host
    assert requested[0] == "/robots.txt"  # read before anything else
    assert not [p for p in requested if p.startswith("/private/")]
    for path in ("/private/secret", "/to-private"):
        outcome = main_crawl.table[site.url(path)]
        assert isinstance(outcome, FetchFailure) and outcome.reason == "robots_disallowed", path


def test_scope_is_never_left(site: Site, main_crawl: MainCrawl):
    assert site.log(main_crawl.agent, site="other") == []
    assert not [u for u in main_crawl.table if f":{site.ports['other']}" in u]
    redirected = main_crawl.table[site.url("/to-other")]
    assert isinstance(redirected, FetchFailure) and redirected.reason == "out_of_scope"
    assert redirected.status == 302
    requested = paths(site.log(main_crawl.agent))
    assert not [p for p in requested if p.startswith("/excluded/")]
    assert site.url("/excluded/page") not in main_crawl.table


def test_http_errors_retries_and_timeouts(site: Site, main_crawl: MainCrawl):
    missing = main_crawl.table[site.url("/missing")]
    assert isinstance(missing, FetchFailure)
    assert (missing.reason, missing.status) == ("http_4xx", 404)

    flaky = main_crawl.table[site.url("/flaky")]
    assert isinstance(flaky, Document) and flaky.reject_reason is None
    requested = paths(site.log(main_crawl.agent))
    assert requested.count("/flaky") == 2  # a 500, then the retry's 200

    slow = main_crawl.table[site.url("/slow")]
    assert isinstance(slow, FetchFailure) and slow.reason == "timeout"
    assert requested.count("/slow") == 2  # retries=1
    # Bounded by the read timeout, not by the server's 3 s stall (twice).
    assert main_crawl.seconds < 2 * http_test_site.SLOW_S


def test_redirects(site: Site, main_crawl: MainCrawl):
    loop = main_crawl.table[site.url("/loop1")]
    assert isinstance(loop, FetchFailure) and loop.reason == "redirect_loop"
    hops = main_crawl.table[site.url("/hops/0")]
    assert isinstance(hops, FetchFailure) and hops.reason == "too_many_redirects"
    requested = paths(site.log(main_crawl.agent))
    assert [p for p in requested if p.startswith("/hops/")] == [f"/hops/{i}" for i in range(4)]
    # A followed redirect yields a document under its final URL, and nothing under the first.
    landing = main_crawl.table[site.url("/landing")]
    assert isinstance(landing, Document) and landing.reject_reason is None
    assert site.url("/to-landing") not in main_crawl.table


def test_bodies_that_are_rejected(site: Site, main_crawl: MainCrawl):
    binary = main_crawl.table[site.url("/binary")]
    assert isinstance(binary, Document)
    assert (binary.text, binary.reject_reason) == ("", "binary_content")

    big = main_crawl.table[site.url("/big")]
    assert isinstance(big, Document) and (big.text, big.reject_reason) == ("", "oversize")

    image = main_crawl.table[site.url("/image.png")]
    assert isinstance(image, FetchFailure)
    assert (image.reason, image.status, image.detail) == (
        "content_type_not_allowed",
        200,
        "image/png",
    )


def test_empty_page_still_leads_to_its_links(site: Site, main_crawl: MainCrawl):
    empty = main_crawl.table[site.url("/empty")]
    assert isinstance(empty, Document) and (empty.text, empty.reject_reason) == ("", "empty")
    linked = main_crawl.table[site.url("/from-empty")]
    assert isinstance(linked, Document) and linked.reject_reason is None


def test_text_is_decoded_by_the_right_charset(site: Site, main_crawl: MainCrawl):
    cp1252 = main_crawl.table[site.url("/cp1252")]
    assert isinstance(cp1252, Document) and cp1252.reject_reason is None
    assert http_test_site.CP1252_TEXT in cp1252.text

    plain = main_crawl.table[site.url("/plain.txt")]
    assert isinstance(plain, Document) and plain.text == http_test_site.PLAIN_TEXT

    for path, name in (("/gzip", "gzip"), ("/chunked", "chunked")):
        page = main_crawl.table[site.url(path)]
        assert isinstance(page, Document) and f"This is the page called {name}." in page.text


def test_outcomes_are_sorted_and_counted(site: Site, main_crawl: MainCrawl):
    urls = [o.url for o in main_crawl.outcomes]
    assert urls == sorted(urls)
    # on_page ticks once per URL that cost a request: all but /private/secret, refused by
    # robots.txt before any request (/to-private was requested, its redirect target refused).
    assert main_crawl.pages_reported == len(main_crawl.outcomes) - 1


def test_warc_keeps_every_response(site: Site, main_crawl: MainCrawl):
    responses: dict[str, list] = {}
    requests: list[str] = []
    types: list[str] = []
    with open(main_crawl.warc, "rb") as f:
        for record in ArchiveIterator(f):
            types.append(record.rec_type)
            uri = record.rec_headers.get_header("WARC-Target-URI")
            if record.rec_type == "response":
                assert record.rec_headers.get_header("WARC-Date")
                body = record.content_stream().read()
                responses.setdefault(uri, []).append((record.http_headers, body))
            elif record.rec_type == "request":
                requests.append(uri)
                agent = record.http_headers.get_header("User-Agent")
                assert agent == main_crawl.agent
    assert types[0] == "warcinfo" and types.count("warcinfo") == 1
    assert sorted(requests) == sorted(u for u, rs in responses.items() for _ in rs)
    log_count = len(site.log(main_crawl.agent))
    # Every request that got an answer is archived: all but the two that timed out.
    assert sum(len(v) for v in responses.values()) == log_count - 2

    assert len(responses[site.url("/robots.txt")]) == 1
    headers, body = responses[site.url("/missing")][0]
    assert headers.get_statuscode() == "404"
    assert [h.get_statuscode() for h, _ in responses[site.url("/flaky")]] == ["500", "200"]
    headers, body = responses[site.url("/cp1252")][0]
    assert http_test_site.CP1252_TEXT.encode("cp1252") in body  # raw bytes, not re-encoded
    headers, body = responses[site.url("/gzip")][0]
    assert headers.get_header("Content-Encoding") == "gzip"  # stored raw, warcio decodes it
    assert b"This is the page called gzip." in body
    headers, body = responses[site.url("/chunked")][0]
    assert headers.get_header("Transfer-Encoding") is None
    assert body.endswith(b"</html>")
    assert responses[site.url("/loop2")][0][0].get_statuscode() == "302"


def test_warc_raw_payload_is_the_compressed_bytes(main_crawl: MainCrawl, site: Site):
    with open(main_crawl.warc, "rb") as f:
        for record in ArchiveIterator(f):
            uri = record.rec_headers.get_header("WARC-Target-URI")
            if record.rec_type == "response" and uri == site.url("/gzip"):
                raw = record.raw_stream.read()
                assert gzip.decompress(raw).startswith(b"<!doctype html>")
                return
    pytest.fail("no /gzip response in the WARC")


def test_warc_is_only_visible_once_closed(tmp_path: Path):
    target = tmp_path / "out" / "x.warc.gz"
    recorder = WarcRecorder(str(target))
    assert not target.exists()
    recorder.close()
    assert target.exists() and list(target.parent.iterdir()) == [target]

    failed = tmp_path / "failed.warc.gz"
    with pytest.raises(RuntimeError), WarcRecorder(str(failed)):
        raise RuntimeError("crawl died")
    assert list(tmp_path.iterdir()) == [tmp_path / "out"]


# --------------------------------------------------------------------------- smaller crawls


def assert_spaced(starts: list[float], delay: float) -> None:
    """Gaps between request starts as the server saw them.

    The server notes a request when its thread gets to run: on a loaded machine (2 cores, other
    test runs) one entry can look 0.1-0.2 s late, shrinking one gap and widening the next. So the
    typical gap and the whole span, where such noise does not add up, are held to the delay;
    the smallest gap only has to show that requests were never sent together.
    """
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert statistics.median(gaps) >= delay - 0.02, gaps
    assert starts[-1] - starts[0] >= len(gaps) * delay - 0.02, gaps
    assert min(gaps) >= delay / 2, gaps


def test_politeness_spaces_request_starts(site: Site, extractor: BoundedExtractor):
    cfg = config("polite", politeness_delay_s=0.3, concurrency=4)
    outcomes = crawl([site.url("/polite/")], cfg, extractor)
    assert len([o for o in outcomes if isinstance(o, Document)]) == 7
    starts = [e["time"] for e in site.log(cfg.user_agent)]
    assert len(starts) == 8  # robots.txt + index + 6 pages
    assert_spaced(starts, 0.3)


def test_robots_crawl_delay_wins_when_longer(site: Site, extractor: BoundedExtractor):
    cfg = config("crawl-delay", politeness_delay_s=0.05)
    outcomes = crawl([site.url("/", "delay")], cfg, extractor)
    assert [o.url for o in outcomes] == [site.url("/", "delay"), site.url("/d1", "delay")]
    starts = [e["time"] for e in site.log(cfg.user_agent)]
    assert len(starts) == 3
    assert_spaced(starts, 1.0)


def test_robots_txt_5xx_disallows_the_whole_host(site: Site, extractor: BoundedExtractor):
    """RFC 9309 §2.3.1.3: a robots.txt that answers 5xx disallows everything; the failure says
    the file was unreachable (robots_unreachable, with its URL and status), not that it forbids
    the page (robots_disallowed): the fix is on the server, not in the seeds."""
    cfg = config("down")
    outcomes = crawl([site.url("/", "down")], cfg, extractor)
    assert len(outcomes) == 1
    failure = outcomes[0]
    assert isinstance(failure, FetchFailure) and failure.reason == "robots_unreachable"
    assert f"robots.txt at {site.url('/robots.txt', 'down')} answered 503" in failure.detail
    assert paths(site.log(cfg.user_agent)) == ["/robots.txt", "/robots.txt"]  # one retry


def test_robots_txt_unreachable_host_is_its_own_reason(extractor: BoundedExtractor):
    """A host that refuses the connection: robots_unreachable, naming the connection error."""
    with socket.socket() as probe:  # a port nothing listens on: bound, never listening
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/"
        outcomes = crawl([url], config("refused", retries=0), extractor)
    assert len(outcomes) == 1
    failure = outcomes[0]
    assert isinstance(failure, FetchFailure) and failure.reason == "robots_unreachable"
    assert f"robots.txt at {url}robots.txt unreachable (connection_error:" in failure.detail


def test_robots_txt_4xx_allows_everything(site: Site, extractor: BoundedExtractor):
    """Also called from inside a running event loop, as an async caller would."""

    async def from_a_coroutine() -> list[Outcome]:
        return crawl([site.url("/", "other")], config("other"), extractor)

    outcomes = asyncio.run(from_a_coroutine())
    assert [o.url for o in outcomes if isinstance(o, Document)] == [
        site.url("/", "other"),
        site.url("/page", "other"),
    ]


def test_max_depth(site: Site, extractor: BoundedExtractor):
    cfg = config("depth", max_depth=2)
    outcomes = crawl([site.url("/depth/0")], cfg, extractor)
    assert [o.url for o in outcomes] == [site.url(f"/depth/{i}") for i in range(3)]
    assert paths(site.log(cfg.user_agent)) == ["/robots.txt", "/depth/0", "/depth/1", "/depth/2"]


def test_max_pages_is_exact_and_deterministic(site: Site, extractor: BoundedExtractor):
    first = crawl([site.url("/wide/")], config("wide-1", max_pages=4), extractor)
    second = crawl([site.url("/wide/")], config("wide-2", max_pages=4), extractor)
    expected = [site.url(p) for p in ("/wide/", "/wide/0", "/wide/1", "/wide/2")]
    assert [o.url for o in first] == [o.url for o in second] == expected
    assert len(site.log("llmflow-test/wide-1")) == 5  # robots.txt + 4 pages


def test_allowed_prefixes(site: Site, extractor: BoundedExtractor):
    cfg = config("prefix", allowed_prefixes=[site.url("/scope/")])
    outcomes = crawl([site.url("/scope/")], cfg, extractor)
    assert [o.url for o in outcomes] == [site.url("/scope/"), site.url("/scope/in")]
    assert not [p for p in paths(site.log(cfg.user_agent)) if p.startswith("/outside")]


def test_seed_outside_the_prefixes_is_reported(site: Site, extractor: BoundedExtractor):
    cfg = config("bad-seed", allowed_prefixes=[site.url("/scope/")])
    outcomes = crawl([site.url("/a"), "not a url"], cfg, extractor)
    reasons = {o.url: o.reason for o in outcomes if isinstance(o, FetchFailure)}
    assert reasons == {site.url("/a"): "out_of_scope", "not a url": "invalid_url"}
    assert site.log(cfg.user_agent) == []


def test_a_crawl_in_batches_tries_what_one_batch_does(
    site: Site, extractor: BoundedExtractor
) -> None:
    """checkpoint_pages cuts the crawl into batches (a checkpoint after each); the URLs tried
    and what they gave do not change."""
    whole = crawl([site.url("/wide/")], config("batches-whole"), extractor)
    sink = Collected()
    crawl_web([site.url("/wide/")], config("batches-of-3", checkpoint_pages=3), extractor, sink)
    assert sink.batches == [3, 3, 3, 2] and sink.complete
    assert len({s.url for s in sink.states}) == 11  # each page's state, in its batch
    batched = sorted(sink.outcomes, key=lambda r: r.url or "")
    assert [(o.url, type(o), getattr(o, "text", None)) for o in batched] == [
        (o.url, type(o), getattr(o, "text", None)) for o in whole
    ]


def test_a_refresh_keeps_pages_whose_robots_txt_is_unreachable(tmp_path: Path):
    """An unreachable robots.txt says the server is down today, not that the pages are gone: a
    refresh keeps their documents (a robots.txt that now forbids them withdraws them)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmflow.tasks.ingest.web_unit import STATE_SCHEMA, account_refresh

    rows = [
        {"url": url, "etag": None, "last_modified": None, "doc_id": url.upper(), "links": []}
        for url in ("down", "forbidden")
    ]
    previous = tmp_path / "previous.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=STATE_SCHEMA), previous)
    current = tmp_path / "current.parquet"
    pq.write_table(STATE_SCHEMA.empty_table(), current)
    failures = [
        {"url": "down", "reason": "robots_unreachable"},
        {"url": "forbidden", "reason": "robots_disallowed"},
    ]
    withdrawn, stats, carried = account_refresh([str(previous)], [str(current)], failures)
    assert withdrawn == [
        {"id": "FORBIDDEN", "url": "forbidden", "reason": "gone_robots_disallowed"}
    ]
    assert stats == {"kept_after_fetch_failure": 1}
    assert carried.column("url").to_pylist() == ["down"]


def test_a_web_crawl_that_got_nothing_but_outages_is_tried_again(site: Site, tmp_path: Path):
    """A run whose crawl fetched nothing stops there (the version stays unpublished); once the
    server is back, running again must crawl again, not find the unit done and stop again. A
    crawl that got pages, or failed for good, stays done."""
    from llmflow.tasks.ingest.crawl import crawl_unit, plan_crawl_units

    def crawl_twice(name: str, seed: str) -> int:
        cfg = config(name, seeds=[seed], extract_workers=1)
        (unit,) = plan_crawl_units(cfg)
        stage_dir = str(tmp_path / name)
        first = crawl_unit.fn(unit, cfg, stage_dir)
        second = crawl_unit.fn(unit, cfg, stage_dir)
        assert not first.skipped and first.failures == second.failures
        return len(paths(site.log(cfg.user_agent)))

    assert crawl_twice("redo-down", site.url("/", "down")) == 4  # robots.txt, retried, twice
    assert crawl_twice("redo-other", site.url("/page", "other")) == 2  # robots.txt and the page
    assert crawl_twice("redo-gone", site.url("/missing")) == 2  # 404: robots.txt and the page
