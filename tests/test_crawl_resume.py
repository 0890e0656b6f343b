"""A web crawl that checkpoints: stopped or killed, it resumes without fetching a page twice;
split over host partitions, its units together crawl what one unit would.

Against tests/http_test_site.py on 127.0.0.1 (started and stopped here): its request log, read
from the server's side, shows which pages each run asked for.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from warcio.archiveiterator import ArchiveIterator

from llmflow.tasks.core.stage import UnitRecord, run_unit
from llmflow.tasks.ingest import crawl
from llmflow.tasks.ingest.crawl_checkpoint import SeenSet
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.ingest.crawl_guards import CrawlInterrupted, stop_crawls
from llmflow.tasks.ingest.web_scope import host_partition
from llmflow.tasks.ingest.web_unit import STATE_SCHEMA, account_refresh

sys.path.insert(0, str(Path(__file__).parent))
import test_web_crawler as web  # noqa: E402
from crawl_child import crawl_child, wait_for_pages  # noqa: E402
from test_web_crawler import Site, config, paths  # noqa: E402

site = web.site

# A tree of slow pages (/many/n links to /many/5n+1..5n+5), cut by max_pages: 30 pages in
# checkpoints of 8.
TREE = {"max_pages": 30, "max_depth": 10, "checkpoint_pages": 8, "concurrency": 2}


def run_web(
    stage_dir: Path, cfg: CrawlConfig, on_page: Callable[[], None] = lambda: None
) -> list[UnitRecord]:
    """The crawl stage's units, run the way the pipeline runs them (without finishing)."""
    out = str(stage_dir)
    return [
        run_unit(
            out,
            u,
            lambda o, u=u: crawl.crawl_documents(u, cfg, out, on_page, o),
            max_rows=cfg.shard_docs,
            max_bytes=cfg.shard_bytes,
        )
        for u in crawl.plan_crawl_units(cfg)
    ]


def kept(stage_dir: Path, records: list[UnitRecord]) -> dict[str, str]:
    """url -> id of every document the units kept (asserting no url is kept twice)."""
    found: dict[str, str] = {}
    for record in records:
        for part in record.parts:
            for row in pq.read_table(stage_dir / part.path, columns=["url", "id"]).to_pylist():
                assert row["url"] not in found, f"{row['url']} kept twice"
                found[row["url"]] = row["id"]
    return found


def checkpointed(stage_dir: Path, unit: str = "web") -> tuple[dict, set[str]]:
    """A unit's checkpoint and the URLs of every page it covers (kept, rejected or failed)."""
    body = json.loads((stage_dir / "_state" / f"{unit}.checkpoint" / "checkpoint.json").read_text())
    urls = {f["url"] for f in body["done"]["failures"]}
    for part in body["done"]["parts"] + body["done"]["rejected"]:
        table = pq.read_table(stage_dir / part["path"], columns=["url"])
        urls |= set(table.column("url").to_pylist())
    return body, urls


def asked(site: Site, agent: str, since: int = 0) -> list[str]:
    """Page URLs the site was asked for by ``agent`` (robots.txt left out), in order."""
    return [site.url(p) for p in paths(site.log(agent)[since:]) if p != "/robots.txt"]


def reference(site: Site, tmp_path: Path, seeds: list[str], **options: object) -> dict[str, str]:
    """The same crawl, never interrupted (its own agent, so its requests are its own)."""
    cfg = config("resume-reference", seeds=seeds, **options)
    return kept(tmp_path / "reference", run_web(tmp_path / "reference", cfg))


def test_a_stopped_crawl_resumes_where_it_stopped(site: Site, tmp_path: Path) -> None:
    seeds = [site.url("/many/0")]
    cfg = config("resume-stop", seeds=seeds, exclude_patterns=[], **TREE)
    stage = tmp_path / "crawl"
    pages = 0

    def stop_at_twelve() -> None:
        nonlocal pages
        pages += 1
        if pages == 12:
            stop_crawls()

    started = time.monotonic()
    with pytest.raises(CrawlInterrupted):
        run_web(stage, cfg, stop_at_twelve)
    assert time.monotonic() - started < 20
    assert not list((stage / "_done").glob("*.json"))  # not complete: no marker
    body, done = checkpointed(stage)
    assert 8 <= body["position"]["pages"] <= 14 and len(done) == body["position"]["pages"]
    assert body["batches"] == 2  # the checkpoint at 8 pages, and the one Ctrl-C wrote

    before = len(site.log(cfg.user_agent))
    records = run_web(stage, cfg)
    again = asked(site, cfg.user_agent, before)
    assert not done & set(again), sorted(done & set(again))
    assert len(again) == TREE["max_pages"] - body["position"]["pages"]
    resumed = kept(stage, records)
    assert resumed == reference(site, tmp_path, seeds, exclude_patterns=[], **TREE)
    assert len(resumed) == TREE["max_pages"]
    assert len(records[0].parts) > 1  # written batch by batch
    assert checkpointed(stage)[0]["batches"] >= 3  # the last one is left until finish()
    # A checkpoint made for another key (here: another max_pages) starts the crawl afresh.
    other = cfg.model_copy(update={"max_pages": 10})
    before = len(site.log(cfg.user_agent))
    records = run_web(stage, other)
    assert len(kept(stage, records)) == 10
    assert asked(site, cfg.user_agent, before)[0] == seeds[0]
    # Finishing the stage drops the spent checkpoint and keeps the unit's page-state parts.
    crawl.finish(crawl.plan_crawl_units(other), other, str(stage), records, None)
    assert sorted(p.name for p in (stage / "_state").iterdir()) == [
        "web.00000.parquet",
        "web.00001.parquet",
    ]


def test_a_killed_crawl_resumes_from_its_last_checkpoint(site: Site, tmp_path: Path) -> None:
    seeds = [site.url("/many/0")]
    cfg = config("resume-kill", seeds=seeds, exclude_patterns=[], **TREE)
    stage = tmp_path / "crawl"
    with crawl_child(cfg, stage) as process:
        wait_for_pages(process, 19)  # past two checkpoints (16 pages), inside the third batch
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    body, done = checkpointed(stage)
    assert body["position"]["pages"] == 16 and len(done) == 16

    before = len(site.log(cfg.user_agent))
    records = run_web(stage, cfg)
    again = asked(site, cfg.user_agent, before)
    assert not done & set(again) and len(again) == TREE["max_pages"] - 16
    resumed = kept(stage, records)
    assert resumed == reference(site, tmp_path, seeds, exclude_patterns=[], **TREE)
    # Every page's response is in the WARC files once: the killed batch's file never landed.
    responses: list[str] = []
    for warc in sorted((stage / "warc").iterdir()):
        assert ".tmp-" not in warc.name, warc.name
        with open(warc, "rb") as f:
            responses += [
                r.rec_headers.get_header("WARC-Target-URI")
                for r in ArchiveIterator(f)
                if r.rec_type == "response"
            ]
    pages = [r for r in responses if not r.endswith("/robots.txt")]
    assert sorted(pages) == sorted(resumed)
    assert [w.name for w in sorted((stage / "warc").iterdir())] == [
        f"web.{i:05d}.warc.gz" for i in range(4)
    ]


def test_partitions_split_the_hosts_and_crawl_the_same_documents(
    site: Site, tmp_path: Path
) -> None:
    """127.0.0.1 and localhost are one server under two host names: two hosts to the crawler."""
    hosts = [site.url("/hosts/"), f"http://localhost:{site.ports['main']}/hosts/"]
    count = next(n for n in range(2, 20) if len({host_partition(h, n) for h in hosts}) == 2)
    options = {"seeds": hosts, "allowed_prefixes": ["127.0.0.1", "localhost"]}
    whole = config("partitions-1", **options)
    split = config("partitions-n", web_partitions=count, **options)
    units = crawl.plan_crawl_units(split)
    assert len(units) == 2 and {u.source["partition"][1] for u in units} == {count}
    assert len({u.key for u in units} | {crawl.plan_crawl_units(whole)[0].key}) == 3

    one = kept(tmp_path / "whole", run_web(tmp_path / "whole", whole))
    records = run_web(tmp_path / "split", split)
    assert kept(tmp_path / "split", records) == one and len(one) == 5
    # No page was asked for twice: the link from 127.0.0.1 to localhost was counted and left
    # to localhost's unit.
    assert len(asked(site, split.user_agent)) == 5
    stats = {r.name: r.stats.get("links_to_other_partition", 0) for r in records}
    assert stats == {f"web-{host_partition(h, count)}": int(i == 0) for i, h in enumerate(hosts)}


def test_a_refresh_accounts_for_the_last_crawl_part_by_part(tmp_path: Path) -> None:
    """Page states of a long crawl are parts: each earlier page is found in whichever part."""

    def part(name: str, pages: list[tuple[str, str]]) -> str:
        rows = [
            {"url": url, "etag": None, "last_modified": None, "doc_id": doc, "links": ["x"]}
            for url, doc in pages
        ]
        pq.write_table(pa.Table.from_pylist(rows, schema=STATE_SCHEMA), tmp_path / name)
        return str(tmp_path / name)

    previous = [
        part("old.00000.parquet", [("a", "A"), ("b", "B")]),
        part("old.00001.parquet", [("c", "C"), ("d", "D"), ("e", "E")]),
    ]
    current = [
        part("new.00000.parquet", [("a", "A"), ("f", "F")]),
        part("new.00001.parquet", [("b", "B2")]),
    ]
    failures = [{"url": "c", "reason": "http_4xx"}, {"url": "d", "reason": "timeout"}]
    withdrawn, stats, carried = account_refresh(previous, current, failures)
    assert withdrawn == [
        {"id": "B", "url": "b", "reason": "changed"},
        {"id": "C", "url": "c", "reason": "gone_http_4xx"},
    ]
    assert stats == {"kept_after_fetch_failure": 1, "not_revisited": 1}
    assert carried.to_pylist() == [  # kept with their old state, links and all
        {"url": u, "etag": None, "last_modified": None, "doc_id": u.upper(), "links": ["x"]}
        for u in ("d", "e")
    ]


def test_the_seen_set_keeps_eight_bytes_a_url() -> None:
    urls = [f"https://example.org/page/{i}" for i in range(10_000)]
    seen = SeenSet(lambda url: url)
    seen.update(urls + urls)
    assert len(seen) == 10_000 and seen.compact().nbytes == 8 * 10_000 and not seen.recent
    assert all(url in seen for url in urls[::97]) and "https://example.org/other" not in seen
    seen.add("https://example.org/new")  # added in a visit that is then taken back
    seen.discard("https://example.org/new")
    assert "https://example.org/new" not in seen
    seen.discard(urls[0])  # only what came since the last checkpoint can be taken back
    assert urls[0] in seen
