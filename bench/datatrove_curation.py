"""datatrove's side of bench/curation.py: FineWeb's quality filters and MinHash dedup, one worker.

Runs under datatrove's own virtual environment (datatrove is not a project dependency, and this
file is never imported by the project)::

    <datatrove-python> bench/datatrove_curation.py quality --input CORPUS --work DIR
    <datatrove-python> bench/datatrove_curation.py dedup   --input CORPUS --work DIR

Both read the corpus's Parquet shards (``part-*.parquet``) with datatrove's ParquetReader, as one
task on one worker (``LocalPipelineExecutor(tasks=1, workers=1)`` runs the task in this process).

* ``quality``: GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter(
  filter_no_terminal_punct=False) -> FineWebQualityFilter, with their defaults: FineWeb's
  pipeline without its LanguageFilter (its fastText model downloads from the Hugging Face hub,
  unreachable here). Each filter's exclusion writer records the id and datatrove's reason of every
  document it removed; a last writer records the kept ids. Output: ``DIR/quality.jsonl``, one line
  per document ``{"id", "kept", "step", "reason"}``.
* ``dedup``: MinhashDedupSignature -> MinhashDedupBuckets -> MinhashDedupCluster ->
  MinhashDedupFilter with ``MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5)``
  (FineWeb's settings; datatrove's default 64-bit xxhash). Buckets run as 14 tasks (datatrove
  requires tasks divisible by buckets), one after another on the one worker. Cluster ids are saved
  so each removed document can be paired with the document its cluster kept. Output:
  ``DIR/dedup.jsonl``, one line per document ``{"id", "kept", "cluster"}`` (cluster -1: none).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import (
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.writers import JsonlWriter

QUALITY_STEPS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")


def _reader(corpus: str) -> ParquetReader:
    # Only id and text: the other columns would become metadata nobody reads.
    return ParquetReader(corpus, glob_pattern="part-*.parquet", read_metadata=False)


def _ids_writer(folder: str, with_reason: bool = False, with_cluster: bool = False) -> JsonlWriter:
    def adapter(self, doc) -> dict:  # noqa: ANN001 (datatrove's adapter signature)
        row = {"id": doc.id}
        if with_reason:
            row["reason"] = doc.metadata.get("filter_reason")
        if with_cluster:
            row["cluster"] = doc.metadata.get("minhash_cluster_id", -1)
        return row

    return JsonlWriter(folder, compression=None, adapter=adapter)


def _read_jsonl(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("*.jsonl")):
        with open(path) as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    return rows


def run_quality(corpus: str, work: Path) -> dict:
    out = work / "dt-quality"
    filters = [
        GopherRepetitionFilter(exclusion_writer=_ids_writer(str(out / "x0"), with_reason=True)),
        GopherQualityFilter(exclusion_writer=_ids_writer(str(out / "x1"), with_reason=True)),
        C4QualityFilter(
            filter_no_terminal_punct=False,
            exclusion_writer=_ids_writer(str(out / "x2"), with_reason=True),
        ),
        FineWebQualityFilter(exclusion_writer=_ids_writer(str(out / "x3"), with_reason=True)),
    ]
    LocalPipelineExecutor(
        pipeline=[_reader(corpus), *filters, _ids_writer(str(out / "kept"))],
        tasks=1,
        workers=1,
        logging_dir=str(out / "logs"),
    ).run()
    rows = [
        {"id": r["id"], "kept": True, "step": None, "reason": None}
        for r in _read_jsonl(out / "kept")
    ]
    for i, step in enumerate(QUALITY_STEPS):
        for r in _read_jsonl(out / f"x{i}"):
            rows.append({"id": r["id"], "kept": False, "step": step, "reason": r.get("reason")})
    _write_rows(work / "quality.jsonl", rows)
    return {"docs": len(rows), "kept": sum(r["kept"] for r in rows)}


def run_dedup(corpus: str, work: Path) -> dict:
    out = work / "dt-dedup"
    config = MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5)
    common = {"workers": 1}
    LocalPipelineExecutor(
        pipeline=[_reader(corpus), MinhashDedupSignature(str(out / "signatures"), config=config)],
        tasks=1,
        logging_dir=str(out / "logs" / "signatures"),
        **common,
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            MinhashDedupBuckets(str(out / "signatures"), str(out / "buckets"), config=config)
        ],
        tasks=config.num_buckets,
        logging_dir=str(out / "logs" / "buckets"),
        **common,
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            MinhashDedupCluster(
                str(out / "buckets"), str(out / "remove_ids"), config=config, save_cluster_id=True
            )
        ],
        tasks=1,
        logging_dir=str(out / "logs" / "clusters"),
        **common,
    ).run()
    LocalPipelineExecutor(
        pipeline=[
            _reader(corpus),
            MinhashDedupFilter(
                str(out / "remove_ids"),
                exclusion_writer=_ids_writer(str(out / "removed"), with_cluster=True),
                load_cluster_ids=True,
            ),
            _ids_writer(str(out / "kept"), with_cluster=True),
        ],
        tasks=1,
        logging_dir=str(out / "logs" / "filter"),
        **common,
    ).run()
    rows = [
        {"id": r["id"], "kept": True, "cluster": r["cluster"]} for r in _read_jsonl(out / "kept")
    ]
    rows += [
        {"id": r["id"], "kept": False, "cluster": r["cluster"]}
        for r in _read_jsonl(out / "removed")
    ]
    _write_rows(work / "dedup.jsonl", rows)
    return {"docs": len(rows), "kept": sum(r["kept"] for r in rows)}


def _write_rows(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="datatrove's side of bench/curation.py")
    parser.add_argument("stage", choices=("quality", "dedup"))
    parser.add_argument("--input", required=True, help="the corpus directory (part-*.parquet)")
    parser.add_argument("--work", required=True, type=Path, help="a fresh working directory")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    started, cpu = time.perf_counter(), time.process_time()
    run = run_quality if args.stage == "quality" else run_dedup
    summary = run(os.path.abspath(args.input), args.work)
    summary |= {
        "stage": args.stage,
        "inner_wall_s": round(time.perf_counter() - started, 3),
        "inner_cpu_s": round(time.process_time() - cpu, 3),
    }
    (args.work / f"{args.stage}-summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
