"""The decontaminate stage against the quality stage, docs per CPU-second, on the same shards.

Builds (or reuses) the curation benchmark corpus (bench/curation_corpus.py: real text from the
shared data, 8 shards) and the 13-gram index of the full MMLU test, HellaSwag validation, ARC-Easy
and -Challenge, PIQA and WinoGrande from ``../shared/data/benchmarks``; then, in one process,
shard by shard, times the decontaminate stage's work (:func:`decontaminate_documents`) and the
quality stage's (:func:`quality_documents`, the product config with language ID, and its rules
alone with language ID stubbed, as bench/curation.py times them against datatrove) in CPU
seconds (``time.process_time``). Each shard is read once and handed to each in turn, so the
ratio compares the work, not the reading. Also reports the index's build and reload time, its
arrays' size and the process's peak RSS, and what the corpus holds of the benchmarks.

    python bench/decontaminate.py [--docs 55000] [--workdir DIR] [--md bench/decontaminate.md]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

BENCH = Path(__file__).resolve().parent
DATA = BENCH.parents[1] / "shared" / "data" / "benchmarks"
TASKS = ["mmlu", "hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande"]


def corpus_dir(workdir: Path, docs: int) -> Path:
    corpus = workdir / f"corpus-{docs}"
    if not (corpus / "manifest.json").exists():
        subprocess.run(
            [sys.executable, str(BENCH / "curation_corpus.py"), "--out", str(corpus),
             "--docs", str(docs)],
            check=True,
        )  # fmt: skip
    return corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=55_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmflow-bench-decontaminate"))
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    corpus = corpus_dir(args.workdir, args.docs)

    from llmflow.tasks.core import shards
    from llmflow.tasks.curate import decontaminate, quality, quality_signals
    from llmflow.tasks.curate.decontaminate import DecontaminateConfig

    config = DecontaminateConfig(
        tasks=TASKS, data_dir=str(DATA), index_dir=str(args.workdir / "index")
    )
    started = time.process_time()
    ref = decontaminate.ensure_index(config)
    first = time.process_time() - started
    decontaminate.cached_index.cache_clear()
    started = time.process_time()
    again = decontaminate.ensure_index(config)
    index = decontaminate.cached_index(again.path)
    reload = time.process_time() - started
    arrays = (index.hashes.nbytes + index.owners.nbytes) / 2**20

    quality_config = quality.QualityConfig()
    identify = quality_signals.identify_languages

    def no_language_id(texts: list[str]) -> list[tuple[str, float]]:
        return [("en", 1.0)] * len(texts)

    seconds: Counter[str] = Counter()
    docs = 0
    per_task: Counter[str] = Counter()
    for shard in shards.manifest_shards(shards.read_manifest(str(corpus))):
        table = shards.read_shard(str(corpus), shard)
        docs += table.num_rows
        started = time.process_time()
        result = decontaminate.decontaminate_documents(table, index, "reject")
        seconds["decontaminate"] += time.process_time() - started
        per_task.update(
            {k.split(".", 1)[1]: v for k, v in result.stats.items() if k.startswith("overlap_")}
        )
        started = time.process_time()
        quality.quality_documents(table, quality_config)
        seconds["quality"] += time.process_time() - started
        quality_signals.identify_languages = no_language_id
        started = time.process_time()
        quality.quality_documents(table, quality_config)
        seconds["quality rules alone"] += time.process_time() - started
        quality_signals.identify_languages = identify
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    lines = [
        f"    {len(index.items):,} items of {', '.join(TASKS)}: {len(index.hashes):,} distinct"
        f" {index.n}-grams, arrays {arrays:.1f} MB",
        f"    index {'built' if ref.built else 'found'} in {first:.1f} CPU-s;"
        f" found and loaded again in {reload:.1f} CPU-s",
        f"    {docs:,} documents in the corpus ({corpus.name})",
    ]
    for name, cpu in seconds.items():
        lines.append(f"    {name:<22} {cpu:7.1f} CPU-s  {docs / cpu:7,.0f} docs/s per core")
    ratio = seconds["quality"] / seconds["decontaminate"]
    alone = seconds["quality rules alone"] / seconds["decontaminate"]
    lines.append(
        f"    decontaminate is {ratio:.1f}x the quality stage's docs/s per core"
        f" ({alone:.1f}x its rules alone)"
    )
    lines.append(f"    documents overlapping an item, per task: {dict(sorted(per_task.items()))}")
    lines.append(f"    peak RSS of the process: {peak:,.0f} MB")
    text = "\n".join(lines)
    print(text)
    if args.md is not None:
        args.md.write_text(text + "\n")


if __name__ == "__main__":
    main()
