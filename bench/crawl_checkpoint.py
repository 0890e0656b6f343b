"""What one web-crawl checkpoint costs as the crawl grows (``crawl.checkpoint_pages``).

Run from the repository root: ``python bench/crawl_checkpoint.py``. For each size, a crawl of
that many pages fetched is modelled as the checkpoint sees it: five URLs seen per page (the
seen set), four on the frontier (this level's rest and the next level so far), one fetch
failure in twenty pages, and ten output parts; the figure is the median wall time of
:func:`save_checkpoint` (the seen set merged and written as Parquet, then the JSON, atomically)
over five saves, each after one more batch of 1,000 pages' URLs joined the seen set. The
batch's documents and page states are written by the crawl whether or not it checkpoints, and
are not counted here.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import UnitRecord
from llmflow.tasks.ingest.crawl_checkpoint import (
    CrawlCheckpoint,
    Frontier,
    SeenSet,
    save_checkpoint,
)

SIZES = (1_000, 20_000, 100_000)
BATCH = 1_000


def url(i: int) -> str:
    return f"https://docs.example.org/section-{i % 97}/page-{i}.html"


def one_size(pages: int, folder: str) -> tuple[float, int]:
    seen = SeenSet(lambda u: u)
    seen.update(url(i) for i in range(5 * pages))
    seen.compact()
    frontier = Frontier(
        depth=3,
        level=[url(i) for i in range(pages, 3 * pages)],
        found=[url(i) for i in range(3 * pages, 5 * pages)],
        pages=pages,
    )
    part = shards.ShardFile("web.00000.parquet", 1000, 10_000_000, "0" * 64)
    failures = [
        {"url": url(i), "reason": "http_4xx", "detail": "", "status": 404}
        for i in range(0, pages, 20)
    ]
    seconds = []
    for round_ in range(5):
        seen.update(url(10 * pages + round_ * 5 * BATCH + i) for i in range(5 * BATCH))
        done = UnitRecord(
            name="web",
            key="k" * 64,
            docs_in=pages,
            parts=[part] * 10,
            rejected=[],
            reasons={},
            stats={"unchanged_not_modified": 0},
            failures=failures,
            seconds=0.0,
        )
        checkpoint = CrawlCheckpoint(done, round_ + 1, frontier)
        started = time.perf_counter()
        save_checkpoint(folder, checkpoint, seen)
        seconds.append(time.perf_counter() - started)
    size = sum(
        len(shards.read_bytes(shards.join(folder, n))) for n in shards.list_names(folder, "")
    )
    return statistics.median(seconds), size


def main() -> None:
    print("| pages fetched | URLs seen | checkpoint (ms) | on disk (KiB) |")
    print("|---|---|---|---|")
    for pages in SIZES:
        with tempfile.TemporaryDirectory() as folder:
            seconds, size = one_size(pages, folder)
        print(f"| {pages:,} | {5 * pages:,} | {seconds * 1000:.1f} | {size // 1024:,} |")


if __name__ == "__main__":
    main()
