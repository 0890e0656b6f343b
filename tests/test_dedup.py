"""dedup: exact and MinHash near-duplicates across shard_files, deterministic, incremental."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from datasketch import MinHash
from document_datasets import WHEN, write_documents

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import DOCUMENT_SCHEMA, Document
from llmflow.tasks.curate.dedup import DedupConfig, deduplicate
from llmflow.tasks.curate.dedup_index import DedupIndexError
from llmflow.tasks.curate.dedup_minhash import shingle_hashes, signature_table, simplify

WORDS = re.findall(
    r"\w+",
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches"
    " under pale moonlight near old harbours where sailors mend nets and sing about distant"
    " islands full of spice markets crowded bazaars and forgotten temples",
)


def make_dataset(root: Path, shard_files: dict[str, list[tuple[str, str]]]) -> str:
    """A documents dataset with one shard per entry of (url, text) pairs."""
    stage_dir = str(root / "source")
    docs = {n: [Document(u, t, "test", WHEN) for u, t in pairs] for n, pairs in shard_files.items()}
    write_documents(stage_dir, docs)
    return stage_dir


def prose(seed: int, n: int = 80) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def edit(text: str, rate: float, seed: int) -> str:
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), max(1, int(len(words) * rate))):
        words[i] = rng.choice(["zebra", "quantum", "velvet", "ochre"])
    return " ".join(words)


def outcome(stage_dir: str) -> tuple[dict[str, dict], dict[str, dict]]:
    kept = {d["id"]: d for d in shards.iter_documents(stage_dir)}
    manifest = shards.read_manifest(stage_dir)
    rejected = {}
    for shard in shards.manifest_shards(manifest, "rejected_shards"):
        for row in shards.read_shard(stage_dir, shard).to_pylist():
            rejected[row["id"]] = row
    return kept, rejected


def test_simplify_is_finewebs_normalization() -> None:
    assert simplify("Hello,   WORLD!\nIt's 3.14 and 2024…") == "hello world it s 0 and 0"
    assert simplify("Café déjà vu") == "cafe deja vu"
    assert simplify("snake_case--dash") == "snake case dash"


def test_signatures_match_datasketch_minhash(tmp_path: Path) -> None:
    a, b = prose(1, 200), edit(prose(1, 200), 0.1, 2)
    table = DOCUMENT_SCHEMA.empty_table().from_pylist(
        [{"id": "a", "text": a}, {"id": "b", "text": b}], schema=DOCUMENT_SCHEMA
    )
    sig = signature_table(table, DedupConfig()).column("minhash").to_pylist()
    # The same shingles through datasketch's own objects give the same values and estimate.
    m = []
    for text in (a, b):
        mh = MinHash(num_perm=112, seed=1, hashfunc=int, scheme="affine32")
        mh.update_batch(shingle_hashes(text, 5))
        m.append(mh)
    assert list(m[0].hashvalues) == sig[0]
    ours = float(np.mean(np.array(sig[0]) == np.array(sig[1])))
    assert ours == pytest.approx(m[0].jaccard(m[1]))
    truth_a, truth_b = set(shingle_hashes(a, 5)), set(shingle_hashes(b, 5))
    assert ours == pytest.approx(len(truth_a & truth_b) / len(truth_a | truth_b), abs=0.15)


def test_exact_and_near_duplicates_are_removed_with_what_they_duplicate(tmp_path: Path) -> None:
    base = [prose(i) for i in range(6)]
    shard_files = {
        "a": [(f"u{i}", t) for i, t in enumerate(base)],
        "b": [
            ("copy0", base[0].upper().replace(" ", "   ")),  # exact up to case and spacing
            ("near1", edit(base[1], 0.03, 7)),
            ("far2", edit(base[2], 0.6, 8)),  # mostly rewritten: not a duplicate
        ],
    }
    source = make_dataset(tmp_path, shard_files)
    manifest = deduplicate(source, str(tmp_path / "dedup"), DedupConfig(incremental=False))
    kept, rejected = outcome(str(tmp_path / "dedup"))
    assert manifest["counts"]["docs_in"] == 9
    assert len(kept) + len(rejected) == 9
    by_url = {d["url"]: d for d in [*kept.values(), *rejected.values()]}
    pairs = {("u0", "copy0"): "exact_duplicate", ("u1", "near1"): "near_duplicate"}
    for (first, second), reason in pairs.items():
        removed = [d for d in (by_url[first], by_url[second]) if d["id"] in rejected]
        assert len(removed) == 1, f"exactly one of {first}/{second} is removed"
        row = removed[0]
        other = by_url[second if row["url"] == first else first]
        assert row["reason"] == reason
        assert row["duplicate_of"] == other["id"] and other["id"] in kept
        assert row["duplicate_similarity"] >= (0.99 if reason == "exact_duplicate" else 0.7)
        assert kept[other["id"]]["duplicates_removed"] == 1
    assert by_url["far2"]["id"] in kept and by_url["u2"]["id"] in kept
    assert manifest["counts"]["rejected_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 1}


def test_kept_ids_do_not_depend_on_shard_order_or_split(tmp_path: Path) -> None:
    docs = []
    for i in range(30):
        docs.append((f"orig{i}", prose(100 + i)))
        docs.append((f"dup{i}", edit(docs[-1][1], 0.02, i)))
    shuffled = docs[:]
    random.Random(3).shuffle(shuffled)
    one = make_dataset(tmp_path / "one", {"all": docs})
    many = make_dataset(
        tmp_path / "many", {f"z{k}": shuffled[k::4] for k in range(4)}
    )  # other names, other order, other split
    results = []
    for name, source in (("one", one), ("many", many)):
        deduplicate(source, str(tmp_path / name / "dedup"), DedupConfig(incremental=False))
        kept, rejected = outcome(str(tmp_path / name / "dedup"))
        results.append((set(kept), {k: v["duplicate_of"] for k, v in rejected.items()}))
    assert results[0] == results[1]
    assert len(results[0][0]) == 30


def test_pride_and_prejudice_editions_are_near_duplicates_and_other_books_are_not(
    shared_data: Path, tmp_path: Path
) -> None:
    def paragraphs(path: Path, limit: int) -> list[tuple[str, str]]:
        text = path.read_text(encoding="utf-8", errors="replace")
        # The book between Project Gutenberg's markers: the licence around it is the same
        # boilerplate in every book, a true duplicate across books.
        text = re.split(r"\*\*\* ?START OF.*", text)[1]
        text = re.split(r"\*\*\* ?END OF.*", text)[0]
        paras = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 40]
        return [(f"{path.name}#{i}", p) for i, p in enumerate(paras[:limit])]

    book = shared_data / "text" / "gutenberg"
    shard_files = {
        "pandp": paragraphs(book / "1342" / "1342-0.txt", 400),
        "old": paragraphs(book / "1342" / "old_pandp12.txt", 400),
        "devil": paragraphs(book / "972" / "972.txt", 300),
    }
    source = make_dataset(tmp_path, shard_files)
    deduplicate(source, str(tmp_path / "dedup"), DedupConfig(incremental=False))
    kept, rejected = outcome(str(tmp_path / "dedup"))
    all_docs = {**kept, **rejected}
    book_of = {i: d["url"].split("#")[0] for i, d in all_docs.items()}
    cross_edition = [
        r
        for r in rejected.values()
        if {book_of[r["id"]], book_of[r["duplicate_of"]]} == {"1342-0.txt", "old_pandp12.txt"}
    ]
    assert len(cross_edition) > 100  # the editions share most paragraphs
    assert all(
        "972.txt" not in {book_of[r["id"]], book_of[r["duplicate_of"]]}
        or book_of[r["id"]] == book_of[r["duplicate_of"]]
        for r in rejected.values()
    ), "a Devil's Dictionary paragraph was matched with Pride and Prejudice"


def test_index_deduplicates_a_later_crawl_against_what_was_kept(tmp_path: Path) -> None:
    first = [(f"a{i}", prose(200 + i)) for i in range(10)]
    later = [
        ("b-near", edit(first[0][1], 0.03, 1)),  # near-duplicate of an earlier document
        ("b-new", prose(999)),
        first[1],  # the very same document (same url and text, same id) seen again
    ]
    stage_dir = str(tmp_path / "dedup")
    source_a = make_dataset(tmp_path / "a", {"s": first})
    deduplicate(source_a, stage_dir, DedupConfig())
    kept_a, _ = outcome(stage_dir)
    assert len(kept_a) == 10

    source_b = make_dataset(tmp_path / "b", {"s": later})
    manifest = deduplicate(source_b, stage_dir, DedupConfig())
    kept_b, rejected_b = outcome(stage_dir)
    near = next(r for r in rejected_b.values() if r["url"] == "b-near")
    assert near["duplicate_of"] in kept_a and near["reason"] == "near_duplicate"
    assert {d["url"] for d in kept_b.values()} == {"b-new", first[1][0]}
    assert manifest["stats"]["resolve_index_documents"] == 10

    # Re-running either input is idempotent: a run is never deduplicated against itself.
    deduplicate(source_a, stage_dir, DedupConfig())
    assert set(outcome(stage_dir)[0]) == set(kept_a)
    second = deduplicate(source_b, stage_dir, DedupConfig())
    assert set(outcome(stage_dir)[0]) == set(kept_b)
    assert second["counts"] == manifest["counts"]

    with pytest.raises(DedupIndexError, match="ngram_size"):
        deduplicate(source_b, stage_dir, DedupConfig(ngram_size=3))
    deduplicate(source_b, str(tmp_path / "fresh"), DedupConfig(ngram_size=3, incremental=False))


def test_signatures_are_reused_when_only_the_resolution_changes(tmp_path: Path) -> None:
    source = make_dataset(tmp_path, {"s": [(f"u{i}", prose(300 + i)) for i in range(5)]})
    stage_dir = str(tmp_path / "dedup")
    deduplicate(source, stage_dir, DedupConfig(incremental=False))
    again = deduplicate(source, stage_dir, DedupConfig(incremental=False, min_similarity=0.8))
    assert again["work"]["resolve_signature_shards_reused"] == 1


def test_bad_documents_are_handled(tmp_path: Path) -> None:
    huge = "x" * 5_000_000  # one repeated character: a single shingle
    big_prose = " ".join(prose(i, 2000) for i in range(20))  # ~40k words
    docs = [("huge", huge), ("huge2", huge + " "), ("big", big_prose), ("tiny", "ok"), ("sym", "…")]
    source = make_dataset(tmp_path, {"s": docs})
    manifest = deduplicate(source, str(tmp_path / "dedup"), DedupConfig(incremental=False))
    assert manifest["counts"]["docs_in"] == 5
    kept, rejected = outcome(str(tmp_path / "dedup"))
    assert [r["url"] for r in rejected.values()] in (["huge"], ["huge2"])


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="exact and near are both off"):
        DedupConfig(exact=False, near=False)
    with pytest.raises(ValueError, match="bands"):
        DedupConfig(bands=0)


def test_files_of_units_that_are_gone_are_removed(tmp_path: Path) -> None:
    stage_dir = tmp_path / "dedup"
    two = make_dataset(tmp_path / "two", {"x": [("u1", prose(1))], "y": [("u2", prose(2))]})
    deduplicate(two, str(stage_dir), DedupConfig(incremental=False))
    one = make_dataset(tmp_path / "one", {"x": [("u1", prose(1))]})
    deduplicate(one, str(stage_dir), DedupConfig(incremental=False))
    for sub in ("_signatures", "_decisions"):
        assert sorted(p.name for p in (stage_dir / sub).glob("*.parquet")) == ["x.parquet"]


def test_an_interrupted_apply_reuses_the_finished_resolve(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The resolve is a step like the one-step stages: its manifest, written last, keys it on
    the run's context and declares its decision files. A run killed after the resolve (here: an
    apply unit's marker removed) does not resolve again; a damaged decision file does."""
    from llmflow.tasks.curate import dedup_resolve

    pairs = [(f"u{i}", prose(500 + i % 3)) for i in range(6)]  # three exact pairs
    source = make_dataset(tmp_path, {"a": pairs[:3], "b": pairs[3:]})
    stage_dir = tmp_path / "dedup"
    config = DedupConfig(incremental=False)
    first = deduplicate(source, str(stage_dir), config)
    (stage_dir / shards.DONE_DIR / "b.json").unlink()

    def must_not_cluster(*args: object) -> None:
        raise AssertionError("resolve ran again")

    monkeypatch.setattr(dedup_resolve, "_concat_np", must_not_cluster)
    again = deduplicate(source, str(stage_dir), config)
    assert {k: v for k, v in again.items() if k != "work"} == {
        k: v for k, v in first.items() if k != "work"
    }

    decisions = stage_dir / "_decisions" / "b.parquet"
    decisions.write_bytes(decisions.read_bytes()[:-8])  # cut short: the step is not done
    (stage_dir / shards.DONE_DIR / "b.json").unlink()
    with pytest.raises(AssertionError, match="resolve ran again"):
        deduplicate(source, str(stage_dir), config)
    monkeypatch.undo()
    assert deduplicate(source, str(stage_dir), config)["counts"] == first["counts"]
