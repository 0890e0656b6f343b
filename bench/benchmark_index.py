"""The decontamination index on full benchmark sets: items, n-grams, build time and memory.

Builds the 13-gram index (:mod:`llmflow.tasks.curate.benchmark_ngrams`) of the full MMLU test,
HellaSwag validation, ARC-Easy and -Challenge, PIQA and WinoGrande from ``../shared/data/
benchmarks`` in a fresh process and reports its peak memory above the baseline after imports
(VmHWM), the index's own size and the CPU time to build it; then the CPU time to check
documents against it.

    python bench/benchmark_index.py [--n 13]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmarks"
TASKS = ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"]


def peak_mb() -> float:
    status = Path("/proc/self/status").read_text()
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    assert found is not None, "VmHWM needs Linux"
    return int(found.group(1)) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=13)
    args = parser.parse_args()
    from llmflow.tasks.curate.benchmark_ngrams import benchmark_items, build_index

    baseline = peak_mb()
    started = time.process_time()
    items = list(benchmark_items(TASKS, DATA))
    read = time.process_time() - started
    index = build_index(items, args.n)
    built = time.process_time() - started - read
    size = (index.hashes.nbytes + index.owners.nbytes) / 2**20
    print(
        f"{len(items):,} items of {', '.join(TASKS)}: {len(index.hashes):,} distinct {args.n}-grams"
    )
    print(f"read {read:.1f} CPU-s, index built in {built:.1f} CPU-s; arrays {size:.1f} MB")
    print(f"peak memory above baseline: {peak_mb() - baseline:.0f} MB")
    from llmflow.tasks.curate.benchmark_ngrams import simplify

    sample = items[:: max(1, len(items) // 2000)]
    texts = [f"{item.text} {item.text} {item.text}" for item in sample]
    long_enough = sum(len(simplify(item.text)) >= args.n for item in sample)
    started = time.process_time()
    hits = sum(bool(index.matches(t)) for t in texts)
    seconds = time.process_time() - started
    chars = sum(map(len, texts))
    print(
        f"checked {len(texts):,} texts ({chars / len(texts):,.0f} chars each) in {seconds:.2f}"
        f" CPU-s: {len(texts) / seconds:,.0f} texts/s; {hits} found contaminated, of the"
        f" {long_enough} whose item has {args.n} words or more"
    )


if __name__ == "__main__":
    main()
