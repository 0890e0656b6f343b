"""crawl: documents from the web, from Common Crawl WARC/WET files, or from local files.

The seeds decide the reader: http(s) URLs (and ``pydoc:``, the embedded default's local site) are
crawled together as one unit of work, since they share one frontier; every file a seed names is
a unit of its own, so a directory of WARC files resumes file by file. Every document read is
accounted for: kept, rejected with a reason, or listed as a fetch failure in the manifest.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.tasks import datasets
from llmflow.tasks.crawl_config import CrawlConfig
from llmflow.tasks.documents import Document, FetchFailure
from llmflow.tasks.file_sources import expand_file_seed, is_file_seed, iter_file_documents
from llmflow.tasks.html_text import BoundedExtractor
from llmflow.tasks.installed_docs import INSTALLED_SEED, installed_digest, installed_documents
from llmflow.tasks.progress import StepProgress
from llmflow.tasks.pydoc_site import PYDOC_SEED, pydoc_site
from llmflow.tasks.stage import (
    ShardResult,
    StageSpec,
    UnitRecord,
    WorkUnit,
    documents_result,
    run_unit,
    unit_key,
)
from llmflow.tasks.warc_writer import WarcRecorder
from llmflow.tasks.web_crawler import crawl_web

STAGE = StageSpec(
    name="crawl", version="1", libraries=("httpx", "warcio", "resiliparse", "trafilatura")
)
WEB_UNIT = "web"
INSTALLED_UNIT = "installed"
WARC_DIR = "warc"

__all__ = ["CrawlConfig", "STAGE", "crawl_documents", "crawl_unit", "plan_crawl_units"]


def _is_web_seed(seed: str) -> bool:
    return seed.startswith((PYDOC_SEED, "http://", "https://"))


def _file_unit_name(path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", path.rsplit("/", 1)[-1]).strip("-")[:40] or "file"
    return f"{stem}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"


def plan_crawl_units(config: CrawlConfig) -> list[WorkUnit]:
    """The crawl's units of work, keyed by what they read.

    A file's key uses fsspec's ``ukey`` (size and modification time locally, the ETag on object
    stores): cheap for multi-GB WARC files, and it changes when the file does. The web unit is
    keyed by its seeds; pydoc's pages also depend on the Python version serving them.
    """
    units: list[WorkUnit] = []
    web_seeds = [s for s in config.seeds if _is_web_seed(s)]
    if web_seeds:
        digest = json.dumps({"seeds": web_seeds, "python": sys.version}, sort_keys=True)
        units.append(
            WorkUnit(
                name=WEB_UNIT,
                key=unit_key(STAGE, config, hashlib.sha256(digest.encode()).hexdigest()),
                source={"kind": "web", "seeds": web_seeds},
            )
        )
    if INSTALLED_SEED in config.seeds:
        units.append(
            WorkUnit(
                name=INSTALLED_UNIT,
                key=unit_key(STAGE, config, installed_digest()),
                source={"kind": "installed"},
            )
        )
    for seed in config.seeds:
        if _is_web_seed(seed) or seed == INSTALLED_SEED:
            continue
        if not is_file_seed(seed):
            raise ValueError(
                f"crawl.seeds: {seed!r} is neither an http(s) URL, 'pydoc:', nor a file path"
            )
        for path in expand_file_seed(seed):
            fs, p = datasets.filesystem(path)
            units.append(
                WorkUnit(
                    name=_file_unit_name(path),
                    key=unit_key(STAGE, config, f"{path}\0{fs.ukey(p)}"),
                    source={"kind": "file", "path": path},
                )
            )
    names = [u.name for u in units]
    if len(set(names)) != len(names):
        raise ValueError("crawl.seeds: the same file is named by more than one seed")
    return units


def crawl_documents(
    unit: WorkUnit, config: CrawlConfig, stage_dir: str, on_document: Callable[[], None]
) -> ShardResult:
    """Read one unit: crawl the web seeds, or read one file, and account for every outcome."""
    with ExitStack() as stack:
        extractor = stack.enter_context(
            BoundedExtractor(timeout_s=config.extract_timeout_s, memory_mb=config.extract_memory_mb)
        )
        if unit.source["kind"] == "installed":
            installed = installed_documents(config.max_page_bytes)
            return documents_result(_counting(installed, on_document))
        if unit.source["kind"] == "file":
            outcomes: Iterator[Document | FetchFailure] = iter_file_documents(
                unit.source["path"], extractor, config.max_page_bytes, config.content_types
            )
            return documents_result(_counting(outcomes, on_document))
        seeds = list(unit.source["seeds"])
        if any(s.startswith(PYDOC_SEED) for s in seeds):
            site = stack.enter_context(pydoc_site())
            if all(s.startswith(PYDOC_SEED) for s in seeds):
                # Our own server on localhost, started for this crawl: politeness protects
                # other people's servers, and here it would only make the default run slow.
                config = config.model_copy(update={"politeness_delay_s": 0.0})
            seeds = [
                site.rstrip("/") + "/" + s.removeprefix(PYDOC_SEED)
                if s.startswith(PYDOC_SEED)
                else s
                for s in seeds
            ]
        warc = None
        if config.write_warc:
            warc_path = datasets.join(stage_dir, WARC_DIR, f"{unit.name}.warc.gz")
            warc = stack.enter_context(WarcRecorder(warc_path))
        outcomes_list = crawl_web(seeds, config, extractor, warc=warc, on_page=on_document)
        return documents_result(outcomes_list)


def _counting(
    outcomes: Iterator[Document | FetchFailure], tick: Callable[[], None]
) -> Iterator[Document | FetchFailure]:
    for outcome in outcomes:
        tick()
        yield outcome


@task(name="crawl-unit", cache_policy=NO_CACHE, persist_result=False)
def crawl_unit(unit: WorkUnit, config: CrawlConfig, stage_dir: str) -> UnitRecord:
    total = config.max_pages if unit.source["kind"] == "web" else None
    label = "pages" if unit.source["kind"] == "web" else "records"
    with StepProgress(f"crawl-{unit.name}", f"crawl {unit.name} ({label})", total) as progress:
        return run_unit(
            stage_dir,
            unit,
            lambda: crawl_documents(unit, config, stage_dir, lambda: progress.advance()),
        )
