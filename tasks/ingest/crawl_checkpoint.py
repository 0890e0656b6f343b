"""What a long web crawl keeps to resume: its frontier, the URLs it has seen, what it wrote.

A crawl writes its output a batch at a time (``crawl.checkpoint_pages`` pages); after each batch
it saves a checkpoint here, last, so a crawl killed at any moment resumes from its last batch and
fetches none of the pages before it again. Everything else a crawl holds grows with the site, so
it is on disk by then (documents in the unit's parts, page states in ``_state/`` parts, responses
in one WARC file per batch); what stays in memory is the frontier and the seen set.

The seen set holds 8-byte digests of URLs (blake2b): a sorted NumPy array plus a Python set of
the digests added since the last batch, about 8 bytes per URL where a set of URL strings takes
over a hundred. Two URLs share a digest with probability about n²/2⁶⁵ (one in 4,000 at 100
million URLs): the second would count as seen and not be fetched.

Files, under ``_state/<unit>.checkpoint/``: ``seen-<batch>.parquet`` (the digests),
``frontier-<batch>.parquet`` (the URLs left) and ``checkpoint.json`` (everything else, naming
the two), written last and atomically; a checkpoint made for another unit key is ignored. JSON
and Parquet only: a checkpoint may come from another machine, and loading it must never run
code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import UnitRecord

__all__ = [
    "CrawlCheckpoint",
    "Frontier",
    "SeenSet",
    "load_checkpoint",
    "remove_checkpoint",
    "save_checkpoint",
    "url_digest",
]

CHECKPOINT_NAME = "checkpoint.json"
# Bumped when the checkpoint's fields change: an older one is then ignored (a fresh crawl).
FORMAT = 1


def url_digest(url: str) -> int:
    """A URL's 8-byte digest, as the unsigned integer the seen set stores."""
    return int.from_bytes(hashlib.blake2b(url.encode("utf-8"), digest_size=8).digest(), "little")


class SeenSet:
    """The URLs a crawl has put on its frontier (or tried), as digests of ``key(url)``.

    ``key`` spells a URL the way it is stored (pydoc's pages without their server's port, which
    changes every run). Digests added since the last :meth:`compact` can be taken back
    (:meth:`discard`): what an interrupted batch added is undone before its checkpoint.
    """

    def __init__(self, key: Callable[[str], str], digests: np.ndarray | None = None) -> None:
        self.key = key
        self.sorted = digests if digests is not None else np.empty(0, np.uint64)
        self.recent: set[int] = set()

    def __contains__(self, url: str) -> bool:
        return self._has(url_digest(self.key(url)))

    def _has(self, digest: int) -> bool:
        if digest in self.recent:
            return True
        i = int(np.searchsorted(self.sorted, np.uint64(digest)))
        return i < len(self.sorted) and int(self.sorted[i]) == digest

    def __len__(self) -> int:
        return len(self.sorted) + len(self.recent)

    def add(self, url: str) -> None:
        digest = url_digest(self.key(url))
        if not self._has(digest):
            self.recent.add(digest)

    def update(self, urls: Iterable[str]) -> None:
        for url in urls:
            self.add(url)

    def discard(self, url: str) -> None:
        """Forget a URL added since the last :meth:`compact` (older ones stay)."""
        self.recent.discard(url_digest(self.key(url)))

    def compact(self) -> np.ndarray:
        """Merge the recent digests into the sorted array (and return it)."""
        if self.recent:
            # None of them is in the array yet (add checks): one pass inserts them in order.
            recent = np.sort(np.fromiter(self.recent, np.uint64, len(self.recent)))
            self.sorted = np.insert(self.sorted, np.searchsorted(self.sorted, recent), recent)
            self.recent = set()
        return self.sorted


@dataclass
class Frontier:
    """Where a crawl stands between two batches.

    ``level`` holds the URLs of the current depth not tried yet, in the order links were found;
    ``found`` the next level's links so far (each once, none already seen). ``phase`` is
    ``links`` during the breadth-first crawl, then ``orphans`` while a refresh asks again for
    pages the last crawl saw and no link reaches now. ``pages`` counts pages fetched (what
    ``max_pages`` bounds); ``stats`` are the crawler's own counters.
    """

    depth: int = 0
    phase: str = "links"
    level: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    pages: int = 0
    stats: dict[str, int] = field(default_factory=dict)


@dataclass
class CrawlCheckpoint:
    """A crawl unit's state after its last complete batch: what the batches so far wrote and
    counted (``done``: the marker the unit will have, so far), how many there were (each wrote
    a page-state part and a WARC file) and the frontier."""

    done: UnitRecord
    batches: int
    frontier: Frontier


def save_checkpoint(directory: str, checkpoint: CrawlCheckpoint, seen: SeenSet) -> None:
    """Write the seen set and the frontier, then the checkpoint that names them (atomically),
    then drop the older files: a crash at any point leaves the last complete checkpoint.

    The URL lists go to Parquet and the JSON is compact: at 20,000 pages a checkpoint holds a
    hundred thousand URLs, which indented JSON took most of a second to write."""
    n = checkpoint.batches
    seen_name, frontier_name = f"seen-{n:05d}.parquet", f"frontier-{n:05d}.parquet"
    shards.write_shard(
        directory, seen_name, pa.table({"digest": pa.array(seen.compact(), pa.uint64())})
    )
    f = checkpoint.frontier
    urls = pa.array(f.level + f.found, pa.string())
    found = pa.array([False] * len(f.level) + [True] * len(f.found), pa.bool_())
    shards.write_shard(directory, frontier_name, pa.table({"url": urls, "found": found}))
    body = {
        "format": FORMAT,
        "done": checkpoint.done.to_dict(),
        "batches": n,
        "seen": seen_name,
        "frontier": frontier_name,
        "position": {"depth": f.depth, "phase": f.phase, "pages": f.pages, "stats": f.stats},
    }
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    shards.write_bytes_atomic(shards.join(directory, CHECKPOINT_NAME), text.encode("utf-8"))
    for name in shards.list_names(directory, ".parquet"):
        if name not in (seen_name, frontier_name):
            shards.remove(shards.join(directory, name))


def load_checkpoint(
    directory: str, key: str, spell: Callable[[str], str]
) -> tuple[CrawlCheckpoint, SeenSet] | None:
    """The unit's checkpoint and seen set, or None when there is none for this ``key`` (never
    made, made by another unit key or format, or unreadable: the crawl then starts afresh)."""
    path = shards.join(directory, CHECKPOINT_NAME)
    if not shards.exists(path):
        return None
    try:
        body = shards.read_json(path)
        done = UnitRecord.from_dict(body["done"])
        if body.get("format") != FORMAT or done.key != key:
            return None
        digests = shards.read_parquet(shards.join(directory, body["seen"])).column("digest")
        table = shards.read_parquet(shards.join(directory, body["frontier"]))
        urls, found = table.column("url").to_pylist(), table.column("found").to_pylist()
        position = body["position"]
        frontier = Frontier(
            depth=int(position["depth"]),
            phase=str(position["phase"]),
            level=[u for u, later in zip(urls, found, strict=True) if not later],
            found=[u for u, later in zip(urls, found, strict=True) if later],
            pages=int(position["pages"]),
            stats=dict(position["stats"]),
        )
        checkpoint = CrawlCheckpoint(done, int(body["batches"]), frontier)
    except (ValueError, KeyError, TypeError, OSError):
        return None  # a checkpoint that does not read is a fresh crawl, never half-trusted
    return checkpoint, SeenSet(spell, digests.to_numpy().astype(np.uint64))


def remove_checkpoint(directory: str) -> None:
    """Drop a unit's checkpoint (its crawl is complete, or starts afresh)."""
    fs, p = shards.filesystem(directory)
    if fs.exists(p):
        fs.rm(p, recursive=True)
