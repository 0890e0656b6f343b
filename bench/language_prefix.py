"""Language ID on a prefix against the whole text: same language, same decision, less CPU?

Usage::

    python bench/language_prefix.py [--docs 55000] [--seed 0] [--chars 2000] [--workdir DIR]
                                    [--md bench/curation.md]

Builds the curation benchmark's corpus (``bench/curation_corpus.py``, the same documents as
``bench/curation.py``), then runs our quality stage (``quality_documents`` shard by shard, the
default ``QualityConfig``: English above 0.65) twice, each in its own subprocess pinned to one
CPU: with ``language_id_chars=0`` (the whole text) and with ``--chars``. Compares per document
the language py3langid answered and the keep/reject decision and reason, and measures each run's
CPU seconds (``os.wait4``, and the work alone). The figures go into the section of
``bench/curation.md`` between the markers below (``bench/curation.py`` keeps that section when
it rewrites the file).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from curation import load_corpus, machine, measure, read_jsonl  # noqa: E402
from curation_corpus import write_corpus  # noqa: E402

SECTION_START = "<!-- language_prefix.py: start -->"
SECTION_END = "<!-- language_prefix.py: end -->"


def worker(corpus: str, out: Path, chars: int) -> int:
    """Our quality stage over the corpus, one JSON line per document: decision, reason, lang."""
    from llmflow.tasks.core import shards
    from llmflow.tasks.curate.quality import QualityConfig, quality_documents

    config = QualityConfig(language_id_chars=chars)
    n = 0
    with open(out, "w") as f:
        for shard in shards.manifest_shards(shards.read_manifest(corpus)):
            result = quality_documents(shards.read_shard(corpus, shard), config)
            n += result.docs_in
            for kept, table in ((True, result.kept), (False, result.rejected)):
                reasons = table.column("reason").to_pylist() if not kept else None
                rows = table.select(["id", "lang", "lang_score"]).to_pylist()
                for i, row in enumerate(rows):
                    reason = reasons[i] if reasons else None
                    f.write(json.dumps(row | {"kept": kept, "reason": reason}) + "\n")
    return n


def compare(
    whole: list[dict[str, Any]], prefix: list[dict[str, Any]], docs: dict[str, Any], chars: int
) -> dict[str, Any]:
    """Agreement of the two runs, over every document and over those longer than the prefix."""
    a, b = {r["id"]: r for r in whole}, {r["id"]: r for r in prefix}
    if set(a) != set(docs) or set(b) != set(docs):
        raise RuntimeError(f"decisions cover {len(a)} and {len(b)} of {len(docs)} documents")
    long_ids = [i for i in docs if len(docs[i]["text"]) > chars]
    measured = [i for i in docs if a[i]["lang"] is not None]
    differ = sorted(i for i in docs if a[i]["kept"] != b[i]["kept"])
    return {
        "docs": len(docs),
        "longer_than_prefix": len(long_ids),
        "lang_measured": len(measured),
        "lang_same": sum(a[i]["lang"] == b[i]["lang"] for i in measured),
        "lang_same_long": sum(a[i]["lang"] == b[i]["lang"] for i in long_ids),
        "decision_same": len(docs) - len(differ),
        "decision_same_long": sum(a[i]["kept"] == b[i]["kept"] for i in long_ids),
        "reason_same": sum(a[i]["reason"] == b[i]["reason"] for i in docs),
        "kept_whole": sum(r["kept"] for r in a.values()),
        "kept_prefix": sum(r["kept"] for r in b.values()),
        "decisions_differ": [
            {
                "id": i,
                "source": docs[i]["source"],
                "chars": len(docs[i]["text"]),
                "whole": f"{a[i]['reason'] or 'kept'} ({a[i]['lang']} {a[i]['lang_score']:.3f})",
                "prefix": f"{b[i]['reason'] or 'kept'} ({b[i]['lang']} {b[i]['lang_score']:.3f})",
            }
            for i in differ
        ],
        "reasons_differ": dict(
            Counter(
                f"{a[i]['reason'] or 'kept'} -> {b[i]['reason'] or 'kept'}"
                for i in docs
                if a[i]["reason"] != b[i]["reason"]
            )
        ),
    }


def render(results: dict[str, Any]) -> str:
    c, runs, chars = results["comparison"], results["runs"], results["chars"]
    whole, prefix = runs["whole"], runs["prefix"]

    def share(n: int, total: int) -> str:
        return f"{n}/{total} ({100 * n / total:.2f}%)" if total else "-"

    lines = [
        SECTION_START,
        "## Language ID on a prefix (`quality.language_id_chars`)",
        "",
        f"Command: `{results['command']}` (`bench/language_prefix.py`; {results['machine']['cpu']},"
        " each run in its own subprocess pinned to one CPU). Our quality stage with the default"
        " `QualityConfig` (English above 0.65) over the corpus above, language ID on the whole"
        f" text (`language_id_chars=0`) and on the first {chars} characters.",
        "",
        "| language ID reads | documents | kept | CPU s | CPU s of the work alone | wall s |",
        "|---|---|---|---|---|---|",
        f"| whole text | {c['docs']} | {c['kept_whole']} | {whole['cpu_s']} |"
        f" {whole['work_cpu_s']} | {whole['wall_s']} |",
        f"| first {chars} characters | {c['docs']} | {c['kept_prefix']} | {prefix['cpu_s']} |"
        f" {prefix['work_cpu_s']} | {prefix['wall_s']} |",
        "",
        f"- documents compared: {c['docs']}, of which {c['longer_than_prefix']} are longer than"
        " the prefix (only those can differ)",
        f"- same language: {share(c['lang_same'], c['lang_measured'])} of the documents measured"
        f" ({share(c['lang_same_long'], c['longer_than_prefix'])} of the longer ones)",
        f"- same keep/reject decision: {share(c['decision_same'], c['docs'])}"
        f" ({share(c['decision_same_long'], c['longer_than_prefix'])} of the longer ones);"
        f" same reason: {share(c['reason_same'], c['docs'])}",
        f"- quality CPU: {prefix['work_cpu_s']} s instead of {whole['work_cpu_s']} s for the work"
        f" ({100 * (1 - prefix['work_cpu_s'] / whole['work_cpu_s']):.0f}% less)",
    ]
    if c["reasons_differ"]:
        lines += ["", "| reason, whole text -> prefix | documents |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in c["reasons_differ"].items()]
    if c["decisions_differ"]:
        lines += [
            "",
            "| document | source | characters | whole text | prefix |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {d['id'][:12]} | {d['source']} | {d['chars']} | {d['whole']} | {d['prefix']} |"
            for d in c["decisions_differ"][:20]
        ]
    return "\n".join([*lines, SECTION_END]) + "\n"


def with_section(text: str, md: Path) -> str:
    """``text`` with this benchmark's section from ``md`` (if it has one) at its end: how
    ``bench/curation.py`` keeps these figures when it rewrites the file."""
    old = md.read_text() if md.exists() else ""
    start, end = old.find(SECTION_START), old.find(SECTION_END)
    if start < 0 or end < 0:
        return text
    return text.rstrip("\n") + "\n\n" + old[start : end + len(SECTION_END)] + "\n"


def replace_section(md: Path, section: str) -> None:
    """Put ``section`` in ``md`` in place of the old one, or at its end."""
    old = md.read_text() if md.exists() else ""
    start, end = old.find(SECTION_START), old.find(SECTION_END)
    if start >= 0 and end >= 0:
        old = old[:start].rstrip("\n") + "\n" + old[end + len(SECTION_END) :].lstrip("\n")
    md.write_text(old.rstrip("\n") + "\n\n" + section)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        corpus, out, chars = argv[1], Path(argv[2]), int(argv[3])
        import llmflow.tasks.curate.quality  # noqa: F401 - imports are not the stage's work

        started, cpu = time.perf_counter(), time.process_time()
        n = worker(corpus, out, chars)
        summary = {"docs": n, "inner_cpu_s": round(time.process_time() - cpu, 3)}
        summary["inner_wall_s"] = round(time.perf_counter() - started, 3)
        out.with_suffix(".summary.json").write_text(json.dumps(summary))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=55_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chars", type=int, default=2000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmflow-language-prefix"))
    parser.add_argument("--md", type=Path, default=BENCH / "curation.md")
    args = parser.parse_args(argv)

    work = args.workdir.resolve()
    corpus = work / "corpus"
    shutil.rmtree(corpus, ignore_errors=True)
    corpus.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the corpus ({args.docs} documents) in {corpus} ...", flush=True)
    write_corpus(str(corpus), args.docs, args.seed)
    docs = load_corpus(corpus)
    runs, decisions = {}, {}
    for name, chars in (("whole", 0), ("prefix", args.chars)):
        out = work / f"{name}.jsonl"
        print(f"quality, language_id_chars={chars} ...", flush=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "_worker", str(corpus), str(out)]
        run = measure("llmflow", "quality", [*cmd, str(chars)], work / f"{name}.log", len(docs))
        run.work_cpu_s = json.loads(out.with_suffix(".summary.json").read_text())["inner_cpu_s"]
        print(f"  {run}", flush=True)
        runs[name] = run.__dict__
        decisions[name] = read_jsonl(out)
    command = "python bench/language_prefix.py"
    command += f" --docs {args.docs}" if args.docs != 55_000 else ""
    command += f" --chars {args.chars}" if args.chars != 2000 else ""
    results = {
        "command": command,
        "machine": machine(),
        "chars": args.chars,
        "runs": runs,
        "comparison": compare(decisions["whole"], decisions["prefix"], docs, args.chars),
    }
    (work / "results.json").write_text(json.dumps(results, indent=2))
    section = render(results)
    replace_section(args.md, section)
    print(section)
    print(f"written: {args.md} and {work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
