"""The persistent dedup index: appended to, never read whole, memory bounded by the refresh."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_dedup import edit, make_dataset, outcome, prose

from llmflow.tasks.core import shards
from llmflow.tasks.curate.dedup import (
    DedupConfig,
    deduplicate,
    plan_dedup_units,
    prepare,
    update_index,
)
from llmflow.tasks.curate.dedup_index import DedupIndex, DedupIndexError, batch_name
from llmflow.tasks.curate.dedup_minhash import band_column, band_keys, signature_table

INDEXED = 200_000  # documents already in the index
PART = 50_000  # index rows per file


def synthetic_index(
    directory: str, config: DedupConfig, planted: list[str], size: int = INDEXED
) -> list[str]:
    """An index of ``size`` random signatures in files of PART rows, with the real signatures of
    ``planted`` texts at scattered rows; returns the planted rows' ids."""
    rng = np.random.default_rng(7)
    real = signature_table(
        pa.table({"id": [f"real-{i}" for i in range(len(planted))], "text": planted}), config
    )
    where = {int(row): k for k, row in enumerate(rng.choice(size, len(planted), replace=False))}

    def part(start: int) -> tuple[str, pa.Table]:
        rows = min(PART, size - start)
        minhash = rng.integers(0, 2**32, size=(rows, config.num_perm), dtype=np.uint32)
        keys = band_keys(minhash, config.bands, config.rows_per_band)
        columns = {
            "id": pa.array([f"old-{start + i}" for i in range(rows)]),
            "order": pa.array(rng.integers(0, 2**63, size=rows, dtype=np.uint64)),
            "exact": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(16), rows, [None, pa.py_buffer(rng.bytes(16 * rows))]
            ),
        }
        for b in range(config.bands):
            columns[band_column(b)] = pa.array(keys[:, b])
        flat = pa.array(minhash.reshape(-1))
        columns["minhash"] = pa.FixedSizeListArray.from_arrays(flat, config.num_perm)
        table = pa.table(columns)
        for row, k in where.items():
            if start <= row < start + rows:
                mine = (
                    real.slice(k, 1)
                    .drop_columns(["row"])
                    .add_column(0, "id", pa.array([f"old-{row}"]))
                )
                table = pa.concat_tables(
                    [table.slice(0, row - start), mine, table.slice(row - start + 1)]
                )
        return f"part-{start // PART}", table

    index = DedupIndex(directory)
    index.append(config, "input-earlier", "synthetic", (part(s) for s in range(0, size, PART)))
    return [f"old-{row}" for row, _ in sorted(where.items(), key=lambda item: item[1])]


def test_a_refresh_and_its_index_update_hold_memory_bounded(tmp_path: Path) -> None:
    """A small refresh against a 200k-document index, in a fresh process: its peak memory is
    the refresh's plus a row group of the index, below the index's ~125 MB of files (reading
    any band, or the MinHash of one matched document, from a whole-file batch costs that much
    and more), and its near-duplicates of indexed documents are still found."""
    config = DedupConfig()
    index_dir = str(tmp_path / "index")
    originals = [prose(40 + i) for i in range(4)]
    planted_ids = synthetic_index(index_dir, config, originals)
    docs = [(f"near{i}", edit(t, 0.03, i)) for i, t in enumerate(originals)]
    docs += [(f"new{i}", prose(5000 + i)) for i in range(2000)]
    source = make_dataset(tmp_path, {"a": docs[::2], "b": docs[1::2]})
    stage = str(tmp_path / "dedup")
    # A run of the same size against a small index first, so that the libraries' one-off
    # allocations (thread pools, decoders) are in the baseline and the growth is the index's.
    warm_index = str(tmp_path / "warm-index")
    synthetic_index(warm_index, config, originals, size=20_000)
    warm_docs = [("w0", edit(originals[0], 0.03, 9))]
    warm_docs += [(f"w{i}", prose(9000 + i)) for i in range(1, 2000)]
    warm = make_dataset(tmp_path / "warm", {"a": warm_docs[::2], "b": warm_docs[1::2]})
    warm_stage = str(tmp_path / "warm-dedup")
    child = textwrap.dedent(
        f"""
        import json, re
        from llmflow.tasks.curate.dedup import DedupConfig, deduplicate
        def peak_kb():  # VmHWM starts afresh at exec; ru_maxrss carries pytest's peak over
            status = open("/proc/self/status").read()
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1))
        deduplicate({warm!r}, {warm_stage!r}, DedupConfig(), index_dir={warm_index!r})
        before = peak_kb()
        manifest = deduplicate({source!r}, {stage!r}, DedupConfig(), index_dir={index_dir!r})
        print(json.dumps({{"grown_kb": peak_kb() - before, "stats": manifest["stats"]}}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], check=True, capture_output=True, text=True
    ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stats"]["resolve_index_documents"] == INDEXED
    # ~50 MB measured; the index's files hold ~125 MB, which reading them whole would exceed.
    assert result["grown_kb"] < 80 * 1024, f"peak grew {result['grown_kb'] / 1024:.0f} MB"
    _, rejected = outcome(stage)
    assert sorted((r["url"], r["duplicate_of"]) for r in rejected.values()) == [
        (f"near{i}", planted_ids[i]) for i in range(4)
    ]
    meta = DedupIndex(index_dir).read_meta()
    assert sorted(b["rows"] for b in meta["batches"].values()) == [2000, INDEXED]


def test_an_index_update_reads_no_earlier_batch_and_lists_only_whole_appends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index_dir = str(tmp_path / "index")
    config = DedupConfig(index_dir=index_dir)
    first = make_dataset(tmp_path / "a", {"s": [(f"a{i}", prose(10 + i)) for i in range(6)]})
    deduplicate(first, str(tmp_path / "d1"), config)
    later = make_dataset(tmp_path / "b", {"s": [(f"b{i}", prose(20 + i)) for i in range(3)]})
    stage = str(tmp_path / "d2")
    units, digest = plan_dedup_units(config, later, stage)
    prepare(units, config, stage)
    for earlier in Path(index_dir, "batches").rglob("*.parquet"):
        earlier.write_bytes(b"not parquet")  # an update that read earlier batches would fail

    def killed(path: str, obj: object) -> None:
        raise OSError("killed before the listing was replaced")

    monkeypatch.setattr(shards, "write_json_atomic", killed)
    with pytest.raises(OSError, match="killed"):
        update_index(units, config, stage)
    monkeypatch.undo()
    index = DedupIndex(index_dir)
    assert batch_name(digest) not in index.read_meta()["batches"]  # written, not listed
    assert update_index(units, config, stage) == 3
    assert index.read_meta()["batches"][batch_name(digest)]["rows"] == 3


def rewrite_as_format_1(index_dir: Path) -> None:
    """Format 1: index.json listing one file per batch, holding a "row" column besides."""
    meta = json.loads((index_dir / "index.json").read_text())
    batches = {}
    for name, batch in meta["batches"].items():
        whole = pa.concat_tables([pq.read_table(index_dir / f["path"]) for f in batch["files"]])
        whole = whole.add_column(0, "row", pa.array(np.arange(len(whole), dtype=np.int32)))
        shard = shards.write_shard(str(index_dir), f"batches/{name}.parquet", whole)
        batches[name] = {"rows": len(whole), "file": shard.to_dict()}
    meta = {"format": 1, "params": meta["params"], "batches": batches}
    (index_dir / "index.json").write_text(json.dumps(meta))


def test_an_index_of_format_1_is_read_and_rewritten_as_format_2(tmp_path: Path) -> None:
    """A refresh against a format-1 index gives the decisions a format-2 index gives, and its
    append rewrites index.json as format 2."""
    base = [(f"a{i}", prose(60 + i)) for i in range(8)]
    later = [(f"b{i}", edit(t, 0.03, i)) for i, (_, t) in enumerate(base[:3])]
    later += [base[5], ("new", prose(999))]
    first = make_dataset(tmp_path / "a", {"x": base[:4], "y": base[4:]})
    second = make_dataset(tmp_path / "b", {"s": later})
    decisions = {}
    for fmt in (1, 2):
        index_dir = tmp_path / f"index{fmt}"
        deduplicate(first, str(tmp_path / f"first{fmt}"), DedupConfig(), index_dir=str(index_dir))
        if fmt == 1:
            rewrite_as_format_1(index_dir)
        stage = str(tmp_path / f"second{fmt}")
        deduplicate(second, stage, DedupConfig(), index_dir=str(index_dir))
        kept, rejected = outcome(stage)
        decisions[fmt] = (
            sorted(kept),
            sorted((k, r["reason"], r["detail"], r["duplicate_of"]) for k, r in rejected.items()),
        )
        meta = json.loads((index_dir / "index.json").read_text())
        assert meta["format"] == 2 and len(meta["batches"]) == 2
    assert decisions[1] == decisions[2]
    assert decisions[2][1]  # near-duplicates of documents only the index holds


def test_an_index_of_an_unknown_format_is_refused(tmp_path: Path) -> None:
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    (index_dir / "index.json").write_text(json.dumps({"format": 99, "batches": {}}))
    source = make_dataset(tmp_path, {"s": [("u", prose(1))]})
    with pytest.raises(DedupIndexError, match="format 99 is not 2"):
        deduplicate(source, str(tmp_path / "dedup"), DedupConfig(), index_dir=str(index_dir))
