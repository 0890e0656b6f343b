"""How dedup's memory grows with the number of documents: peak RSS of every dedup step.

Each step runs in a fresh process that reports its peak resident memory above the interpreter's
baseline (after imports), per document:

- **signatures**: one shard of real text (Gutenberg paragraphs, 1-3 KB documents) through
  ``compute_signatures``. Its memory is a shard's, whatever the dataset's size.
- **resolve**: a first run of N documents, every document at once, with the index on (empty).
- **index update**: that run's kept documents appended to the persistent index.
- **refresh**: a new version of R documents (1% planted near-duplicates of indexed documents,
  1% of the index withdrawn) resolved against the N-document index.

Generating N documents' real MinHashes takes an hour at 1M on two cores, so the resolve, update
and refresh read synthetic signature files (random MinHash values, 1% planted near-duplicates)
written in the format the signatures step writes; their texts are one character (they are not
read past the signatures step).

    python bench/dedup_memory.py [--sizes 200000,1000000] [--refresh 50000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

SHARD_DOCS = 50_000
TEXTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "text" / "gutenberg"


def write_source(root: str, shards_docs: dict[str, list[tuple[str, str]]]) -> None:
    """A finished documents dataset: one shard per entry of (id, text) pairs."""
    from llmflow.tasks.core import shards
    from llmflow.tasks.core.documents import DOCUMENT_SCHEMA
    from llmflow.tasks.core.manifests import finalize_stage
    from llmflow.tasks.core.stage import StageConfig, StageSpec, UnitRecord

    records = []
    for name, docs in shards_docs.items():
        table = pa.Table.from_pylist(
            [{"id": i, "text": t, "url": None, "source": "bench"} for i, t in docs],
            schema=DOCUMENT_SCHEMA,
        )
        shard = shards.write_shard(root, f"{name}.parquet", table)
        records.append(UnitRecord(name, name, len(docs), [shard], [], {}, {}, [], 0.0))
    finalize_stage(root, StageSpec("source", "1"), StageConfig(), records, None)


def build(
    source: str, stage: str, n: int, prefix: str, first_id: int, copy_from: np.ndarray | None
) -> None:
    """``n`` documents in shards of SHARD_DOCS and their synthetic signature files; 1% of the
    rows copy a row of ``copy_from`` (MinHash values of other documents) when given, else of
    their own shard."""
    from llmflow.tasks.core import shards
    from llmflow.tasks.curate.dedup import DedupConfig
    from llmflow.tasks.curate.dedup_minhash import band_column, band_keys, signatures_path

    config = DedupConfig()
    rng = np.random.default_rng(n + first_id)
    docs: dict[str, list[tuple[str, str]]] = {}
    for s, start in enumerate(range(0, n, SHARD_DOCS)):
        count = min(SHARD_DOCS, n - start)
        name = f"{prefix}-{s:05d}"
        docs[name] = [(f"{first_id + start + i:032x}", "x") for i in range(count)]
        signatures = rng.integers(0, 2**32, size=(count, config.num_perm), dtype=np.uint32)
        planted = rng.choice(count, size=count // 100, replace=False)
        donors = signatures if copy_from is None else copy_from
        signatures[planted] = donors[rng.integers(0, len(donors), size=len(planted))]
        keys = band_keys(signatures, config.bands, config.rows_per_band)
        columns = {
            "row": pa.array(np.arange(count, dtype=np.int32)),
            "order": pa.array(rng.integers(0, 2**63, size=count, dtype=np.uint64)),
            "exact": pa.array([rng.bytes(16) for _ in range(count)], pa.binary(16)),
        }
        for b in range(config.bands):
            columns[band_column(b)] = pa.array(keys[:, b])
        flat = pa.array(signatures.reshape(-1))
        columns["minhash"] = pa.FixedSizeListArray.from_arrays(flat, config.num_perm)
        path = signatures_path(stage, name)
        shards.write_shard(path.rpartition("/")[0], f"{name}.parquet", pa.table(columns))
    write_source(source, docs)


def real_texts(n: int) -> list[tuple[str, str]]:
    """``n`` documents of 1-3 KB made of Gutenberg paragraphs."""
    paragraphs = []
    for path in sorted(TEXTS.rglob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs += [p.strip() for p in re.split(r"\n\s*\n", text) if len(p) > 200]
    rng = random.Random(n)
    docs = []
    for i in range(n):
        target, parts = rng.randint(1000, 3000), []
        while sum(map(len, parts)) < target:
            parts.append(rng.choice(paragraphs))
        docs.append((f"{i:032x}", "\n\n".join(parts)[:target]))
    return docs


# --- the steps, each in a fresh process ---------------------------------------------------------


def peak_rss() -> int:
    """This process's peak resident memory in bytes: VmHWM, which starts afresh at exec (Linux's
    ru_maxrss carries the parent's peak into a child, hiding the child's own growth)."""
    found = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    if found is None:
        raise RuntimeError("no VmHWM in /proc/self/status: this bench measures memory on Linux")
    return int(found.group(1)) * 1024


def step(name: str, source: str, stage: str) -> dict[str, Any]:
    """One dedup step in this process; peak RSS above the baseline after imports and planning."""
    from llmflow.tasks.curate.dedup import DedupConfig, plan_dedup_units, update_index
    from llmflow.tasks.curate.dedup_minhash import compute_signatures
    from llmflow.tasks.curate.dedup_resolve import resolve_duplicates

    config = DedupConfig()
    withdrawn = str(Path(source).parent / "withdrawn.parquet")
    units, _ = plan_dedup_units(config, source, stage, withdrawn if name == "refresh" else None)
    baseline = peak_rss()
    started = time.perf_counter()
    stats: dict[str, Any] = {}
    if name == "signatures":
        for unit in units:
            compute_signatures(unit, config, stage)
    elif name == "update":
        stats["appended"] = update_index(units, config, stage)
    else:
        stats = dict(resolve_duplicates(units, config, stage))
    seconds = time.perf_counter() - started
    peak = peak_rss()
    return {"baseline": baseline, "peak": peak, "seconds": seconds, "stats": stats}


def run_step(name: str, source: str, stage: str, docs: int, label: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--step", name, source, stage],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    grown = result["peak"] - result["baseline"]
    stats = {k: v for k, v in result["stats"].items() if k in ("clusters", "appended")}
    print(
        f"{label:<34} peak {result['peak'] / 2**20:7.1f} MB  above baseline"
        f" {grown / 2**20:7.1f} MB = {grown / docs:6.0f} B/doc"
        f"  {result['seconds']:6.1f} s  {stats}",
        flush=True,
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="200000,1000000")
    parser.add_argument("--refresh", type=int, default=50_000, help="documents in the refresh")
    parser.add_argument("--text-shard", type=int, default=10_000, help="signatures step shard")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--step", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        print(json.dumps(step(*args.step)))
        return
    from llmflow.tasks.core import shards
    from llmflow.tasks.curate.dedup_minhash import signatures_path

    root = Path(args.workdir or tempfile.mkdtemp(prefix="dedup-memory-"))
    shutil.rmtree(root, ignore_errors=True)
    text = root / "text"
    write_source(str(text / "source"), {"text-00000": real_texts(args.text_shard)})
    label = f"signatures, one shard of {args.text_shard:,}"
    run_step("signatures", str(text / "source"), str(text / "dedup"), args.text_shard, label)
    for n in (int(s) for s in args.sizes.split(",")):
        work = root / str(n)
        stage = str(work / "dedup")
        build(str(work / "first"), stage, n, "first", 0, None)
        run_step("resolve", str(work / "first"), stage, n, f"resolve, first run of {n:,}")
        run_step("update", str(work / "first"), stage, n, f"index update, {n:,}")
        indexed = shards.read_parquet(signatures_path(stage, "first-00000"), ["minhash"])
        donors = np.asarray(indexed.column(0).combine_chunks().values).reshape(len(indexed), -1)
        build(str(work / "refresh"), stage, args.refresh, "refresh", 10**15, donors)
        gone = [f"{i:032x}" for i in range(0, n, 100)]
        shards.write_shard(str(work), "withdrawn.parquet", pa.table({"id": pa.array(gone)}))
        label = f"refresh of {args.refresh:,} against {n:,}"
        run_step("refresh", str(work / "refresh"), stage, n + args.refresh, label)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
