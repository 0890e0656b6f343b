"""Does each curation step lower held-out bits per byte? The curation ablation on real text.

Builds a corpus from ``../shared/data`` (Gutenberg, NLTK and the web captures, with generated
near-duplicates: :mod:`curation_corpus`), turns a share of its documents into realistic junk
(boilerplate, spam, mojibake, word salad, truncated snippets: :mod:`junk_text`), writes it as
JSONL files and runs ``llmflow ablate`` on it with the default variants, then writes the report
the ablation published to MLflow into ``bench/ablation.md`` with the wall and CPU time.

    python bench/ablation.py [--docs 3000] [--junk 0.25] [--seeds 0,1,2] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml
from curation_corpus import DEFAULT_DATA, build_documents
from junk_text import corrupt

HERE = Path(__file__).resolve().parent
LLMFLOW = str(Path(sys.executable).parent / "llmflow")


def write_corpus(out: Path, docs: int, junk: float, seed: int) -> Counter[str]:
    """The corpus as 4 JSONL files; returns the documents per kind."""
    rng = random.Random(seed)
    documents, _, _ = build_documents(DEFAULT_DATA, docs, seed)
    kinds: Counter[str] = Counter()
    rows = []
    for doc in documents:
        text, kind = doc.text, "clean" if not doc.source.startswith("bench-") else doc.source
        if rng.random() < junk:
            text, kind = corrupt(doc.text, rng)
        kinds[kind] += 1
        rows.append(json.dumps({"text": text, "url": doc.url}))
    out.mkdir(parents=True, exist_ok=True)
    for part in range(4):
        (out / f"part-{part}.jsonl").write_text("\n".join(rows[part::4]) + "\n")
    return kinds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--junk", type=float, default=0.25, help="share turned into junk")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=60, help="proxy optimizer steps")
    parser.add_argument("--limit", type=int, default=20, help="items per benchmark")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=str(HERE / "ablation.md"))
    args = parser.parse_args()

    root = Path(args.workdir or tempfile.mkdtemp(prefix="llmflow-ablation-"))
    kinds = write_corpus(root / "corpus", args.docs, args.junk, 0)
    proxy = [
        f"pretrain.max_steps={args.steps}",
        "pretrain.warmup_steps=10",
        f"pretrain.eval_interval={args.steps}",
        f"pretrain.checkpoint_interval={args.steps}",
        "pretrain.keep_checkpoints=1",
        "pretrain.sample_prompts=[]",
        f"evaluate.limit={args.limit}",
    ]
    (root / "ablation.yaml").write_text(yaml.safe_dump({"proxy": proxy}))
    seeds = json.dumps(sorted(str(p) for p in (root / "corpus").glob("*.jsonl")))
    command = [
        LLMFLOW, "ablate", "--workdir", str(root / "work"),
        "--ablation", str(root / "ablation.yaml"), "--seeds", args.seeds,
        "--set", f"crawl.seeds={seeds}",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    assert experiment is not None
    (parent,) = client.search_runs(
        [experiment.experiment_id],
        "tags.`llmflow.kind` = 'curation-ablation'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    report = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "ablation/report.json", str(root))
        ).read_text()
    )["markdown"]
    corpus = ", ".join(f"{k} {v:,}" for k, v in kinds.most_common())
    text = (
        "# The curation ablation on real text\n\n"
        f"    python bench/ablation.py --docs {args.docs} --junk {args.junk} --seeds {args.seeds}"
        f" --steps {args.steps} --limit {args.limit}\n\n"
        f"Corpus: {args.docs:,} documents from ../shared/data (bench/curation_corpus.py: Gutenberg,"
        f" NLTK, web captures, generated near-duplicates), {args.junk:.0%} turned into junk"
        f" (bench/junk_text.py): {corpus}. Wall {wall / 60:.1f} min, {cpu / 60:.1f} CPU-min"
        " (2 cores).\n\n" + report.replace("# Curation ablation\n", "## The report\n")
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
