"""A curation benchmark corpus from the shared real data, with generated near-duplicates.

Usage::

    python bench/curation_corpus.py --out DIR [--docs 55000] [--seed 0]

``DIR`` becomes an llmflow dataset (``part-0000N.parquet`` shards in DOCUMENT_SCHEMA, written and
listed in ``manifest.json`` by llmflow's own stage mechanism), plus ``DIR/truth/``:

* ``truth.parquet`` / ``pairs.jsonl``: one row per generated document, ``(variant_id, source_id,
  kind, edit_rate, jaccard)``; ``kind`` is ``exact`` (a copy under another URL) or ``near`` (small
  edits); ``jaccard`` is the true 5-gram shingle Jaccard of the pair after :func:`shingle_words`.
* ``sources.json``: how many documents each source gave.

How the real text becomes documents (kept simple on purpose, so anyone can reason about it):

* Project Gutenberg ``.txt`` files (Pride and Prejudice in five editions, The Devil's Dictionary
  in two), and the NLTK corpora abc, brown, inaugural: one document per blank-line separated
  paragraph, line breaks kept. Brown's ``word/tag`` tokens lose their tags. The several editions
  give natural near and exact duplicates (and the Gutenberg licence paragraphs repeat).
* NLTK corpora written one sentence, post or paragraph per line (movie_reviews, state_union,
  webtext, nps_chat posts): runs of consecutive non-blank lines, each run 1 to 12 lines long
  (drawn per file from a seeded generator), so documents range from one-liners to paragraphs.
* Web pages: every document llmflow's own file reader gives for the WARC, ARC, WET and JSONL
  files under ``web/`` (Common Crawl and wget captures), whole.

If the sources give more documents than asked for, a seeded sample is kept. Then about 8% of
``--docs`` are generated from a seeded sample of source documents with at least 50 words: a
quarter of the sampled sources get one exact copy, the rest 1 to 3 near copies, each with a word
edit rate drawn from 2-10% (substitutions, deletions and insertions of words), and sometimes
changed punctuation or case and a prepended or appended line. All documents are shuffled (seeded)
into 8 shards, so duplicates cross shard boundaries. Same arguments, same bytes.
"""

from __future__ import annotations

import argparse
import glob
import json
import random
import re
import sys
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from llmflow.tasks.core.documents import DOCUMENT_SCHEMA, document_id, rejected_schema
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    WorkUnit,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import ShardResult

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPEC = StageSpec(name="bench-curation-corpus", version="1")
FETCHED_AT = datetime(2026, 1, 1, tzinfo=UTC)  # fixed, so the same build gives the same bytes
SHARDS = 8
DUP_SHARE = 0.08
MIN_SOURCE_WORDS = 50
MAX_RUN_LINES = 12
PARAGRAPH_CORPORA = ("abc", "brown", "inaugural")
LINE_CORPORA = ("movie_reviews", "state_union", "webtext", "nps_chat")
NGRAM = 5

PREFIXES = (
    "Posted by admin",
    "Home > Articles",
    "Updated: March 3, 2021",
    "Skip to main content",
    "From Wikipedia, the free encyclopedia",
)
SUFFIXES = (
    "Share this: Facebook Twitter Email",
    "Read more",
    "All rights reserved.",
    "Click here to subscribe to our newsletter.",
    "Leave a comment",
)


class CorpusConfig(StageConfig):
    """What decides the corpus's bytes: recorded in its manifest like any stage's config."""

    docs: int = Field(
        default=55_000, description="Documents in the corpus, generated ones included."
    )
    seed: int = Field(default=0, description="Seed of every sample, edit and shuffle.")


@dataclass
class Doc:
    url: str
    text: str
    source: str

    @property
    def id(self) -> str:
        return document_id(self.url, self.text)


# ---------------------------------------------------------------------------------------------
# Normalisation shared with bench/curation.py's precision check


_NUMBERS = re.compile(r"\d+(?:[.,]\d+)?")
_NON_WORD = re.compile(r"[^\w\s]|_")


def shingle_words(text: str) -> list[str]:
    """FineWeb's ``simplify_text`` (what both tools shingle): lower case, numbers to 0,
    punctuation to spaces, accents removed; then words split on whitespace."""
    text = _NON_WORD.sub(" ", _NUMBERS.sub("0", text.lower()))
    if not text.isascii():
        text = "".join(
            c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn"
        )
    return text.split()


def shingles(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = shingle_words(text)
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str, n: int = NGRAM) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


# ---------------------------------------------------------------------------------------------
# Real sources


def _clean(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n").strip()


def _paragraphs(text: str) -> list[str]:
    return [p.strip("\n") for p in re.split(r"\n[ \t]*\n", _clean(text)) if p.strip()]


def _line_runs(lines: list[str], rng: random.Random) -> list[str]:
    lines = [line.rstrip() for line in lines if line.strip()]
    runs, i = [], 0
    while i < len(lines):
        k = rng.randint(1, MAX_RUN_LINES)
        runs.append("\n".join(lines[i : i + k]))
        i += k
    return runs


_BROWN_DETOK = [
    (re.compile(r" ([.,;:?!)\]'])"), r"\1"),
    (re.compile(r"([(\[]) "), r"\1"),
    (re.compile(r"`` ?"), '"'),
    (re.compile(r" ?''"), '"'),
]


def _brown_untag(paragraph: str) -> str:
    lines = []
    for line in paragraph.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        text = " ".join(words)
        for pattern, repl in _BROWN_DETOK:
            text = pattern.sub(repl, text)
        if text:
            lines.append(text)
    return "\n".join(lines)


def gutenberg_documents(data: Path) -> Iterator[Doc]:
    for path in sorted(glob.glob(str(data / "text" / "gutenberg" / "*" / "*.txt"))):
        p = Path(path)
        text = p.read_bytes().decode("utf-8-sig", errors="replace")
        for i, para in enumerate(_paragraphs(text)):
            yield Doc(f"bench://gutenberg/{p.parent.name}/{p.stem}/p{i}", para, "gutenberg")


def nltk_documents(data: Path, seed: int) -> Iterator[Doc]:
    for corpus in PARAGRAPH_CORPORA + LINE_CORPORA:
        zpath = data / "text" / "nltk" / f"{corpus}.zip"
        if not zpath.exists():
            continue
        with zipfile.ZipFile(zpath) as zf:
            for name in sorted(zf.namelist()):
                base = name.rsplit("/", 1)[-1]
                if name.endswith("/") or base.startswith("README") or base.startswith("cats"):
                    continue
                raw = zf.read(name).decode("utf-8", errors="replace")
                if corpus == "nps_chat":
                    if not name.endswith(".xml"):
                        continue
                    root = ET.fromstring(raw)
                    posts = [(post.text or "").strip() for post in root.iter("Post")]
                    parts = _line_runs(posts, random.Random(f"{seed}:{name}"))
                elif corpus in LINE_CORPORA:
                    parts = _line_runs(_clean(raw).split("\n"), random.Random(f"{seed}:{name}"))
                else:
                    parts = _paragraphs(raw)
                    if corpus == "brown":
                        parts = [t for t in (_brown_untag(p) for p in parts) if t]
                for i, part in enumerate(parts):
                    yield Doc(f"bench://nltk/{name}/p{i}", part, f"nltk-{corpus}")


def web_documents(data: Path) -> Iterator[Doc]:
    from llmflow.tasks.core.documents import Document
    from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
    from llmflow.tasks.ingest.file_sources import expand_file_seed, iter_file_documents

    web = data / "web"
    if not web.exists():
        return
    with BoundedExtractor() as extractor:
        for path in expand_file_seed(str(web)):
            if path.endswith(".wat.gz"):
                continue  # metadata records, no page text
            for n, outcome in enumerate(iter_file_documents(path, extractor, 5_000_000)):
                if not isinstance(outcome, Document) or outcome.reject_reason is not None:
                    continue
                text = _clean(outcome.text)
                if text:
                    rel = path.split("/web/", 1)[-1]
                    yield Doc(f"bench://web/{rel}/{n}/{outcome.url or ''}", text, "web")


# ---------------------------------------------------------------------------------------------
# Generated duplicates


def _edit_words(text: str, rate: float, rng: random.Random, vocab: list[str]) -> tuple[str, int]:
    """Substitute, delete or insert words at ``rate``, keeping the line structure."""
    out_lines, edits = [], 0
    for line in text.split("\n"):
        out: list[str] = []
        for word in line.split(" "):
            if not word or rng.random() >= rate:
                out.append(word)
                continue
            edits += 1
            op = rng.randrange(3)
            if op == 0:  # substitution
                out.append(rng.choice(vocab))
            elif op == 1:  # insertion after the word
                out.extend([word, rng.choice(vocab)])
            # op == 2: deletion
        out_lines.append(" ".join(out))
    return "\n".join(out_lines), edits


def _restyle(text: str, rng: random.Random) -> str:
    """Changed punctuation or case, as copies on other sites often have."""
    choice = rng.randrange(4)
    if choice == 0:
        return text.lower()
    if choice == 1:
        return text.replace(",", "").replace(";", ",")
    if choice == 2:
        return text.replace('"', "'").replace("!", ".")
    return "\n".join(line[:1].upper() + line[1:] for line in text.split("\n"))


def make_variant(text: str, rng: random.Random, vocab: list[str]) -> tuple[str, float]:
    """A near copy of ``text`` and its word edit rate (edited words / words in the source)."""
    rate = rng.uniform(0.02, 0.10)
    variant, edits = _edit_words(text, rate, rng, vocab)
    if rng.random() < 0.3:
        variant = _restyle(variant, rng)
    if rng.random() < 0.3:
        variant = rng.choice(PREFIXES) + "\n" + variant
    if rng.random() < 0.3:
        variant = variant + "\n" + rng.choice(SUFFIXES)
    words = max(1, len(text.split()))
    if variant == text:  # nothing drawn: force one substitution so it is a near copy, not exact
        variant, edits = rng.choice(PREFIXES) + "\n" + text, 0
    return variant, round(edits / words, 4)


# ---------------------------------------------------------------------------------------------
# Building


def source_documents(data: Path, seed: int) -> list[Doc]:
    docs = list(gutenberg_documents(data))
    docs += nltk_documents(data, seed)
    docs += web_documents(data)
    return docs


def build_documents(
    data: Path, n_docs: int, seed: int
) -> tuple[list[Doc], list[dict[str, Any]], Counter[str]]:
    """All documents in shuffled order, and the ground truth of the generated ones."""
    rng = random.Random(seed)
    base = source_documents(data, seed)
    n_generated = max(1, round(n_docs * DUP_SHARE))
    n_base = n_docs - n_generated
    if len(base) > n_base:
        keep = sorted(rng.sample(range(len(base)), n_base))
        base = [base[i] for i in keep]
    else:
        n_generated = n_docs - len(base)
    sources = Counter(d.source for d in base)

    vocab = sorted({w for d in base[:: max(1, len(base) // 2000)] for w in d.text.split() if w})
    candidates = [d for d in base if len(d.text.split()) >= MIN_SOURCE_WORDS]
    rng.shuffle(candidates)
    generated: list[Doc] = []
    truth: list[dict[str, Any]] = []
    for src in candidates:
        if len(generated) >= n_generated:
            break
        if rng.random() < 0.25:
            copies = [(src.text, "exact", 0.0)]
        else:
            copies = []
            for _ in range(rng.randint(1, 3)):
                text, rate = make_variant(src.text, rng, vocab)
                copies.append((text, "near", rate))
        for text, kind, rate in copies[: n_generated - len(generated)]:
            doc = Doc(f"bench://dup/{len(generated):06d}", text, f"bench-{kind}")
            generated.append(doc)
            truth.append(
                {
                    "variant_id": doc.id,
                    "source_id": src.id,
                    "kind": kind,
                    "edit_rate": rate,
                    "jaccard": round(jaccard(src.text, text), 4),
                }
            )
    sources.update(d.source for d in generated)
    docs = base + generated
    rng.shuffle(docs)
    ids = [d.id for d in docs]
    if len(set(ids)) != len(ids):
        raise RuntimeError("document ids are not unique")
    return docs, truth, sources


def write_corpus(out: str, n_docs: int = 55_000, seed: int = 0, data: Path = DEFAULT_DATA) -> dict:
    """Build the corpus into ``out`` and return its manifest."""
    if not (data / "text").exists():
        raise FileNotFoundError(f"shared data not found at {data}")
    config = CorpusConfig(docs=n_docs, seed=seed)
    docs, truth, sources = build_documents(data, n_docs, seed)
    per_shard = -(-len(docs) // SHARDS)
    records = []
    for s in range(SHARDS):
        chunk = docs[s * per_shard : (s + 1) * per_shard]
        rows = [
            {"id": d.id, "text": d.text, "url": d.url, "source": d.source, "fetched_at": FETCHED_AT}
            for d in chunk
        ]
        digest = document_id(None, "\n".join(r["id"] for r in rows))
        unit = WorkUnit(name=f"part-{s:05d}", key=unit_key(SPEC, config, digest), source={})

        def make(_: object, rows: list[dict[str, Any]] = rows) -> ShardResult:
            return ShardResult(
                kept=pa.Table.from_pylist(rows, schema=DOCUMENT_SCHEMA),
                rejected=rejected_schema(DOCUMENT_SCHEMA).empty_table(),
                docs_in=len(rows),
            )

        records.append(run_unit(out, unit, make))
    manifest = finalize_stage(out, SPEC, config, records, None)
    truth_dir = Path(out) / "truth"
    truth_dir.mkdir(parents=True, exist_ok=True)
    schema = pa.schema(
        [
            ("variant_id", pa.string()),
            ("source_id", pa.string()),
            ("kind", pa.string()),
            ("edit_rate", pa.float64()),
            ("jaccard", pa.float64()),
        ]
    )
    pq.write_table(
        pa.Table.from_pylist(truth, schema=schema), truth_dir / "truth.parquet", compression="zstd"
    )
    with open(truth_dir / "pairs.jsonl", "w") as f:
        for row in truth:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    (truth_dir / "sources.json").write_text(json.dumps(dict(sorted(sources.items())), indent=2))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write the corpus into")
    parser.add_argument("--docs", type=int, default=55_000, help="documents in all (default 55000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    args = parser.parse_args(argv)
    manifest = write_corpus(args.out, args.docs, args.seed, args.data)
    counts = manifest["counts"]
    sources = json.loads((Path(args.out) / "truth" / "sources.json").read_text())
    print(f"wrote {counts['kept']} documents in {len(manifest['shards'])} shards to {args.out}")
    print("  " + ", ".join(f"{k}: {v}" for k, v in sources.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
