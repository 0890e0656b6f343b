"""The crawler's safety findings (security review): scope of every request, private addresses,
credentials in seeds, hostile pages, Ctrl-C, and config mistakes.

Every network test runs against tests/http_test_site.py on 127.0.0.1 (started and stopped here);
its request log, read from the server's side, shows what the crawler did and did not request.
"""

from __future__ import annotations

import base64
import gzip
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from warcio.archiveiterator import ArchiveIterator

from llmflow.tasks.core.documents import Document, FetchFailure
from llmflow.tasks.core.stage import run_unit
from llmflow.tasks.ingest import crawl
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.crawl_config import CrawlConfig, redact_url
from llmflow.tasks.ingest.web_scope import Scope

sys.path.insert(0, str(Path(__file__).parent))
import http_test_site  # noqa: E402
import test_web_crawler as web  # noqa: E402
from crawl_child import crawl_child, wait_for_pages  # noqa: E402
from test_web_crawler import Site, config, paths  # noqa: E402

# The same site program and extractor as the crawler's own tests, started for this module.
site = web.site
extractor = web.extractor

# --------------------------------------------------------------------------- 1: robots.txt SSRF


def test_robots_txt_redirect_to_another_port_is_not_followed(
    site: Site, extractor: BoundedExtractor
) -> None:
    """bounce's robots.txt redirects to the other server: that server must see no request."""
    cfg = config("bounce")
    outcomes = web.crawl([site.url("/", "bounce")], cfg, extractor)
    assert site.log(cfg.user_agent, site="other") == []
    # The crawl itself goes on: robots.txt counts as unavailable, the pages are fetched.
    kept = [o.url for o in outcomes if isinstance(o, Document) and o.reject_reason is None]
    assert kept == [site.url("/", "bounce"), site.url("/b1", "bounce")]
    assert paths(site.log(cfg.user_agent, site="bounce")) == ["/robots.txt", "/", "/b1"]


def test_robots_txt_redirect_inside_scope_is_followed(
    site: Site, extractor: BoundedExtractor
) -> None:
    """With the other server in scope, the same redirect is an ordinary robots.txt fetch."""
    cfg = config(
        "bounce-allowed",
        allowed_prefixes=[f"127.0.0.1:{site.ports['bounce']}", f"127.0.0.1:{site.ports['other']}"],
    )
    web.crawl([site.url("/", "bounce")], cfg, extractor)
    assert paths(site.log(cfg.user_agent, site="other")) == ["/robots.txt"]


# --------------------------------------------------------------------------- 2: scope and ports


def test_seed_without_port_means_the_default_port_only() -> None:
    scope = Scope([], ["http://example.com/", "https://secure.example/"])
    assert scope.allows("http://example.com/page")
    assert not scope.allows("http://example.com:8080/admin")
    assert not scope.allows("http://example.com:443/")
    assert scope.allows("https://secure.example/x")
    assert not scope.allows("https://secure.example:8443/x")
    # A seed with its port: that port, under either scheme (one service).
    scope = Scope([], ["http://127.0.0.1:8000/"])
    assert scope.allows("http://127.0.0.1:8000/a")
    assert not scope.allows("http://127.0.0.1/a")
    assert not scope.allows("http://127.0.0.1:8001/a")


def test_allowed_host_entries_keep_their_meaning() -> None:
    scope = Scope(["Example.COM", "docs.example:80", "api.example:8443"], [])
    assert scope.allows("http://example.com:9999/")  # a bare host: any port
    assert scope.allows("https://example.com/")
    assert scope.allows("http://docs.example/")  # ":80" is http's default port, dropped in URLs
    assert not scope.allows("https://docs.example/")
    assert not scope.allows("http://docs.example:8080/")
    assert scope.allows("https://api.example:8443/v1")
    assert not scope.allows("https://api.example/v1")
    assert not scope.allows("http://other.example/")


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("", "empty"),
        ("example.com:99999", "bad port"),
        ("example.com:", "empty port"),
        ("ftp://example.com/", "only http(s)"),
        ("user:pw@example.com", "no credentials"),
    ],
)
def test_bad_scope_entries_are_refused(entry: str, problem: str) -> None:
    with pytest.raises(ValidationError) as error:
        CrawlConfig(allowed_prefixes=[entry])
    assert "allowed_prefixes" in str(error.value) and problem in str(error.value)


# --------------------------------------------------------------------------- 3: private addresses


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_private_addresses_are_refused_when_not_allowed(
    site: Site, extractor: BoundedExtractor, host: str
) -> None:
    cfg = config(f"no-private-{host}", allow_private_addresses=False)
    seed = f"http://{host}:{site.ports['main']}/a"
    outcomes = web.crawl([seed], cfg, extractor)
    assert len(outcomes) == 1
    failure = outcomes[0]
    assert isinstance(failure, FetchFailure)
    assert failure.reason == "address_refused"
    assert failure.url == seed
    assert "127.0.0.1 (loopback)" in failure.detail and host in failure.detail
    assert "allow_private_addresses" in failure.detail
    assert site.log(cfg.user_agent) == []  # not even robots.txt


def test_private_addresses_are_fetched_by_default(site: Site, extractor: BoundedExtractor) -> None:
    cfg = config("private-ok")
    assert cfg.allow_private_addresses is True
    outcomes = web.crawl([f"http://localhost:{site.ports['main']}/a"], cfg, extractor)
    assert [type(o) for o in outcomes] == [Document]


# --------------------------------------------------------------------------- 5: credentials


def test_redact_url() -> None:
    assert (
        redact_url("http://user:pw@example.com:8080/a?b=1#c") == "http://example.com:8080/a?b=1#c"
    )
    assert redact_url("https://token@example.com/") == "https://example.com/"
    assert redact_url("http://example.com/a@b") == "http://example.com/a@b"
    assert redact_url("s3://key:secret@bucket/path") == "s3://bucket/path"
    assert redact_url("pydoc:") == "pydoc:"
    assert redact_url("/data/crawl/file.warc.gz") == "/data/crawl/file.warc.gz"
    assert redact_url("http://u:p@[::1/") == "http://[::1/"  # unsplittable, still redacted


def _texts_of(stage_dir: Path) -> Iterator[tuple[str, str]]:
    """(file, its content as text) for every file the stage wrote, read back by format."""
    for path in sorted(p for p in stage_dir.rglob("*") if p.is_file()):
        if path.name.endswith(".parquet"):
            yield str(path), json.dumps(pq.read_table(path).to_pylist(), default=str)
            yield str(path) + " (bytes)", path.read_bytes().decode("latin-1")
        elif path.name.endswith(".warc.gz"):
            yield str(path), gzip.decompress(path.read_bytes()).decode("latin-1")
            with open(path, "rb") as f:
                for record in ArchiveIterator(f):
                    headers = record.http_headers.headers if record.http_headers else []
                    text = json.dumps([record.rec_headers.headers, headers])
                    yield (
                        f"{path} {record.rec_type}",
                        text + record.content_stream().read().decode("latin-1"),
                    )
        else:
            yield str(path), path.read_bytes().decode("latin-1")


def test_seed_credentials_are_sent_but_never_stored(site: Site, tmp_path: Path) -> None:
    user, password = http_test_site.AUTH_USER, http_test_site.AUTH_PASSWORD
    seed = f"http://{user}:{password}@127.0.0.1:{site.ports['auth']}/"
    cfg = config("auth", seeds=[seed, f"http://{user}:{password}@127.0.0.1:1/unreachable"])
    stage_dir = tmp_path / "crawl"
    units = crawl.plan_crawl_units(cfg)
    assert password not in json.dumps([u.source for u in units])
    records = [
        run_unit(
            str(stage_dir),
            u,
            lambda output, u=u: crawl.crawl_documents(u, cfg, str(stage_dir), lambda: None, output),
        )
        for u in units
    ]
    crawl.finish(units, cfg, str(stage_dir), records, None)

    # The server was asked with the credentials, on every request (robots.txt included).
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    log = site.log(cfg.user_agent, site="auth")
    asked = paths(log)
    # the two member pages are one BFS level, fetched concurrently: in either order
    assert asked[:2] == ["/robots.txt", "/"] and sorted(asked[2:]) == ["/members/1", "/members/2"]
    assert {e["authorization"] for e in log} == {f"Basic {token}"}
    kept = pq.read_table(stage_dir / "web.parquet").column("url").to_pylist()
    assert kept == [site.url(p, "auth") for p in ("/", "/members/1", "/members/2")]

    written = list(_texts_of(stage_dir))
    names = {Path(name.split(" ")[0]).name for name, _ in written}
    assert {"web.parquet", "manifest.json", "web.warc.gz"} <= names, names
    assert any(name.endswith("request") for name, _ in written)
    for name, text in written:
        for secret in (password, token, f"{user}:"):
            assert secret not in text, f"{secret!r} in {name}"


# --------------------------------------------------------------------------- 7: config mistakes


@pytest.mark.parametrize("seeds", [[], [""], ["  "], ["pydoc:", ""]])
def test_empty_seeds_are_refused(seeds: list[str]) -> None:
    with pytest.raises(ValidationError) as error:
        CrawlConfig(seeds=seeds)
    message = str(error.value)
    assert "seeds" in message
    assert ("no seeds" in message) if not seeds else ("empty string" in message)


# --------------------------------------------------------------------------- 4: hostile pages


PAGE_CPU_S = 4.0
PAGE_WALL_S = 30.0  # the backstop: a loaded machine gives a page its CPU seconds more slowly


@pytest.fixture(scope="module")
def quick_extractor() -> Iterator[BoundedExtractor]:
    """A short page budget, warmed up so that the worker's start is not counted as a page's."""
    with BoundedExtractor(cpu_s=PAGE_CPU_S, wall_s=PAGE_WALL_S) as bounded:
        bounded.extract("<p>warm</p>")
        yield bounded


def test_tag_with_80000_attributes_does_not_stall_the_crawl(
    site: Site, quick_extractor: BoundedExtractor
) -> None:
    """Handled within the page's bounds, and the links on it are followed: the tag is cut short
    before lxml parses the links; the text is the worker's (or its CPU budget's, counted)."""
    cfg = config("hostile", max_page_bytes=2_000_000)
    started = time.monotonic()
    outcomes = web.by_url(web.crawl([site.url("/hostile/")], cfg, quick_extractor))
    seconds = time.monotonic() - started
    assert seconds < PAGE_WALL_S + 4.0, seconds
    hostile = outcomes[site.url("/hostile/")]
    assert isinstance(hostile, Document)
    assert hostile.reject_reason in (None, "extract_cpu_timeout"), hostile
    for path in ("/hostile/1", "/hostile/2"):
        page = outcomes[site.url(path)]
        assert isinstance(page, Document) and page.reject_reason is None, path


def test_link_parsing_is_bounded_by_the_extraction_budget(
    site: Site, quick_extractor: BoundedExtractor
) -> None:
    """A page the cheap guard misses ('>' in every value) is stopped by the worker's budget:
    one rejected page with its reason, and the crawl goes on to the next seed."""
    cfg = config("hostile-quoted", max_page_bytes=2_000_000)
    started = time.monotonic()
    seeds = [site.url("/hostile/quoted"), site.url("/hostile/1")]
    outcomes = web.by_url(web.crawl(seeds, cfg, quick_extractor))
    seconds = time.monotonic() - started
    assert seconds < PAGE_WALL_S + 4.0, seconds
    hostile = outcomes[site.url("/hostile/quoted")]
    assert isinstance(hostile, Document) and hostile.reject_reason == "extract_cpu_timeout"
    page = outcomes[site.url("/hostile/1")]
    assert isinstance(page, Document) and page.reject_reason is None


# --------------------------------------------------------------------------- 6: Ctrl-C

# The crawl stage as the pipeline runs it (tests/crawl_child.py): planned in the main thread, the
# unit run in a worker thread of a pool (Prefect's thread task runner), the main waiting on it.


def test_ctrl_c_stops_a_crawl_in_a_worker_thread(site: Site, tmp_path: Path) -> None:
    stage_dir = tmp_path / "crawl"
    cfg = CrawlConfig(
        seeds=[site.url("/many/0")],
        max_pages=500,
        max_depth=10,
        politeness_delay_s=0.0,
        concurrency=2,
        user_agent="llmflow-test/interrupt",
        read_timeout_s=5.0,
        exclude_patterns=[],
    )
    with crawl_child(cfg, stage_dir) as process:
        wait_for_pages(process, 3)  # three pages fetched: the crawl is well under way
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            # Where it hung: the child's threads, dumped by faulthandler on SIGUSR1 (CHILD
            # registers it), then what it printed.
            process.send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            process.kill()
            out, err = process.communicate()
            pytest.fail(f"the crawl ran on after Ctrl-C; its stderr ends: {err[-6000:]}")
        seconds = time.monotonic() - interrupted
    assert seconds < 10.0, seconds  # "within seconds", with room for a loaded CI machine
    assert process.returncode == -signal.SIGINT, (process.returncode, err[-2000:])
    assert "KeyboardInterrupt" in err or "CrawlInterrupted" in err, err[-2000:]
    assert "finished" not in out
    # Nothing half-written, and nothing that looks complete: no marker, and a checkpoint of
    # the pages whose outcome was known, for the next run to resume from.
    written = {p.relative_to(stage_dir).as_posix() for p in stage_dir.rglob("*") if p.is_file()}
    assert not any(".tmp-" in name or name.startswith("_done/") for name in written), written
    checkpoints = stage_dir / "_state/web.checkpoint"
    checkpoint = json.loads((checkpoints / "checkpoint.json").read_text())
    assert checkpoint["position"]["pages"] >= 1
    assert pq.read_table(checkpoints / checkpoint["frontier"]).num_rows  # URLs left to try
    parts = {p["path"] for p in checkpoint["done"]["parts"]}
    assert parts and parts <= written, (parts, written)
    assert {"_state/web.00000.parquet", "warc/web.00000.warc.gz"} <= written, written
    requests = len(site.log("llmflow-test/interrupt"))
    time.sleep(1.0)
    assert len(site.log("llmflow-test/interrupt")) == requests  # no request after the exit
    assert requests < 60, requests
