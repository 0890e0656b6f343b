"""The mechanism every stage uses: shard_files, rejected sets, manifests, keyed skip and resume."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow.parquet as pq
import pytest

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import Document, FetchFailure
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    WorkUnit,
    plan_shard_units,
    read_unit_input,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import documents_result
from llmflow.tasks.curate.normalize import STAGE as NORMALIZE
from llmflow.tasks.curate.normalize import NormalizeConfig, normalize_documents
from llmflow.tasks.ingest.crawl_config import CrawlConfig

SOURCE = StageSpec(name="source", version="1")
WHEN = datetime(2026, 1, 2, tzinfo=UTC)


def _docs(prefix: str, n: int) -> list[Document | FetchFailure]:
    docs: list[Document | FetchFailure] = [
        Document(
            url=f"http://x/{prefix}{i}",
            text=f"Text\u00a0 {prefix} {i}  ",
            source="t",
            fetched_at=WHEN,
        )
        for i in range(n)
    ]
    docs.append(Document(url=f"http://x/{prefix}-blank", text=" \t\n", source="t", fetched_at=WHEN))
    docs.append(
        Document(url=f"http://x/{prefix}-bin", text="", source="t", reject_reason="binary_content")
    )
    docs.append(FetchFailure(url=f"http://x/{prefix}-404", reason="http_4xx", status=404))
    return docs


def make_source(root: str, shard_files: dict[str, int]) -> str:
    """A source dataset with one unit per entry, written through the real mechanism."""
    stage_dir = shards.join(root, "source")
    config = StageConfig()
    records = []
    for name, n in shard_files.items():
        unit = WorkUnit(name=name, key=unit_key(SOURCE, config, f"{name}:{n}"), source={})
        records.append(
            run_unit(stage_dir, unit, lambda _, name=name, n=n: documents_result(_docs(name, n)))
        )
    finalize_stage(stage_dir, SOURCE, config, records, None)
    return stage_dir


def run_normalize(root: str, config: NormalizeConfig) -> tuple[list, dict]:
    input_dir = shards.join(root, "source")
    stage_dir = shards.join(root, "normalize")
    units, digest = plan_shard_units(NORMALIZE, config, input_dir)
    records = [
        run_unit(stage_dir, u, lambda _, u=u: normalize_documents(read_unit_input(u), config))
        for u in units
    ]
    return records, finalize_stage(stage_dir, NORMALIZE, config, records, digest)


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "data")
    return f"memory://llmflow-test-{tmp_path.name}"


def test_source_dataset_accounts_for_every_outcome(root: str) -> None:
    stage_dir = make_source(root, {"a": 3, "b": 2})
    manifest = shards.read_manifest(stage_dir)
    counts = manifest["counts"]
    # 3 + 2 documents, one blank per unit kept (blank is a normalize matter), one binary rejected.
    assert counts == {
        "docs_in": 3 + 2 + 2 * 2,
        "kept": 3 + 2 + 2,
        "rejected": 2,
        "bytes": counts["bytes"],
        "rejected_by_reason": {"binary_content": 2},
        "fetch_failures": 2,
    }
    assert [f["url"] for f in manifest["failures"]] == ["http://x/a-404", "http://x/b-404"]
    assert [s["path"] for s in manifest["shards"]] == ["a.parquet", "b.parquet"]
    assert [s["path"] for s in manifest["rejected_shards"]] == [
        "rejected/a.parquet",
        "rejected/b.parquet",
    ]
    assert [c["name"] for c in manifest["schema"]] == ["id", "text", "url", "source", "fetched_at"]
    rejected = shards.read_shard(stage_dir, shards.manifest_shards(manifest, "rejected_shards")[0])
    assert rejected.column("reason").to_pylist() == ["binary_content"]
    # The hashes in the manifest are the hashes of the files on disk.
    for shard in shards.manifest_shards(manifest):
        import hashlib

        data = shards.read_bytes(shards.join(stage_dir, shard.path))
        assert hashlib.sha256(data).hexdigest() == shard.sha256 and len(data) == shard.bytes


def test_normalize_stage_rejects_blank_documents_with_reason(root: str) -> None:
    make_source(root, {"a": 3, "b": 2})
    records, manifest = run_normalize(root, NormalizeConfig())
    assert manifest["counts"]["kept"] == 5
    assert manifest["counts"]["rejected_by_reason"] == {"empty_after_normalize": 2}
    assert manifest["stats"]["changed_whitespace"] == 7
    texts = sorted(d["text"] for d in shards.iter_documents(shards.join(root, "normalize")))
    assert texts[0] == "Text a 0"  # no-break space and double spaces collapsed, stripped
    assert not any(r.skipped for r in records)


def test_rerun_skips_every_unit_and_rewrites_identical_manifest(root: str) -> None:
    make_source(root, {"a": 3, "b": 2})
    run_normalize(root, NormalizeConfig())
    manifest_path = shards.join(root, "normalize", shards.MANIFEST_NAME)
    before = shards.read_bytes(manifest_path)
    records, _ = run_normalize(root, NormalizeConfig())
    assert all(r.skipped for r in records)
    assert shards.read_bytes(manifest_path) == before


def test_config_change_redoes_work_and_runtime_only_fields_do_not(root: str) -> None:
    make_source(root, {"a": 3})
    run_normalize(root, NormalizeConfig())
    records, manifest = run_normalize(root, NormalizeConfig(min_chars=10))
    assert not any(r.skipped for r in records)
    assert manifest["counts"]["rejected_by_reason"] == {"empty_after_normalize": 4}
    # Concurrency and politeness change how fast pages come, not which: same key.
    assert CrawlConfig(concurrency=1).output_hash() == CrawlConfig(concurrency=9).output_hash()
    assert CrawlConfig(max_pages=3).output_hash() != CrawlConfig().output_hash()


def test_interrupted_run_resumes_at_the_missing_unit(root: str) -> None:
    make_source(root, {"a": 3, "b": 2, "c": 1})
    run_normalize(root, NormalizeConfig())
    # A crash after unit b's shard was written but before its marker: b is redone, a and c not.
    shards.remove(shards.join(root, "normalize", shards.DONE_DIR, "b.json"))
    records, manifest = run_normalize(root, NormalizeConfig())
    assert {r.name: r.skipped for r in records} == {"a": True, "b": False, "c": True}
    assert manifest["counts"]["kept"] == 6


def test_changed_input_shard_redoes_only_that_unit_and_drops_vanished_units(root: str) -> None:
    make_source(root, {"a": 3, "b": 2})
    run_normalize(root, NormalizeConfig())
    # The source now has a new version of b and no a.
    source_dir = shards.join(root, "source")
    shards.remove(shards.join(source_dir, shards.DONE_DIR, "a.json"))
    config = StageConfig()
    unit_b = WorkUnit(name="b", key=unit_key(SOURCE, config, "b:changed"), source={})
    record = run_unit(source_dir, unit_b, lambda _: documents_result(_docs("b", 4)))
    finalize_stage(source_dir, SOURCE, config, [record], None)
    records, manifest = run_normalize(root, NormalizeConfig())
    assert [(r.name, r.skipped) for r in records] == [("b", False)]
    normalize_dir = shards.join(root, "normalize")
    assert shards.list_names(normalize_dir, ".parquet") == ["b.parquet"]
    assert shards.list_names(shards.join(normalize_dir, "rejected"), ".parquet") == ["b.parquet"]
    assert manifest["counts"]["kept"] == 4


def test_marker_whose_shard_vanished_is_not_trusted(tmp_path) -> None:
    root = str(tmp_path)
    make_source(root, {"a": 2})
    run_normalize(root, NormalizeConfig())
    shards.remove(shards.join(root, "normalize", "a.parquet"))
    records, _ = run_normalize(root, NormalizeConfig())
    assert not records[0].skipped
    assert pq.read_table(tmp_path / "normalize" / "a.parquet").num_rows == 2


def test_atomic_writes_leave_no_temporary_files(tmp_path) -> None:
    make_source(str(tmp_path), {"a": 2})
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]
    assert leftovers == []


def test_missing_dataset_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        shards.read_manifest(str(tmp_path / "nothing"))


def test_stage_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValueError, match="min_char"):
        NormalizeConfig(min_char=3)


def test_flipped_bit_in_a_finished_shard_fails_the_reader_naming_the_file(tmp_path) -> None:
    root = str(tmp_path)
    make_source(root, {"a": 3, "b": 2})
    victim = tmp_path / "source" / "a.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the hash can tell
    victim.write_bytes(bytes(data))
    with pytest.raises(shards.CorruptShardError, match=r"source/a\.parquet is corrupt") as error:
        run_normalize(root, NormalizeConfig())
    assert "Delete the file and run the stage that wrote it again" in str(error.value)
    # Doing what the message says repairs it: the writer redoes the shard, the reader goes on.
    victim.unlink()
    make_source(root, {"a": 3, "b": 2})
    _, manifest = run_normalize(root, NormalizeConfig())
    assert manifest["counts"]["kept"] == 3 + 2  # the blank ones are removed by normalize


def test_undecodable_parquet_is_named(tmp_path) -> None:
    path = tmp_path / "garbage.parquet"
    path.write_bytes(b"PAR1" + bytes(range(256)) * 4 + b"PAR1")
    with pytest.raises(shards.CorruptShardError, match="garbage.parquet is not a readable"):
        shards.read_parquet(str(path))


def test_a_lone_surrogate_is_replaced_and_counted_and_the_unit_lands(tmp_path) -> None:
    """JSON's "\\ud800" decodes to a str that Parquet cannot store: one such record used to
    crash the unit and lose every good record beside it."""
    stage_dir = str(tmp_path / "source")
    docs = [
        Document(url="http://x/good", text="good text", source="t", fetched_at=WHEN),
        Document(url="http://x/bad\udcff", text="half a pair \ud800 here", source="t"),
    ]
    unit = WorkUnit(name="u", key="k", source={})
    record = run_unit(stage_dir, unit, lambda _: documents_result(docs))
    assert record.stats == {"lone_surrogates_replaced": 1}
    rows = pq.read_table(tmp_path / "source" / "u.parquet").to_pylist()
    assert [r["text"] for r in rows] == ["good text", "half a pair \ufffd here"]
    assert rows[1]["url"] == "http://x/bad\ufffd"


def test_history_counters_stay_out_of_the_hashed_manifest(tmp_path) -> None:
    """A counter of reused work (signals reused after a crash) depends on what happened before,
    not on the data: it must not change the manifest bytes that key every later stage."""
    config = StageConfig()
    stage_dir = str(tmp_path / "s")

    def finish(stats: dict[str, int]) -> tuple[bytes, dict]:
        unit = WorkUnit(name="u", key="k", source={})
        record = run_unit(stage_dir, unit, lambda _: documents_result(_docs("u", 1)))
        record.stats = {"real": 1} | stats
        manifest = finalize_stage(stage_dir, SOURCE, config, [record], None)
        return shards.read_bytes(shards.join(stage_dir, shards.MANIFEST_NAME)), manifest

    fresh, fresh_manifest = finish({"signals_computed": 5})
    resumed, resumed_manifest = finish({"signals_reused": 5})
    assert fresh == resumed
    assert fresh_manifest["stats"] == {"real": 1}
    assert fresh_manifest["work"] == {"signals_computed": 5}
    assert resumed_manifest["work"] == {"signals_reused": 5}
