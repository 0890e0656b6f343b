"""Benchmark: the toxicity stage's default backend (alt-profanity-check) on real labelled data.

Decides ``DEFAULT_PROFANITY_THRESHOLD`` and the default ``chunk_chars`` in
``tasks/curate/toxicity.py``,
and says plainly what the default backend catches and misses. Every score comes from the stage's
own code (``load_scorer`` and ``score_texts`` from ``llmflow.tasks.curate.toxicity``, the same
chunking
and batching the stage uses). Sources, all under ``shared/data``:

* Davidson et al. 2017 (``toxicity/davidson/labeled_data.csv``): 24,783 tweets, class 0 hate,
  1 offensive, 2 neither. alt-profanity-check was trained on this data set (its README says so),
  so these are in-sample figures: an upper bound, useful for the shape of the threshold curve.
* ToxiGen prompt sets (``toxicity/toxigen_prompts/{hate,neutral}_<group>_1k.txt``): each line is
  one prompt of about six statements written as ``- statement\\n- statement\\n-`` with a literal
  backslash-n between them (and, in a few files, ``!- `` with no newline); the files repeat the
  same statements in shuffled orders. Scored as unique statements per file (hate = positive,
  neutral = negative) and as whole prompt lines. Out of sample, mostly implicit hate.
* Clean long text: Pride and Prejudice and The Devil's Dictionary (Project Gutenberg) cut into
  ~10 kB documents at blank lines, and the NLTK inaugural and State of the Union speeches (one
  document a speech): nothing there should be removed. The same documents with one offensive
  tweet inserted at a paragraph break measure how far chunking dilutes a single toxic passage.

Run (from the repository root, ~1 minute)::

    /tmp/venv/bin/python bench/toxicity_eval.py

It prints the tables and rewrites the results block of ``bench/toxicity_eval.md`` (the prose
around it is kept). ``--help`` lists the options.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import os
import platform
import random
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from llmflow.tasks.core.documents import DOCUMENT_SCHEMA
from llmflow.tasks.curate.toxicity import (
    DEFAULT_PROFANITY_THRESHOLD,
    PROFANITY_LABEL,
    ToxicityConfig,
    load_scorer,
    score_texts,
    toxicity_documents,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS_MD = REPO / "bench" / "toxicity_eval.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
CHUNK_SIZES = (500, 1000, 2000, 4000)


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, flagged: Sequence[bool], positive: Sequence[bool]) -> Counts:
        c = cls()
        for f, p in zip(flagged, positive, strict=True):
            if f and p:
                c.tp += 1
            elif f:
                c.fp += 1
            elif p:
                c.fn += 1
            else:
                c.tn += 1
        return c

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else float("nan")

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else float("nan")

    @property
    def f1(self) -> float:
        return 2 * self.tp / (2 * self.tp + self.fp + self.fn) if self.tp else 0.0

    @property
    def fpr(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else float("nan")


def flags(scores: Sequence[float | None], threshold: float) -> list[bool]:
    return [s is not None and s >= threshold for s in scores]


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def quote(text: str, limit: int = 110) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- data ---------------------------------------------------------------------------------------


def read_davidson(data: Path) -> tuple[list[str], list[int]]:
    with (data / "toxicity" / "davidson" / "labeled_data.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["tweet"] for r in rows], [int(r["class"]) for r in rows]


_STATEMENT_SPLIT = re.compile(r"\\n|(?<=[.!?])-\s")  # a literal backslash-n, or "!- " run-ons


def toxigen_statements(line: str) -> list[str]:
    """The statements of one prompt line, without their "- " bullets and the empty last bullet."""
    out = []
    for part in _STATEMENT_SPLIT.split(line.rstrip("\n")):
        part = part.strip()
        if part.startswith("-"):
            part = part[1:].strip()
        if part:
            out.append(part)
    return out


def read_toxigen(data: Path) -> dict[str, dict[str, tuple[list[str], list[str]]]]:
    """{kind: {group: (unique statements, prompt lines as documents)}} for kind hate/neutral."""
    out: dict[str, dict[str, tuple[list[str], list[str]]]] = {"hate": {}, "neutral": {}}
    folder = data / "toxicity" / "toxigen_prompts"
    for path in sorted(folder.glob("*_1k.txt")):
        kind, _, rest = path.name.partition("_")
        group = rest.removesuffix("_1k.txt")
        statements: dict[str, None] = {}
        prompts = []
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = toxigen_statements(line)
            statements.update(dict.fromkeys(parts))
            if parts:
                prompts.append("\n".join(parts))
        out[kind][group] = (list(statements), prompts)
    return out


def split_at_blank_lines(text: str, size: int) -> list[str]:
    """Consecutive paragraphs joined into documents of about ``size`` characters."""
    docs, current, length = [], [], 0
    for para in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        para = para.strip()
        if not para:
            continue
        current.append(para)
        length += len(para) + 2
        if length >= size:
            docs.append("\n\n".join(current))
            current, length = [], 0
    if current:
        docs.append("\n\n".join(current))
    return docs


def read_clean_documents(data: Path) -> dict[str, list[str]]:
    gutenberg = data / "text" / "gutenberg"
    out = {}
    for name, path in (
        ("Pride and Prejudice", gutenberg / "1342" / "1342-0.txt"),
        ("The Devil's Dictionary", gutenberg / "972" / "972.txt"),
    ):
        out[name] = split_at_blank_lines(path.read_text(encoding="utf-8-sig"), 10_000)
    for name, zip_name in (
        ("inaugural speeches", "inaugural"),
        ("State of the Union", "state_union"),
    ):
        with zipfile.ZipFile(data / "text" / "nltk" / f"{zip_name}.zip") as z:
            out[name] = [
                z.read(n).decode("latin-1")
                for n in sorted(z.namelist())
                if n.endswith(".txt") and "README" not in n
            ]
    return out


# --- measurements -------------------------------------------------------------------------------


def davidson_section(data: Path, scorer, config: ToxicityConfig) -> list[str]:
    texts, classes = read_davidson(data)
    started = time.perf_counter()
    scores, _ = score_texts(texts, scorer, config.chunk_chars, config.max_chunks, config.batch_size)
    seconds = time.perf_counter() - started
    p = scores[PROFANITY_LABEL]
    toxic = [c in (0, 1) for c in classes]
    hate = [c == 0 for c in classes]
    rows = []
    for t in SWEEP:
        f = flags(p, t)
        tox, hat = Counts.of(f, toxic), Counts.of(f, hate)
        offensive_recall = sum(fl and c == 1 for fl, c in zip(f, classes, strict=True)) / sum(
            c == 1 for c in classes
        )
        mark = " (default)" if t == DEFAULT_PROFANITY_THRESHOLD else ""
        rows.append(
            [f"{t}{mark}", tox.precision, tox.recall, tox.f1, tox.fpr, hat.recall, hat.precision,
             offensive_recall]
        )  # fmt: skip
    d = Counts.of(flags(p, DEFAULT_PROFANITY_THRESHOLD), toxic)
    h = Counts.of(flags(p, DEFAULT_PROFANITY_THRESHOLD), hate)
    return [
        "### Davidson tweets (in-sample: alt-profanity-check was trained on them)",
        "",
        f"{len(texts):,} tweets: {sum(c == 0 for c in classes):,} hate,"
        f" {sum(c == 1 for c in classes):,} offensive, {sum(c == 2 for c in classes):,} neither."
        " Toxic = hate or offensive. FPR = share of *neither* tweets removed.",
        "",
        table(
            [
                "threshold",
                "toxic P",
                "toxic R",
                "toxic F1",
                "FPR neither",
                "hate R",
                "hate-only P",
                "offensive R",
            ],
            rows,
        ),  # fmt: skip
        "",
        f"At the default {DEFAULT_PROFANITY_THRESHOLD}: toxic TP {d.tp:,}, FP {d.fp:,},"
        f" FN {d.fn:,}, TN {d.tn:,}; hate-only TP {h.tp:,}, FN {h.fn:,} (and {h.fp:,} removed"
        f" tweets that are offensive or neither). Scoring speed: {len(texts) / seconds:,.0f}"
        " tweets/s.",
        "",
    ]


def toxigen_section(data: Path, scorer, config: ToxicityConfig) -> list[str]:
    sets = read_toxigen(data)

    def score(texts: list[str]) -> list[float | None]:
        return score_texts(texts, scorer, config.chunk_chars, config.max_chunks)[0][PROFANITY_LABEL]

    hate = {g: score(s) for g, (s, _) in sets["hate"].items()}
    neutral = {g: score(s) for g, (s, _) in sets["neutral"].items()}
    hate_all = [v for g in hate for v in hate[g]]
    neutral_all = [v for g in neutral for v in neutral[g]]
    labels = [True] * len(hate_all) + [False] * len(neutral_all)
    rows = []
    for t in SWEEP:
        c = Counts.of(flags(hate_all + neutral_all, t), labels)
        mark = " (default)" if t == DEFAULT_PROFANITY_THRESHOLD else ""
        rows.append([f"{t}{mark}", c.precision, c.recall, c.f1, c.fpr, c.tp, c.fp])
    t = DEFAULT_PROFANITY_THRESHOLD
    group_rows = []
    for g in sorted(set(hate) | set(neutral)):
        h, n = hate.get(g, []), neutral.get(g, [])
        group_rows.append(
            [g, len(h), sum(flags(h, t)) / len(h) if h else "-", len(n),
             sum(flags(n, t)) / len(n) if n else "-"]
        )  # fmt: skip
    prompt_hate = score([p for _, ps in sets["hate"].values() for p in ps])
    prompt_neutral = score([p for _, ps in sets["neutral"].values() for p in ps])
    pc = Counts.of(
        flags(prompt_hate + prompt_neutral, t),
        [True] * len(prompt_hate) + [False] * len(prompt_neutral),
    )
    hate_texts = [s for g in sets["hate"] for s in sets["hate"][g][0]]
    neutral_texts = [s for g in sets["neutral"] for s in sets["neutral"][g][0]]
    caught = sorted(zip(hate_all, hate_texts, strict=True), reverse=True)[:5]
    rng = random.Random(0)
    missed = rng.sample([s for v, s in zip(hate_all, hate_texts, strict=True) if v < t], 8)
    false_pos = sorted(zip(neutral_all, neutral_texts, strict=True), reverse=True)[:6]
    return [
        "### ToxiGen statements (out of sample; mostly implicit hate)",
        "",
        f"{len(hate_all)} unique hate and {len(neutral_all)} unique neutral statements"
        f" ({len(sets['hate'])} hate groups, {len(sets['neutral'])} neutral groups; there is no"
        " neutral_trans file). Positive = hate.",
        "",
        table(["threshold", "precision", "recall", "F1", "FPR neutral", "TP", "FP"], rows),
        "",
        f"Per group at the default {t}:",
        "",
        table(["group", "hate n", "hate recall", "neutral n", "neutral removed"], group_rows),
        "",
        f"Whole prompt lines (about six statements each, {len(prompt_hate):,} hate and"
        f" {len(prompt_neutral):,} neutral lines) at {t}: precision {pc.precision:.3f}, recall"
        f" {pc.recall:.3f}, neutral lines removed {pc.fpr:.3f}.",
        "",
        "Highest-scored hate statements (caught):",
        "",
        *[f"- {v:.2f} — {quote(s)}" for v, s in caught],
        "",
        "Hate statements missed (random sample of those under the threshold):",
        "",
        *[f"- {quote(s)}" for s in missed],
        "",
        f"Highest-scored neutral statements (removed at the default if ≥ {t}):",
        "",
        *[f"- {v:.2f} — {quote(s)}" for v, s in false_pos],
        "",
    ]


def chunk_section(data: Path, scorer, config: ToxicityConfig) -> list[str]:
    clean = read_clean_documents(data)
    texts, classes = read_davidson(data)
    alone = score_texts(texts, scorer)[0][PROFANITY_LABEL]
    # Offensive tweets the model flags on their own, so that a miss below is dilution alone.
    flagged = [tw for tw, c, s in zip(texts, classes, alone, strict=True) if c == 1 and s >= 0.9]
    rng = random.Random(0)
    hosts = [d for docs in clean.values() for d in docs if len(d) >= 4000]
    inserted = []
    for doc in hosts:
        paras = doc.split("\n\n")
        at = rng.randrange(1, len(paras)) if len(paras) > 1 else 1
        inserted.append("\n\n".join(paras[:at] + [rng.choice(flagged)] + paras[at:]))
    t = DEFAULT_PROFANITY_THRESHOLD
    rows = []
    for size in (*CHUNK_SIZES, None):
        chunk = size or 10**9
        row: list[object] = [f"{size}{' (default)' if size == config.chunk_chars else ''}"
                             if size else "whole document"]  # fmt: skip
        started = time.perf_counter()
        n_chunks = 0
        for docs in clean.values():
            s, st = score_texts(docs, scorer, chunk, config.max_chunks if size else 1)
            n_chunks += st["chunks_scored"]
            row.append(f"{sum(flags(s[PROFANITY_LABEL], t))}/{len(docs)}")
        seconds = time.perf_counter() - started
        s, _ = score_texts(inserted, scorer, chunk, config.max_chunks if size else 1)
        row.append(sum(flags(s[PROFANITY_LABEL], t)) / len(inserted))
        chars = sum(len(d) for docs in clean.values() for d in docs)
        row.append(f"{chars / seconds / 1e6:.1f}")
        rows.append(row)
    names = list(clean)
    # The threshold on long documents, at the default chunk size.
    clean_scores = {
        n: score_texts(docs, scorer, config.chunk_chars, config.max_chunks)[0][PROFANITY_LABEL]
        for n, docs in clean.items()
    }
    inserted_scores = score_texts(inserted, scorer, config.chunk_chars, config.max_chunks)[0][
        PROFANITY_LABEL
    ]
    sweep_rows = []
    for th in SWEEP:
        mark = " (default)" if th == t else ""
        sweep_rows.append(
            [f"{th}{mark}", *(f"{sum(flags(clean_scores[n], th))}/{len(clean[n])}" for n in names),
             sum(flags(inserted_scores, th)) / len(inserted)]
        )  # fmt: skip
    return [
        "### Long documents: clean text removed, one inserted tweet found, by chunk size",
        "",
        f"Clean documents (removed/total at {t}); *inserted*: the {len(hosts)} clean documents of"
        " ≥ 4,000 characters with one offensive Davidson tweet (one the model scores ≥ 0.9 on its"
        " own) inserted at a random paragraph break; share removed. MB/s: clean documents scored"
        " per second at that chunk size.",
        "",
        table(["chunk_chars", *names, "inserted tweet found", "MB/s"], rows),
        "",
        f"The same documents by threshold, at the default chunk_chars {config.chunk_chars}:",
        "",
        table(["threshold", *names, "inserted tweet found"], sweep_rows),
        "",
    ]


def speed_section(scorer, config: ToxicityConfig, data: Path) -> list[str]:
    texts, _ = read_davidson(data)
    schema_rows = [
        {"id": str(i), "text": t, "url": None, "source": "bench", "fetched_at": None}
        for i, t in enumerate(texts)
    ]
    tweets = pa.Table.from_pylist(schema_rows, schema=DOCUMENT_SCHEMA)
    started = time.perf_counter()
    toxicity_documents(tweets, config)
    tweet_rate = len(texts) / (time.perf_counter() - started)
    docs = [d for ds in read_clean_documents(data).values() for d in ds]
    long_table = pa.Table.from_pylist(
        [{"id": str(i), "text": t, "url": None, "source": "bench", "fetched_at": None}
         for i, t in enumerate(docs)], schema=DOCUMENT_SCHEMA
    )  # fmt: skip
    started = time.perf_counter()
    toxicity_documents(long_table, config)
    long_seconds = time.perf_counter() - started
    huge = ("All quiet on the western front. " * 1_600_000)[:50_000_000]
    started = time.perf_counter()
    one = [{"id": "h", "text": huge, "url": None, "source": "bench", "fetched_at": None}]
    toxicity_documents(pa.Table.from_pylist(one, schema=DOCUMENT_SCHEMA), config)
    huge_seconds = time.perf_counter() - started
    chars = sum(len(d) for d in docs)
    return [
        "### Speed of the stage function (`toxicity_documents`, one process)",
        "",
        table(
            ["input", "documents", "docs/s", "MB/s"],
            [
                ["Davidson tweets", len(texts), f"{tweet_rate:,.0f}", "-"],
                [
                    f"clean long documents (mean {chars // len(docs):,} chars)",
                    len(docs),
                    f"{len(docs) / long_seconds:,.0f}",
                    f"{chars / long_seconds / 1e6:.1f}",
                ],
                [
                    "one 50 MB document (sampled: max_chunks chunks)",
                    1,
                    f"{huge_seconds:.2f} s",
                    "-",
                ],
            ],
        ),
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("LLMFLOW_SHARED_DATA", REPO.parent / "shared" / "data")),
        help="the shared data folder (default ../shared/data or $LLMFLOW_SHARED_DATA)",
    )
    parser.add_argument("--no-write", action="store_true", help=f"do not rewrite {RESULTS_MD.name}")
    args = parser.parse_args()
    config = ToxicityConfig()
    started = time.perf_counter()
    scorer = load_scorer(config)
    load_seconds = time.perf_counter() - started
    versions = ", ".join(
        f"{p} {importlib.metadata.version(p)}" for p in ("alt-profanity-check", "scikit-learn")
    )
    lines = [
        f"Measured with {versions}; Python {platform.python_version()}, {os.cpu_count()} CPU"
        f" cores; `ToxicityConfig()` defaults (threshold {DEFAULT_PROFANITY_THRESHOLD},"
        f" chunk_chars {config.chunk_chars}, max_chunks {config.max_chunks}, batch_size"
        f" {config.batch_size}). Model load: {load_seconds:.1f} s.",
        "",
        *davidson_section(args.data, scorer, config),
        *toxigen_section(args.data, scorer, config),
        *chunk_section(args.data, scorer, config),
        *speed_section(scorer, config, args.data),
    ]
    block = "\n".join(lines).rstrip() + "\n"
    print(block)
    if not args.no_write and RESULTS_MD.exists():
        text = RESULTS_MD.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            RESULTS_MD.write_text(f"{head}{BEGIN}\n{block}{END}{tail}", encoding="utf-8")
            print(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    main()
