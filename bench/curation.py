"""Our quality and dedup stages against datatrove's, on the same corpus in the same run.

Usage::

    python bench/curation.py [--docs 55000] [--seed 0] [--workdir DIR]
                             [--datatrove-python PATH] [--only quality|dedup] [--md PATH]

1. Builds the corpus (bench/curation_corpus.py: real text from the shared data plus generated
   exact and near copies with known ground truth) into ``WORKDIR/corpus``.
2. Runs each tool in its own subprocess pinned to one CPU, one worker, and measures wall seconds,
   CPU seconds (user + system, the subprocess and everything it waited for, from ``os.wait4``)
   and peak RSS. docs/s per core = documents / CPU seconds.

   * quality: datatrove's GopherRepetition -> GopherQuality -> C4Quality(filter_no_terminal_punct
     =False) -> FineWebQuality (bench/datatrove_curation.py), against ``quality_documents`` from
     ``llmflow.tasks.curate.quality`` shard by shard in one process. Language filtering is off on
     both
     sides: datatrove's LanguageFilter downloads its fastText model from the hub, unreachable here.
   * dedup: datatrove's four MinHash stages with FineWeb's MinhashConfig(14 buckets x 8 hashes,
     5-grams), against ``deduplicate`` from ``llmflow.tasks.curate.dedup`` (exact + MinHash,
     defaults).

3. Compares decisions: quality keep/remove agreement per document, with the disagreements broken
   down by the rule that fired on either side; dedup precision and recall against the generated
   ground truth and the overlap of the removed ids.
4. Prints the results and writes them to ``bench/curation.md`` (``--md``).

datatrove is not a project dependency: unless ``--datatrove-python`` names an interpreter, its
environment is created on first use in ``bench/.venv-datatrove`` (python -m venv, then pip).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from curation_corpus import jaccard, write_corpus  # noqa: E402

DT_VENV = BENCH / ".venv-datatrove"
# datatrove[processing] lacks what its Parquet reader (pyarrow), JSONL writer (orjson) and English
# word tokenizer (spacy) need in 0.10.1; they are installed beside it.
DT_REQUIREMENTS = ("datatrove[processing]==0.10.1", "spacy", "pyarrow", "orjson")
JACCARD_JUSTIFIED = 0.7
QUALITY_GOAL_SPEEDUP, QUALITY_GOAL_AGREEMENT, DEDUP_GOAL_SPEEDUP = 3.0, 0.99, 8.0
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "RAYON_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
}


@dataclass
class Run:
    """One tool's run of one stage, as measured from outside its process."""

    tool: str
    stage: str
    docs: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    work_cpu_s: float = float("nan")  # CPU seconds of the work alone: no start-up, no imports

    @property
    def docs_per_core_s(self) -> float:
        return self.docs / self.cpu_s if self.cpu_s else float("nan")


# ---------------------------------------------------------------------------------------------
# Our side, in a subprocess of its own (``curation.py _worker STAGE CORPUS OUT``)


# As near to "no language filter" as QualityConfig allows: every language, the lowest score
# threshold it accepts. Its language ID (py3langid) still runs on every document.
QUALITY_CONFIG = {"languages": [], "min_lang_score": 0.5}


def _quality_config() -> Any:
    from llmflow.tasks.curate.quality import QualityConfig

    return QualityConfig(**QUALITY_CONFIG)


def stub_language_id() -> None:
    """The ``llmflow (no LID)`` run: language ID answers ("en", 1.0) without looking.

    datatrove's side runs no language ID (its LanguageFilter needs the hub), and QualityConfig
    cannot switch ours off; this run times our quality rules alone, the same rules datatrove
    runs. Not a product configuration.
    """
    from llmflow.tasks.curate import quality_signals

    quality_signals.identify_languages = lambda texts: [("en", 1.0)] * len(texts)


def worker_quality(corpus: str, out: Path) -> int:
    from llmflow.tasks.core import shards
    from llmflow.tasks.curate.quality import quality_documents

    config = _quality_config()
    n = 0
    with open(out, "w") as f:
        for shard in shards.manifest_shards(shards.read_manifest(corpus)):
            result = quality_documents(shards.read_shard(corpus, shard), config)
            n += result.docs_in
            for doc_id in result.kept.column("id").to_pylist():
                f.write(json.dumps({"id": doc_id, "kept": True, "reason": None}) + "\n")
            rejected = result.rejected.select(["id", "reason"]).to_pylist()
            for row in rejected:
                f.write(
                    json.dumps({"id": row["id"], "kept": False, "reason": row["reason"]}) + "\n"
                )
    return n


def worker_dedup(corpus: str, out: Path) -> int:
    import pyarrow.parquet as pq

    from llmflow.tasks.core import shards
    from llmflow.tasks.curate.dedup import DedupConfig, deduplicate

    stage = out.parent / "ours-dedup"
    manifest = deduplicate(corpus, str(stage), DedupConfig(), index_dir=str(stage / "_index_bench"))
    with open(out, "w") as f:
        for shard in shards.manifest_shards(manifest):
            for doc_id in pq.read_table(stage / shard.path, columns=["id"]).column(0).to_pylist():
                f.write(json.dumps({"id": doc_id, "kept": True}) + "\n")
        columns = ["id", "reason", "duplicate_of", "duplicate_similarity"]
        for shard in shards.manifest_shards(manifest, "rejected_shards"):
            for row in pq.read_table(stage / shard.path, columns=columns).to_pylist():
                f.write(json.dumps({"kept": False} | row) + "\n")
    return manifest["counts"]["docs_in"]


# ---------------------------------------------------------------------------------------------
# Running and measuring


def pinned_cpu() -> int:
    return max(os.sched_getaffinity(0))


def measure(tool: str, stage: str, cmd: list[str], log: Path, docs: int) -> Run:
    """Run ``cmd`` on one CPU and read its own resource usage (not the sum of all children)."""
    env = os.environ | SINGLE_THREAD_ENV
    cpu = pinned_cpu()
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=BENCH.parent,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{tool} {stage} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return Run(
        tool=tool,
        stage=stage,
        docs=docs,
        wall_s=round(wall, 2),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 2),
        peak_rss_mb=round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
    )


def datatrove_python(given: str | None) -> str:
    """The interpreter with datatrove: the one given, or bench/.venv-datatrove (made if absent)."""
    if given:
        return given
    python = DT_VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {DT_VENV} ({', '.join(DT_REQUIREMENTS)}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(DT_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *DT_REQUIREMENTS], check=True
        )
    return str(python)


def tool_versions(dt_python: str) -> dict[str, str]:
    code = (
        "from importlib.metadata import version as v; import json;"
        "print(json.dumps({p: v(p) for p in ('datatrove', 'spacy', 'numpy', 'xxhash')}))"
    )
    dt = json.loads(
        subprocess.run([dt_python, "-c", code], capture_output=True, text=True, check=True).stdout
    )
    from importlib.metadata import version

    ours = {p: version(p) for p in ("datasketch", "numpy", "pyarrow")}
    return {f"datatrove env: {k}": val for k, val in dt.items()} | {
        f"our env: {k}": val for k, val in ours.items()
    }


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_corpus(corpus: Path) -> dict[str, dict[str, str]]:
    import pyarrow.parquet as pq

    docs: dict[str, dict[str, str]] = {}
    for path in sorted(corpus.glob("part-*.parquet")):
        for row in pq.read_table(path, columns=["id", "text", "source"]).to_pylist():
            docs[row["id"]] = row
    return docs


# ---------------------------------------------------------------------------------------------
# Comparing decisions


def compare_quality(
    ours: list[dict[str, Any]], theirs: list[dict[str, Any]], docs: dict[str, dict[str, str]]
) -> dict[str, Any]:
    mine = {r["id"]: r for r in ours}
    dt = {r["id"]: r for r in theirs}
    if set(mine) != set(docs) or set(dt) != set(docs):
        raise RuntimeError(
            f"decisions do not cover the corpus: ours {len(mine)}, datatrove {len(dt)},"
            f" corpus {len(docs)}"
        )

    def label(r: dict[str, Any], their: bool) -> str:
        if r["kept"]:
            return "kept"
        return f"{r['step']}:{r['reason']}" if their else str(r["reason"])

    agree = sum(mine[i]["kept"] == dt[i]["kept"] for i in docs)
    disagreements = sorted(i for i in docs if mine[i]["kept"] != dt[i]["kept"])
    pairs = Counter((label(mine[i], False), label(dt[i], True)) for i in disagreements)
    examples = []
    for i in random.Random(0).sample(disagreements, min(5, len(disagreements))):
        text = docs[i]["text"]
        examples.append(
            {
                "id": i,
                "source": docs[i]["source"],
                "words": len(text.split()),
                "ours": label(mine[i], False),
                "datatrove": label(dt[i], True),
                "text": text[:400],
            }
        )
    return {
        "docs": len(docs),
        "agree": agree,
        "agreement": agree / len(docs),
        "kept_ours": sum(r["kept"] for r in mine.values()),
        "kept_datatrove": sum(r["kept"] for r in dt.values()),
        "ours_kept_datatrove_removed": sum(mine[i]["kept"] for i in disagreements),
        "ours_removed_datatrove_kept": sum(dt[i]["kept"] for i in disagreements),
        "disagreements": [
            {"ours": a, "datatrove": b, "docs": n} for (a, b), n in pairs.most_common()
        ],
        "both_removed": [
            {"ours": a, "datatrove": b, "docs": n}
            for (a, b), n in Counter(
                (label(mine[i], False), label(dt[i], True))
                for i in docs
                if not mine[i]["kept"] and not dt[i]["kept"]
            ).most_common()
        ],
        "reasons_ours": dict(Counter(label(r, False) for r in mine.values()).most_common()),
        "reasons_datatrove": dict(Counter(label(r, True) for r in dt.values()).most_common()),
        "examples": examples,
    }


def _dedup_partner(rows: list[dict[str, Any]], tool: str) -> dict[str, str | None]:
    """removed id -> the id it was said to duplicate (datatrove: the kept member of its cluster)."""
    if tool == "ours":
        return {r["id"]: r.get("duplicate_of") for r in rows if not r["kept"]}
    kept_of = {r["cluster"]: r["id"] for r in rows if r["kept"] and r["cluster"] != -1}
    return {r["id"]: kept_of.get(r["cluster"]) for r in rows if not r["kept"]}


JACCARD_BANDS = ((0.9, 1.01), (0.8, 0.9), (0.7, 0.8), (0.6, 0.7), (0.5, 0.6), (0.0, 0.5))


def dedup_quality(
    rows: list[dict[str, Any]],
    tool: str,
    truth: list[dict[str, Any]],
    docs: dict[str, dict[str, str]],
) -> dict[str, Any]:
    """Recall over the generated pairs and precision of the removals, for one tool."""
    removed = {r["id"] for r in rows if not r["kept"]}
    if len({r["id"] for r in rows}) != len(docs):
        raise RuntimeError(f"{tool} dedup decisions cover {len(rows)} of {len(docs)} documents")
    group = {}
    for t in truth:
        group[t["variant_id"]] = t["source_id"]
        group[t["source_id"]] = t["source_id"]

    # A pair is found when the tool acted on it: the copy was removed, or its source was removed
    # instead. (Both removed happens when a source has several copies and the cluster kept
    # another member; it still leaves one document of the group.)
    def found(t: dict[str, Any]) -> bool:
        return t["variant_id"] in removed or t["source_id"] in removed

    by_kind: dict[str, list[bool]] = {}
    by_band: dict[str, list[bool]] = {}
    for t in truth:
        hit = found(t)
        by_kind.setdefault(t["kind"], []).append(hit)
        if t["kind"] == "near":
            lo, hi = next(b for b in JACCARD_BANDS if b[0] <= t["jaccard"] < b[1])
            by_band.setdefault(f"{lo:.1f}-{min(hi, 1.0):.1f}", []).append(hit)
    both_removed = sum(t["variant_id"] in removed and t["source_id"] in removed for t in truth)

    partner = _dedup_partner(rows, tool)
    justified = in_truth = natural_ok = 0
    unjustified: list[dict[str, Any]] = []
    for doc_id in sorted(removed):
        other = partner.get(doc_id)
        same_group = other is not None and doc_id in group and group.get(other) == group[doc_id]
        sim = jaccard(docs[doc_id]["text"], docs[other]["text"]) if other in docs else 0.0
        if same_group or sim >= JACCARD_JUSTIFIED:
            justified += 1
            in_truth += same_group
            natural_ok += not same_group
        else:
            unjustified.append({"id": doc_id, "duplicate_of": other, "jaccard": round(sim, 3)})
    all_hits = [found(t) for t in truth]
    return {
        "removed": len(removed),
        "removed_short": sum(len(docs[i]["text"].split()) < 5 for i in removed),
        "recall": sum(all_hits) / len(all_hits) if all_hits else float("nan"),
        "recall_by_kind": {k: (sum(v), len(v)) for k, v in sorted(by_kind.items())},
        "recall_near_by_jaccard": {
            k: (sum(v), len(v)) for k, v in sorted(by_band.items(), reverse=True)
        },
        "pairs_both_removed": both_removed,
        "precision": justified / len(removed) if removed else float("nan"),
        "justified_by_truth": in_truth,
        "justified_by_jaccard": natural_ok,
        "unjustified_examples": unjustified[:5],
        "unjustified": len(unjustified),
    }


def clustered(rows: list[dict[str, Any]], tool: str) -> set[str]:
    """Documents in some duplicate cluster: removed ones and the ones kept in their place.

    Which member of a cluster survives is arbitrary (datatrove: its union-find root; ours: the
    lowest hash of the id), so removed ids can differ where both tools found the same cluster.
    """
    partner = _dedup_partner(rows, tool)
    return set(partner) | {p for p in partner.values() if p}


def overlap(a: set[str], b: set[str]) -> dict[str, Any]:
    union = a | b
    return {
        "ours_and_datatrove": len(a & b),
        "ours_only": len(a - b),
        "datatrove_only": len(b - a),
        "jaccard": len(a & b) / len(union) if union else 1.0,
    }


# ---------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, str]:
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "ram": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _overlap(o: dict[str, Any]) -> str:
    return (
        f"both {o['ours_and_datatrove']}, ours only {o['ours_only']}, datatrove only"
        f" {o['datatrove_only']}, Jaccard {o['jaccard']:.3f}"
    )


def _ratio(hits: tuple[int, int]) -> str:
    n, total = hits
    return f"{n}/{total} ({100 * n / total:.1f}%)" if total else "-"


def render(results: dict[str, Any]) -> str:
    lines = ["# Curation benchmark: llmflow vs datatrove (quality rules, MinHash dedup)", ""]
    lines += [
        "Command (from the repository root, project venv active):",
        "",
        "```",
        results["command"],
        "```",
        "",
        "Produced by `bench/curation.py`; every figure below is from that one run. Each tool ran",
        "in its own subprocess pinned to one CPU with one worker; CPU seconds are user + system",
        "of that subprocess and everything it waited for (`os.wait4`), peak RSS likewise.",
        "docs/s per core = documents / CPU seconds of the whole subprocess (interpreter start-up"
        " and imports included: a fixed cost of a few seconds, which the next column leaves out)."
        " Wall seconds also count time spent waiting for the CPU while other work ran on the"
        " machine; CPU seconds are the figures compared.",
        "",
        "## Machine and versions",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in results["machine"].items()]
    lines += [f"- {k}: {v}" for k, v in results["versions"].items()]
    corpus = results["corpus"]
    lines += [
        "",
        "## Corpus",
        "",
        f"{corpus['docs']} documents in 8 Parquet shards, built by `bench/curation_corpus.py`"
        f" (seed {corpus['seed']}) from the shared data: paragraphs of Project Gutenberg texts"
        " (Pride and Prejudice in five editions, The Devil's Dictionary in two: natural exact and"
        " near duplicates), NLTK corpora as paragraphs or runs of 1-12 lines, web pages from the"
        " WARC/WET/JSONL samples, plus generated copies of documents with >= 50 words: exact"
        " copies, and near copies with 2-10% of words substituted, deleted or inserted, sometimes"
        " with changed punctuation or case and an added first or last line.",
        "",
        "| source | documents |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in corpus["sources"].items()]
    lines += [
        "",
        "## Speed",
        "",
        "| tool | stage | documents | wall s | CPU s | docs/s per core | CPU s of the work alone"
        " (docs/s) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        r = Run(**run)
        lines.append(
            f"| {r.tool} | {r.stage} | {r.docs} | {r.wall_s} | {r.cpu_s} |"
            f" {r.docs_per_core_s:.0f} | {r.work_cpu_s} ({r.docs / r.work_cpu_s:.0f}) |"
            f" {r.peak_rss_mb} |"
        )
    lines.append("")
    for stage, s in results.get("speedup", {}).items():
        work = results["speedup_work"][stage]
        lines.append(
            f"- {stage}: ours is **{s:.1f}x** datatrove's docs/s per core"
            f" ({work:.1f}x counting the work alone, without start-up and imports)."
        )
    if "quality" in results:
        q = results["quality"]
        lines += [
            "",
            "## Quality: same decision?",
            "",
            "Rules: datatrove's GopherRepetitionFilter -> GopherQualityFilter -> C4QualityFilter"
            "(filter_no_terminal_punct=False) -> FineWebQualityFilter, defaults (FineWeb's"
            " pipeline) against `llmflow.tasks.curate.quality` (`quality_documents`, shard by"
            " shard, one"
            " process) with its defaults except the language rule. datatrove's LanguageFilter is"
            " left out (its fastText model downloads from the Hugging Face hub, unreachable here);"
            " ours cannot be switched off, so it runs as near to off as QualityConfig allows:"
            f" `QualityConfig(**{QUALITY_CONFIG})` (any language whose py3langid probability is"
            " above 0.5). py3langid still runs on every document: the `llmflow (no LID)` run"
            " replaces it with a constant answer (in the benchmark's worker only) to time our"
            " rules alone, the same rules datatrove runs.",
            "",
            f"- same keep/remove decision: **{q['agree']}/{q['docs']} = {_pct(q['agreement'])}**"
            f" (no-LID run: {_pct(results['quality_no_lid']['agreement'])})",
            f"- kept: ours {q['kept_ours']}, datatrove {q['kept_datatrove']};"
            f" ours kept / datatrove removed: {q['ours_kept_datatrove_removed']};"
            f" ours removed / datatrove kept: {q['ours_removed_datatrove_kept']}",
            "",
            "Disagreements by the rule that fired (datatrove: first filter that removed the"
            " document, `filter:reason`):",
            "",
            "| ours | datatrove | documents |",
            "|---|---|---|",
        ]
        lines += [f"| {d['ours']} | {d['datatrove']} | {d['docs']} |" for d in q["disagreements"]]
        if not q["disagreements"]:
            lines.append("| (none) | | 0 |")
        lines += [
            "",
            "Documents both removed, by the rule that fired first on each side (the same rule"
            " means the same rule order):",
            "",
            "| ours | datatrove | documents |",
            "|---|---|---|",
        ]
        lines += [f"| {d['ours']} | {d['datatrove']} | {d['docs']} |" for d in q["both_removed"]]
        if q["examples"]:
            lines += ["", "Example disagreements (first 400 characters):", ""]
        for e in q["examples"]:
            lines += [
                f"- `{e['id']}` ({e['source']}, {e['words']} words): ours **{e['ours']}**,"
                f" datatrove **{e['datatrove']}**",
                "",
                "  ```text",
                *("  " + line for line in e["text"].replace("```", "'''").splitlines()),
                "  ```",
                "",
            ]
    if "dedup" in results:
        d = results["dedup"]
        o, t = d["ours"], d["datatrove"]
        lines += [
            "",
            "## Dedup: found and justified",
            "",
            "datatrove: MinhashDedupSignature -> Buckets -> Cluster -> Filter with"
            " MinhashConfig(num_buckets=14, hashes_per_bucket=8, n_grams=5). Ours:"
            " `deduplicate(...)` with `DedupConfig()` defaults (exact + MinHash 14 x 8, 5-grams).",
            "",
            "Recall: a generated (copy, source) pair is found when the copy or its source was"
            " removed. Precision: a removed document is justified when it and the document it was"
            " said to duplicate (ours: `duplicate_of`; datatrove: the kept member of its cluster)"
            " are copies of the same generated source, or their true Jaccard similarity of word"
            " 5-gram shingles after FineWeb's text simplification is >= 0.7 (natural duplicates:"
            " the five Pride and Prejudice editions, repeated licence text).",
            "",
            "| | ours | datatrove |",
            "|---|---|---|",
            f"| removed | {o['removed']} | {t['removed']} |",
            f"| removed with fewer than 5 words (datatrove's MinHash makes no shingle for a"
            f" text under 5 tokens; ours makes the whole text one) | {o['removed_short']} |"
            f" {t['removed_short']} |",
            f"| recall, all generated pairs | {_pct(o['recall'])} | {_pct(t['recall'])} |",
        ]
        for kind in o["recall_by_kind"]:
            lines.append(
                f"| recall, {kind} copies | {_ratio(o['recall_by_kind'][kind])} |"
                f" {_ratio(t['recall_by_kind'][kind])} |"
            )
        for band in o["recall_near_by_jaccard"]:
            lines.append(
                f"| recall, near copies with Jaccard {band} |"
                f" {_ratio(o['recall_near_by_jaccard'][band])} |"
                f" {_ratio(t['recall_near_by_jaccard'].get(band, (0, 0)))} |"
            )
        lines += [
            f"| precision | {_pct(o['precision'])} | {_pct(t['precision'])} |",
            f"| justified by ground truth / by Jaccard >= 0.7 | {o['justified_by_truth']} /"
            f" {o['justified_by_jaccard']} | {t['justified_by_truth']} /"
            f" {t['justified_by_jaccard']} |",
            f"| unjustified removals | {o['unjustified']} | {t['unjustified']} |",
            "",
            "Overlap of the removed ids (which member of a cluster is kept is arbitrary, so"
            " this is low even where both found the same clusters): " + _overlap(d["overlap"]),
            "",
            "Overlap of the documents placed in a duplicate cluster (removed, or kept in place of"
            " others): " + _overlap(d["cluster_overlap"]),
        ]
    if results.get("goals"):
        lines += ["", "## Goals (issue 4)", ""]
        lines += [f"- {g}" for g in results["goals"]]
    return "\n".join(lines) + "\n"


def goals(results: dict[str, Any]) -> list[str]:
    out = []
    speed = results.get("speedup", {})
    if "quality" in results:
        ok = (
            speed["quality"] >= QUALITY_GOAL_SPEEDUP
            and results["quality"]["agreement"] >= QUALITY_GOAL_AGREEMENT
        )
        out.append(
            f"quality >= {QUALITY_GOAL_SPEEDUP:.0f}x datatrove's docs/s per core with the same"
            f" decision on >= 99% of documents: {speed['quality']:.1f}x,"
            f" {_pct(results['quality']['agreement'])} -> **{'met' if ok else 'NOT met'}**"
            " (ours running py3langid on every document, which datatrove's side does not)"
        )
        key = f"quality, {NO_LID}"
        if key in speed:
            agreement = results["quality_no_lid"]["agreement"]
            ok = speed[key] >= QUALITY_GOAL_SPEEDUP and agreement >= QUALITY_GOAL_AGREEMENT
            out.append(
                f"the same, the same rules only (our language ID stubbed out): {speed[key]:.1f}x,"
                f" {_pct(agreement)} -> **{'met' if ok else 'NOT met'}**"
            )
    if "dedup" in results:
        o, t = results["dedup"]["ours"], results["dedup"]["datatrove"]
        ok = speed["dedup"] >= DEDUP_GOAL_SPEEDUP and o["recall"] >= t["recall"]
        out.append(
            f"MinHash dedup >= {DEDUP_GOAL_SPEEDUP:.0f}x at no lower recall: {speed['dedup']:.1f}x,"
            f" recall {_pct(o['recall'])} vs {_pct(t['recall'])}"
            f" -> **{'met' if ok else 'NOT met'}**"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Main


NO_LID = "llmflow (no LID)"


def run_stage(
    stage: str, corpus: Path, work: Path, dt_python: str, n_docs: int
) -> tuple[list[Run], dict[str, list[dict[str, Any]]]]:
    """datatrove, then ours (for quality also ours with language ID stubbed out), measured."""
    dt_work = work / f"datatrove-{stage}"
    shutil.rmtree(dt_work, ignore_errors=True)
    print(f"[{stage}] datatrove ...", flush=True)
    dt_cmd = [dt_python, str(BENCH / "datatrove_curation.py"), stage]
    dt_cmd += ["--input", str(corpus), "--work", str(dt_work)]
    dt_run = measure("datatrove", stage, dt_cmd, work / f"datatrove-{stage}.log", n_docs)
    dt_run.work_cpu_s = _inner_cpu(dt_work / f"{stage}-summary.json")
    print(f"  {dt_run}", flush=True)
    runs = [dt_run]
    decisions = {"datatrove": read_jsonl(dt_work / f"{stage}.jsonl")}
    variants = [("llmflow", "ours", [])]
    if stage == "quality":
        variants.append((NO_LID, "ours-nolid", ["--no-lid"]))
    for tool, name, flags in variants:
        out = work / f"{name}-{stage}" / f"{stage}.jsonl"
        shutil.rmtree(out.parent, ignore_errors=True)
        out.parent.mkdir(parents=True)
        print(f"[{stage}] {tool} ...", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", stage]
        cmd += [str(corpus), str(out), *flags]
        run = measure(tool, stage, cmd, work / f"{name}-{stage}.log", n_docs)
        run.work_cpu_s = _inner_cpu(out.with_suffix(".summary.json"))
        print(f"  {run}", flush=True)
        runs.append(run)
        decisions[tool] = read_jsonl(out)
    return runs, decisions


def _inner_cpu(path: Path) -> float:
    return json.loads(path.read_text())["inner_cpu_s"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        stage, corpus, out = argv[1:4]
        importlib.import_module(f"llmflow.tasks.curate.{stage}")  # imports are not the stage's work
        if "--no-lid" in argv[4:]:
            stub_language_id()
        worker = worker_quality if stage == "quality" else worker_dedup
        started, cpu = time.perf_counter(), time.process_time()
        n = worker(corpus, Path(out))
        summary = {
            "docs": n,
            "inner_wall_s": round(time.perf_counter() - started, 3),
            "inner_cpu_s": round(time.process_time() - cpu, 3),
        }
        Path(out).with_suffix(".summary.json").write_text(json.dumps(summary))
        print(json.dumps(summary))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=55_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmflow-curation-bench"))
    parser.add_argument("--datatrove-python", help="an interpreter with datatrove 0.10.1")
    parser.add_argument("--only", choices=("quality", "dedup"))
    parser.add_argument("--md", type=Path, default=BENCH / "curation.md")
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    dt_python = datatrove_python(args.datatrove_python)
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    print(f"building the corpus ({args.docs} documents) in {corpus} ...", flush=True)
    write_corpus(str(corpus), args.docs, args.seed)
    docs = load_corpus(corpus)
    truth = read_jsonl(corpus / "truth" / "pairs.jsonl")
    sources = json.loads((corpus / "truth" / "sources.json").read_text())

    command = "python bench/curation.py" + (f" --docs {args.docs}" if args.docs != 55_000 else "")
    command += f" --only {args.only}" if args.only else ""
    results: dict[str, Any] = {
        "command": command,
        "machine": machine(),
        "versions": tool_versions(dt_python),
        "corpus": {"docs": len(docs), "seed": args.seed, "sources": sources},
        "runs": [],
        "speedup": {},
        "speedup_work": {},
    }
    for stage in ("quality", "dedup"):
        if args.only and stage != args.only:
            continue
        runs, decisions = run_stage(stage, corpus, work, dt_python, len(docs))
        results["runs"] += [asdict(r) for r in runs]
        for run in runs[1:]:
            key = stage if run.tool == "llmflow" else f"{stage}, {run.tool}"
            results["speedup"][key] = run.docs_per_core_s / runs[0].docs_per_core_s
            results["speedup_work"][key] = runs[0].work_cpu_s / run.work_cpu_s
        theirs, ours = decisions["datatrove"], decisions["llmflow"]
        if stage == "quality":
            results["quality"] = compare_quality(ours, theirs, docs)
            results["quality_no_lid"] = compare_quality(decisions[NO_LID], theirs, docs)
        else:
            results["dedup"] = {
                "ours": dedup_quality(ours, "ours", truth, docs),
                "datatrove": dedup_quality(theirs, "datatrove", truth, docs),
                "overlap": overlap(
                    {r["id"] for r in ours if not r["kept"]},
                    {r["id"] for r in theirs if not r["kept"]},
                ),
                "cluster_overlap": overlap(clustered(ours, "ours"), clustered(theirs, "datatrove")),
            }
    results["goals"] = goals(results)
    (work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    from language_prefix import with_section  # its figures live in the same results file

    text = with_section(render(results), args.md)
    args.md.write_text(text)
    print(text)
    print(f"written: {args.md} and {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
