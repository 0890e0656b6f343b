"""Which library should learn llmflow's quality classifier: fastText or scikit-learn?

Usage (from the repository root, project venv active; fastText is not a dependency:
``pip install fasttext-numpy2`` first to include it)::

    python bench/quality_classifier.py [--per-class 6000] [--seed 0] [--out FILE]

The task is DCLM's: instruction data as positives (``../shared/data/sft``: Alpaca and Dolly/HH,
instruction, input and answer as one text), web-like text as negatives (1-3 KB documents of
Gutenberg and NLTK paragraphs, bench/scale_corpus.py's generator, plus the Common Crawl pages of
``../shared/data/web``). The texts are split 80/20 by a hash of the text, so both libraries train
and are scored on exactly the same documents. Each candidate is DCLM's shape of model: word
unigrams and bigrams into a linear classifier.

* fastText (``fasttext-numpy2``): ``train_supervised(wordNgrams=2, epoch=5, lr=0.1, dim=100)``
  on one thread (more threads make its training order, and so its model, vary run to run).
* scikit-learn: ``HashingVectorizer(ngram_range=(1, 2), n_features=2**20, alternate_sign=False)``
  then ``SGDClassifier(loss="log_loss")``: stateless features, so the model is one weight
  vector and an intercept, savable as plain arrays (no pickle).

A second task is harder: clean documents against documents of the same kind with junk mixed in
(bench/junk_text.py: boilerplate, spam, mojibake, word salad, truncated snippets).

For each: training CPU seconds, scoring docs/s per core (CPU time of this process, which runs on
one core), held-out precision and recall at 0.5, ROC AUC, and the model's size on disk.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from junk_text import KINDS, corrupt  # noqa: E402
from scale_corpus import fresh_text, paragraph_pool  # noqa: E402

DATA = BENCH.parent.parent / "shared" / "data"


def positives(data: Path) -> list[str]:
    """Instruction records as one text each: instruction, input, answer."""
    texts = []
    for record in json.loads((data / "sft" / "alpaca_5000.json").read_text()):
        parts = [record.get("instruction", ""), record.get("input", ""), record.get("output", "")]
        texts.append("\n\n".join(p for p in parts if p))
    with (data / "sft" / "dolly_hhrlhf_train_small.jsonl").open() as f:
        for line in f:
            record = json.loads(line)
            texts.append(f"{record['prompt']}\n\n{record['response']}")
    return texts


def negatives(data: Path, count: int, seed: int) -> list[str]:
    """Web-like documents: Common Crawl text (Dolma's samples), then documents generated from
    book and corpus paragraphs up to ``count``."""
    pages = []
    for path in sorted((data / "web" / "dolma").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            pages += [json.loads(line)["text"] for line in f]
    rng = random.Random(seed)
    pool = paragraph_pool(data, seed)
    generated = [fresh_text(pool, rng) for _ in range(max(0, count - len(pages)))]
    return pages[:count] + generated


def held_out(text: str) -> bool:
    return hashlib.sha256(text.encode()).digest()[0] < 52  # ~20%


def one_line(text: str) -> str:
    """fastText reads one example a line: whitespace runs (newlines too) become one space."""
    return re.sub(r"\s+", " ", text).strip()


def run_fasttext(
    train: list[tuple[str, int]], test: list[str], seed: int, tmp: Path
) -> dict[str, Any]:
    import fasttext

    path = tmp / "train.txt"
    path.write_text("".join(f"__label__{y} {one_line(t)}\n" for t, y in train))
    started = time.process_time()
    model = fasttext.train_supervised(
        str(path), wordNgrams=2, epoch=5, lr=0.1, dim=100, thread=1, seed=seed, verbose=0
    )
    train_s = time.process_time() - started
    model_path = tmp / "model.bin"
    model.save_model(str(model_path))
    started = time.process_time()
    lines = [one_line(t) for t in test]
    labels, probs = model.predict(lines, k=2)
    scores = np.array(
        [
            p[list(lab).index("__label__1")] if "__label__1" in lab else 0.0
            for lab, p in zip(labels, probs, strict=True)
        ]
    )
    score_s = time.process_time() - started
    return {
        "train_s": train_s,
        "score_s": score_s,
        "scores": scores,
        "bytes": model_path.stat().st_size,
    }


def run_sklearn(
    train: list[tuple[str, int]], test: list[str], seed: int, tmp: Path
) -> dict[str, Any]:
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.linear_model import SGDClassifier

    vectorizer = HashingVectorizer(ngram_range=(1, 2), n_features=2**20, alternate_sign=False)
    started = time.process_time()
    x = vectorizer.transform([t for t, _ in train])
    model = SGDClassifier(loss="log_loss", alpha=1e-6, max_iter=20, tol=None, random_state=seed)
    model.fit(x, np.array([y for _, y in train]))
    train_s = time.process_time() - started
    model_path = tmp / "model.npz"
    np.savez(model_path, coef=model.coef_.astype(np.float32), intercept=model.intercept_)
    started = time.process_time()
    scores = model.predict_proba(vectorizer.transform(test))[:, 1]
    score_s = time.process_time() - started
    return {
        "train_s": train_s,
        "score_s": score_s,
        "scores": scores,
        "bytes": model_path.stat().st_size,
    }


def quality_docs_per_s(texts: list[str]) -> float:
    """llmflow's quality stage on the same held-out texts, docs/s per core (its rules and
    language ID): the speed the classifier should keep up with."""
    import pyarrow as pa

    from llmflow.tasks.core.documents import DOCUMENT_SCHEMA, document_id
    from llmflow.tasks.curate import quality

    rows = [
        {
            "id": document_id(f"u{i}", t),
            "url": f"u{i}",
            "text": t,
            "source": "bench",
            "fetched_at": None,
        }
        for i, t in enumerate(texts)
    ]
    table = pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA)
    quality.quality_documents(table.slice(0, 20), quality.QualityConfig())
    started = time.process_time()
    quality.quality_documents(table, quality.QualityConfig())
    return len(texts) / (time.process_time() - started)


def junk_task(data: Path, count: int, seed: int) -> tuple[list[str], list[str]]:
    """Clean documents against documents with junk mixed in (bench/junk_text.py), each side made
    from its own generated documents, so no clean text has its corrupted twin on the other."""
    rng = random.Random(seed + 1)
    pool = paragraph_pool(data, seed)
    clean = [fresh_text(pool, rng) for _ in range(count)]
    junk = [corrupt(fresh_text(pool, rng), rng)[0] for _ in range(count)]
    return clean, junk


def compare(pos: list[str], neg: list[str], seed: int) -> tuple[list[dict[str, str]], list[str]]:
    """Every candidate trained and scored on the same split: its table rows, the held-out texts."""
    from sklearn.metrics import precision_score, recall_score, roc_auc_score

    labelled = [(t, 1) for t in pos] + [(t, 0) for t in neg]
    random.Random(seed).shuffle(labelled)
    train = [(t, y) for t, y in labelled if not held_out(t)]
    test = [(t, y) for t, y in labelled if held_out(t)]
    truth = np.array([y for _, y in test])
    texts = [t for t, _ in test]
    candidates: dict[str, Callable[..., dict[str, Any]]] = {"scikit-learn": run_sklearn}
    try:
        import fasttext  # noqa: F401

        candidates["fastText"] = run_fasttext
    except ImportError:
        print("fasttext not installed: pip install fasttext-numpy2 to compare it", file=sys.stderr)
    rows = []
    for name, run in candidates.items():
        with tempfile.TemporaryDirectory() as tmp:
            result = run(train, texts, seed, Path(tmp))
        scores = result["scores"]
        predicted = (scores >= 0.5).astype(int)
        rows.append(
            {
                "library": name,
                "documents (train / held out)": f"{len(train):,} / {len(test):,}",
                "train CPU s": f"{result['train_s']:.2f}",
                "score docs/s per core": f"{len(texts) / result['score_s']:,.0f}",
                "precision": f"{precision_score(truth, predicted):.3f}",
                "recall": f"{recall_score(truth, predicted):.3f}",
                "ROC AUC": f"{roc_auc_score(truth, scores):.4f}",
                "model MB": f"{result['bytes'] / 2**20:.1f}",
            }
        )
        print(rows[-1])
    return rows, texts


def table(rows: list[dict[str, str]]) -> list[str]:
    return [
        "| " + " | ".join(rows[0]) + " |",
        "| " + " | ".join(["---", "---"] + ["---:"] * (len(rows[0]) - 2)) + " |",
        *("| " + " | ".join(r.values()) + " |" for r in rows),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=BENCH / "quality_classifier.md")
    args = parser.parse_args(argv)
    command = "python bench/quality_classifier.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    pos = positives(args.data)[: args.per_class]
    neg = negatives(args.data, args.per_class, args.seed)
    instruction_rows, texts = compare(pos, neg, args.seed)
    clean, junk = junk_task(args.data, args.per_class, args.seed)
    junk_rows, _ = compare(clean, junk, args.seed)
    quality_rate = quality_docs_per_s(texts)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = [
        "# Quality classifier: fastText against scikit-learn",
        "",
        f"Produced by `{command.strip()}` (its docstring says how it measures), {when};"
        f" {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} at the end.",
        "",
        "## Instructions against web-like text (DCLM's recipe)",
        "",
        f"{len(pos):,} instruction records (positives), {len(neg):,} web-like documents"
        " (negatives).",
        "",
        *table(instruction_rows),
        "",
        "## Clean documents against documents with junk mixed in",
        "",
        f"{len(clean):,} clean documents (positives), {len(junk):,} with one kind of junk each"
        f" (negatives: {', '.join(KINDS)}; bench/junk_text.py).",
        "",
        *table(junk_rows),
        "",
        f"llmflow's quality stage (rules and language ID) on the first task's held-out documents:"
        f" {quality_rate:,.0f} docs/s per core.",
        "",
    ]
    args.out.write_text("\n".join(out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
