"""How dedup's memory grows with the number of documents: peak RSS of the resolve step.

The signatures step works one shard at a time (its memory is a shard's, whatever the dataset's
size); the resolve step sees every document at once. This script writes datasets of N documents
(short texts: the text is not read by resolve) with signature files of random MinHash values and
1% planted near-duplicates, runs the resolve step for each N in a fresh process, and reports the
peak resident memory above the interpreter's baseline, per document.

    python bench/dedup_memory.py [--sizes 100000,200000,400000,800000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

SHARD_DOCS = 50_000


def build(root: Path, n: int) -> tuple[str, str]:
    """An input dataset of ``n`` documents and the dedup stage dir with their signatures."""
    from llmflow.tasks.core import shards
    from llmflow.tasks.core.documents import DOCUMENT_SCHEMA
    from llmflow.tasks.core.manifests import finalize_stage
    from llmflow.tasks.core.stage import StageSpec, UnitRecord
    from llmflow.tasks.curate.dedup import DedupConfig
    from llmflow.tasks.curate.dedup_minhash import band_column, band_keys, signatures_path

    config = DedupConfig(incremental=False)
    rng = np.random.default_rng(n)
    source, stage = str(root / "source"), str(root / "dedup")
    records = []
    for s, start in enumerate(range(0, n, SHARD_DOCS)):
        count = min(SHARD_DOCS, n - start)
        ids = [f"{start + i:032x}" for i in range(count)]
        table = pa.Table.from_pylist(
            [{"id": i, "text": "x", "url": None, "source": "bench"} for i in ids],
            schema=DOCUMENT_SCHEMA,
        )
        name = f"part-{s:05d}"
        shard = shards.write_shard(source, f"{name}.parquet", table)
        records.append(UnitRecord(name, name, count, shard, None, {}, {}, [], 0.0))
        signatures = rng.integers(0, 2**32, size=(count, config.num_perm), dtype=np.uint32)
        planted = rng.choice(count, size=count // 100, replace=False)
        signatures[planted] = signatures[(planted + 1) % count]  # 1% near-duplicates
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
    finalize_stage(source, StageSpec("source", "1"), config, records, None)
    return source, stage


def measure(source: str, stage: str) -> dict[str, float]:
    """Run in a fresh process: baseline RSS after imports, then peak RSS of the resolve step."""
    from llmflow.tasks.curate.dedup import DedupConfig, plan_dedup_units
    from llmflow.tasks.curate.dedup_resolve import resolve_duplicates

    config = DedupConfig(incremental=False)
    units, _ = plan_dedup_units(config, source, stage)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    started = time.perf_counter()
    stats = resolve_duplicates(units, config, stage)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "baseline_mb": baseline / 2**20,
        "peak_mb": peak / 2**20,
        "seconds": seconds,
        "clusters": stats["clusters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,200000,400000,800000")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    root = Path(args.workdir or tempfile.mkdtemp(prefix="dedup-memory-"))
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        work = root / str(n)
        shutil.rmtree(work, ignore_errors=True)
        source, stage = build(work, n)
        out = subprocess.run(
            [sys.executable, __file__, "--measure", source, stage],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        grown = (result["peak_mb"] - result["baseline_mb"]) * 2**20
        rows.append((n, result, grown / n))
        print(
            f"{n:>9,} docs  peak {result['peak_mb']:7.1f} MB  above baseline"
            f" {grown / 2**20:7.1f} MB  = {grown / n:6.0f} B/doc  resolve {result['seconds']:.1f} s"
            f"  clusters {result['clusters']}",
            flush=True,
        )
        shutil.rmtree(work, ignore_errors=True)
    if len(rows) >= 2:
        (n0, r0, _), (n1, r1, _) = rows[0], rows[-1]
        slope = (r1["peak_mb"] - r0["peak_mb"]) * 2**20 / (n1 - n0)
        print(f"marginal memory: {slope:.0f} bytes per additional document")


if __name__ == "__main__":
    main()
