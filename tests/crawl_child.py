"""A crawl in a child process that prints "page" for every page, for tests that stop it mid-way.

The crawl runs its units in a worker thread, as the threads runner does, so Ctrl-C reaches it
where it would in a real run. The child is its own process group, killed whole on the way out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmflow.tasks.ingest.crawl_config import CrawlConfig

CHILD = """
import faulthandler
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that sees a hang asks where

from llmflow.tasks.core.stage import run_unit
from llmflow.tasks.ingest import crawl
from llmflow.tasks.ingest.crawl_config import CrawlConfig

cfg = CrawlConfig.model_validate_json(sys.argv[1])
stage_dir = sys.argv[2]

def tick():
    print("page", flush=True)

def crawl_unit(unit):
    return run_unit(
        stage_dir, unit, lambda out: crawl.crawl_documents(unit, cfg, stage_dir, tick, out)
    )

with ThreadPoolExecutor(max_workers=2) as pool:
    for record in pool.map(crawl_unit, crawl.plan_crawl_units(cfg)):
        pass
print("finished", flush=True)
"""


@contextmanager
def crawl_child(cfg: CrawlConfig, stage_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """The crawl of ``cfg`` into ``stage_dir``, running in a child process."""
    process = subprocess.Popen(
        [sys.executable, "-c", CHILD, cfg.model_dump_json(), str(stage_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for_pages(process: subprocess.Popen[str], count: int) -> None:
    """Block until the child has fetched ``count`` pages."""
    assert process.stdout is not None
    for _ in range(count):
        assert process.stdout.readline().strip() == "page", process.stderr
