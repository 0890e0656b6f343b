"""Big inputs: a unit's output is cut into parts of a bounded size as it is read.

One big JSONL file must give the same documents as the same records in small files, as several
shards (so every later stage gets several units), with memory bounded by the shard size rather
than the file size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import DOCUMENT_SCHEMA
from llmflow.tasks.core.stage import UnitRecord, WorkUnit, plan_shard_units, run_unit
from llmflow.tasks.core.unit_output import ShardResult, UnitOutput, is_part_of
from llmflow.tasks.curate import normalize
from llmflow.tasks.ingest import crawl
from llmflow.tasks.ingest.crawl_config import CrawlConfig

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "keep",
    "count",
]


def records(n: int, start: int = 0, words: int = 60) -> list[dict[str, str]]:
    """Distinct records of a few hundred bytes each, deterministic."""
    out = []
    for i in range(start, start + n):
        text = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(words)) + f" number {i}."
        out.append({"url": f"https://example.org/doc/{i}", "text": text})
    return out


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def crawl_files(seeds: list[str], stage_dir: Path, **settings: int) -> dict:
    """The crawl stage over file seeds, unit by unit, then its manifest."""
    config = CrawlConfig(seeds=seeds, write_warc=False, **settings)
    units = crawl.plan_crawl_units(config)
    done = [crawl.crawl_unit.fn(u, config, str(stage_dir)) for u in units]
    return crawl.finish(units, config, str(stage_dir), done, None)


def documents(stage_dir: Path, manifest: dict) -> list[tuple[str, str, str]]:
    rows = []
    for shard in shards.manifest_shards(manifest):
        table = shards.read_shard(str(stage_dir), shard, ["id", "url", "text"])
        rows += [(r["id"], r["url"], r["text"]) for r in table.to_pylist()]
    return rows


def test_big_jsonl_is_several_units_with_the_small_files_documents(tmp_path: Path) -> None:
    rows = records(250)
    big = write_jsonl(tmp_path / "big.jsonl", rows)
    small = [
        write_jsonl(tmp_path / f"small-{i}.jsonl", rows[i * 50 : (i + 1) * 50]) for i in range(5)
    ]

    big_manifest = crawl_files([big], tmp_path / "big", shard_docs=60)
    small_manifest = crawl_files(small, tmp_path / "small")

    parts = [s.path for s in shards.manifest_shards(big_manifest)]
    assert len(parts) == 5  # 250 documents, 60 a shard
    assert all(p.endswith(f".{i:05d}.parquet") for i, p in enumerate(parts))
    assert [s.rows for s in shards.manifest_shards(big_manifest)] == [60, 60, 60, 60, 10]
    # Same documents, same ids, in the file's order.
    assert documents(tmp_path / "big", big_manifest) == documents(
        tmp_path / "small", small_manifest
    )
    assert [d[1] for d in documents(tmp_path / "big", big_manifest)] == [r["url"] for r in rows]

    # Every part is a unit of the next stage.
    units, _ = plan_shard_units(normalize.STAGE, normalize.NormalizeConfig(), str(tmp_path / "big"))
    assert len(units) == 5

    # A re-run skips the unit; the same manifest bytes.
    before = (tmp_path / "big" / shards.MANIFEST_NAME).read_bytes()
    crawl_files([big], tmp_path / "big", shard_docs=60)
    assert (tmp_path / "big" / shards.MANIFEST_NAME).read_bytes() == before


def test_bigger_shards_replace_the_parts_and_leave_no_stale_file(tmp_path: Path) -> None:
    big = write_jsonl(tmp_path / "big.jsonl", records(100))
    stage = tmp_path / "crawl"
    crawl_files([big], stage, shard_docs=30)
    assert len(list(stage.glob("*.parquet"))) == 4
    manifest = crawl_files([big], stage, shard_docs=1000)
    (only,) = shards.manifest_shards(manifest)
    assert only.rows == 100 and is_part_of(only.path, only.path.removesuffix(".parquet"))
    assert sorted(p.name for p in stage.glob("*.parquet")) == [only.path]


def test_unit_output_cuts_by_rows_and_bytes_and_keeps_order(tmp_path: Path) -> None:
    table = pa.table({"n": list(range(1000)), "pad": ["x" * 100] * 1000})
    output = UnitOutput(str(tmp_path), "u", max_rows=300)
    for start in range(0, 1000, 70):  # batches that do not line up with the parts
        output.keep(table.slice(start, 70))
    parts, rejected = output.close(table.schema)
    assert [p.rows for p in parts] == [300, 300, 300, 100] and rejected == []
    back = pa.concat_tables(shards.read_shard(str(tmp_path), p) for p in parts)
    assert back.column("n").to_pylist() == list(range(1000))

    by_bytes = UnitOutput(str(tmp_path / "b"), "u", max_bytes=table.nbytes // 4)
    by_bytes.keep(table)
    parts, _ = by_bytes.close(table.schema)
    assert 4 <= len(parts) <= 5 and sum(p.rows for p in parts) == 1000

    # Small enough for one part: the unit's own name, as before parts existed.
    one = UnitOutput(str(tmp_path / "c"), "u", max_rows=5000)
    one.keep(table)
    (part,), _ = one.close(table.schema)
    assert part.path == "u.parquet" and part.rows == 1000


def test_a_unit_that_keeps_nothing_is_an_empty_shard(tmp_path: Path) -> None:
    unit = WorkUnit(name="empty", key="k", source={})
    empty = DOCUMENT_SCHEMA.empty_table()
    record = run_unit(
        str(tmp_path),
        unit,
        lambda _: ShardResult(kept=empty, rejected=empty, docs_in=0),
        max_rows=10,
    )
    assert [(p.path, p.rows) for p in record.parts] == [("empty.parquet", 0)]
    assert record.rejected == []
    assert UnitRecord.from_dict(record.to_dict()) == record


_PEAK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from llmflow.tasks.ingest import crawl
    from llmflow.tasks.ingest.crawl_config import CrawlConfig

    path, stage_dir, shard_docs = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # A small read first: imports and Arrow's pools are not what is measured.
    warm = CrawlConfig(seeds=[sys.argv[4]], write_warc=False, shard_docs=shard_docs)
    (unit,) = crawl.plan_crawl_units(warm)
    crawl.crawl_unit.fn(unit, warm, stage_dir + "-warm")
    config = CrawlConfig(seeds=[path], write_warc=False, shard_docs=shard_docs)

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    # ru_maxrss would carry the parent's peak across exec: VmHWM, reset here, is this read's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    (unit,) = crawl.plan_crawl_units(config)
    record = crawl.crawl_unit.fn(unit, config, stage_dir)
    after = status("VmHWM")
    print(json.dumps({"parts": len(record.parts), "growth_kb": after - before}))
    """
)


def test_reading_a_big_file_holds_one_shard_in_memory(tmp_path: Path) -> None:
    """The peak grows with the shard, not with the file: the same 30 MB file read into
    shards of 1,000 documents needs far less memory than read into one shard."""
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for start in range(0, 20_000, 5_000):
            f.writelines(json.dumps(r) + "\n" for r in records(5_000, start, words=250))
    assert path.stat().st_size > 20_000_000
    warm = write_jsonl(tmp_path / "warm.jsonl", records(2_000, words=250))

    def peak(shard_docs: int) -> dict:
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(path), str(tmp_path / str(shard_docs)),
             str(shard_docs), warm],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return json.loads(done.stdout.strip().splitlines()[-1])

    bounded, whole = peak(1_000), peak(1_000_000)
    assert bounded["parts"] == 20 and whole["parts"] == 1
    # Measured here: ~4 MB against ~40 MB; unbounded reading would make them equal.
    assert bounded["growth_kb"] * 2 < whole["growth_kb"], (bounded, whole)
