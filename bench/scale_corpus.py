"""A corpus of N generated documents for the growth bench (bench/scale.py), as JSON Lines.

Usage::

    python bench/scale_corpus.py --docs 100000 --out DIR [--seed 0] [--docs-per-file 5000]
        [--layouts files,big]

``DIR/files/part-0000K.jsonl`` (``--docs-per-file`` documents each) and ``DIR/big/corpus.jsonl``
hold the same documents in the same order, so the two layouts of the bench read identical input;
``DIR/<layout>.json`` records the arguments and what was planted. Same arguments, same
bytes. At 1M documents a layout is about 2.3 GB.

Each document is 1 to 3 KB of paragraphs drawn (seeded) from the real text under
``../shared/data/text`` (the Gutenberg books and NLTK corpora, split into paragraphs by
bench/curation_corpus.py's readers), so the curation stages meet real prose, not lorem ipsum. The
documents are distinct by construction (about 5 random paragraphs out of ~45,000), then:

* ``--exact-share`` (2%) are exact copies of an earlier document under another URL, and
  ``--near-share`` (2%) near copies (curation_corpus's ``make_variant``: 2-10% of words edited,
  sometimes restyled or with a boiler-plate line): work for dedup. The originals come from a ring of
  the last 20,000 documents, so copies cross file boundaries while memory stays bounded.
* ``--contact-share`` (5%) get a contact line with an email address and a phone number (valid in
  its numbering plan, US or UK) inserted between two paragraphs: work for pii.

Generation streams: memory is the paragraph pool (~20 MB) and the ring, whatever ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, TextIO

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from curation_corpus import (  # noqa: E402
    DEFAULT_DATA,
    gutenberg_documents,
    make_variant,
    nltk_documents,
)

MIN_DOC_CHARS, MAX_DOC_CHARS = 1_000, 3_000
MIN_PARAGRAPH_CHARS, MAX_PARAGRAPH_CHARS = 80, 2_000
RING = 20_000
LAYOUTS = ("files", "big")
FETCHED_AT = "2026-01-01T00:00:00Z"  # fixed, so the same arguments give the same bytes
FIRST_NAMES = ("anna", "ben", "chloe", "david", "emma", "farid", "grace", "hugo", "ines", "jonas")
LAST_NAMES = ("smith", "garcia", "nguyen", "muller", "rossi", "kowalski", "dubois", "tanaka")
DOMAINS = ("example.com", "mail.example.org", "corp.example.net", "uni.example.edu")
US_AREAS = (212, 213, 303, 312, 404, 415, 512, 617, 702, 206)
CONTACT_TEMPLATES = (
    "For questions contact {name} at {email} or call {phone}.",
    "Contact: {email} | Tel: {phone}",
    "You can reach {name} by email ({email}) or by phone on {phone}.",
    "Send your comments to {email}; phone {phone} (weekdays).",
)


def paragraph_pool(data: Path, seed: int) -> list[str]:
    """Every paragraph of the shared text of a usable size, in a fixed order."""
    pool = [d.text for d in gutenberg_documents(data)]
    pool += [d.text for d in nltk_documents(data, seed)]
    return [p for p in pool if MIN_PARAGRAPH_CHARS <= len(p) <= MAX_PARAGRAPH_CHARS]


def phone_number(rng: random.Random) -> str:
    """A number valid in the US or UK plan (phonenumbers checks validity), in a common form."""
    if rng.random() < 0.6:
        area, exchange, line = rng.choice(US_AREAS), rng.randint(201, 989), rng.randint(0, 9999)
        if exchange % 100 == 11 or exchange == 555:
            exchange += 1
        forms = (f"({area}) {exchange}-{line:04d}", f"+1 {area}-{exchange}-{line:04d}")
        return rng.choice(forms)
    return f"+44 20 7{rng.randint(100, 999)} {rng.randint(1000, 9999)}"


def contact_line(rng: random.Random) -> str:
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    email = f"{first}.{last}{rng.randint(1, 99)}@{rng.choice(DOMAINS)}"
    template = rng.choice(CONTACT_TEMPLATES)
    return template.format(
        name=f"{first.title()} {last.title()}", email=email, phone=phone_number(rng)
    )


def fresh_text(pool: list[str], rng: random.Random) -> str:
    """1-3 KB of random paragraphs: a target size drawn, paragraphs added until it is reached."""
    target = rng.randint(MIN_DOC_CHARS, MAX_DOC_CHARS)
    parts: list[str] = []
    size = 0
    while size < target:
        paragraph = pool[rng.randrange(len(pool))]
        if size + len(paragraph) > MAX_DOC_CHARS:
            if size >= MIN_DOC_CHARS:
                break
            continue
        parts.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(parts)


class LayoutWriter:
    """One layout's files: ``files`` rotates to a new part every ``docs_per_file`` lines."""

    def __init__(self, folder: Path, layout: str, docs_per_file: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("*.jsonl"), folder.with_suffix(".json")]:
            old.unlink(missing_ok=True)
        self.folder, self.layout, self.docs_per_file = folder, layout, docs_per_file
        self.handle: TextIO | None = None

    def write(self, n: int, line: str) -> None:
        if self.handle is None or (self.layout == "files" and n % self.docs_per_file == 0):
            if self.handle is not None:
                self.handle.close()
            name = f"part-{n // self.docs_per_file:05d}" if self.layout == "files" else "corpus"
            # Rotated here and closed in close(): a with-block cannot span the parts.
            self.handle = open(self.folder / f"{name}.jsonl", "w", encoding="utf-8")  # noqa: SIM115
        self.handle.write(line)

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def generate(
    out: Path,
    docs: int,
    seed: int = 0,
    docs_per_file: int = 5_000,
    layouts: tuple[str, ...] = LAYOUTS,
    exact_share: float = 0.02,
    near_share: float = 0.02,
    contact_share: float = 0.05,
    data: Path = DEFAULT_DATA,
) -> dict[str, Any]:
    """Write the corpus into ``out/<layout>/`` for each layout; return what ``<layout>.json``
    (written last, so its presence means the layout is whole) records."""
    unknown = set(layouts) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"layouts {sorted(unknown)}: expected some of {LAYOUTS}")
    started = time.perf_counter()
    rng = random.Random(seed)
    pool = paragraph_pool(data, seed)
    if not pool:
        raise FileNotFoundError(f"no paragraphs found under {data / 'text'}")
    vocab = sorted({w for p in pool[:: max(1, len(pool) // 2000)] for w in p.split()})
    ring: deque[str] = deque(maxlen=RING)
    counts = {"exact": 0, "near": 0, "contact": 0}
    writers = [LayoutWriter(out / layout, layout, docs_per_file) for layout in layouts]
    size = 0
    try:
        for n in range(docs):
            draw = rng.random()
            if ring and draw < exact_share:
                text = ring[rng.randrange(len(ring))]
                counts["exact"] += 1
            elif ring and draw < exact_share + near_share:
                text, _ = make_variant(ring[rng.randrange(len(ring))], rng, vocab)
                counts["near"] += 1
            else:
                text = fresh_text(pool, rng)
            ring.append(text)
            if rng.random() < contact_share:
                paragraphs = text.split("\n\n")
                paragraphs.insert(rng.randint(0, len(paragraphs)), contact_line(rng))
                text = "\n\n".join(paragraphs)
                counts["contact"] += 1
            record = {"url": f"https://scale.example/{seed}/{n}", "fetched_at": FETCHED_AT}
            line = json.dumps(record | {"text": text}, ensure_ascii=False) + "\n"
            size += len(line.encode("utf-8"))
            for writer in writers:
                writer.write(n, line)
    finally:
        for writer in writers:
            writer.close()
    stats = {
        "docs": docs,
        "seed": seed,
        "docs_per_file": docs_per_file,
        "files": -(-docs // docs_per_file),
        "bytes": size,
        "planted": counts,
        "shares": {"exact": exact_share, "near": near_share, "contact": contact_share},
        "paragraphs": len(pool),
        "seconds": round(time.perf_counter() - started, 1),
    }
    for layout in layouts:
        (out / f"{layout}.json").write_text(json.dumps(stats | {"layout": layout}, indent=2))
    return stats


def ensure_corpus(
    out: Path, docs: int, layout: str, seed: int = 0, docs_per_file: int = 5_000
) -> dict[str, Any]:
    """``out/<layout>``'s corpus: reused when its ``<layout>.json`` says it was made with these
    arguments, else generated (that layout only)."""
    recorded = out / f"{layout}.json"
    if recorded.exists():
        stats: dict[str, Any] = json.loads(recorded.read_text())
        if (stats["docs"], stats["seed"], stats["docs_per_file"]) == (docs, seed, docs_per_file):
            return stats
    return generate(out, docs, seed, docs_per_file, (layout,))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory to write the corpus into"
    )
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--docs-per-file", type=int, default=5_000)
    parser.add_argument("--layouts", default="files,big", help="comma-separated: files, big")
    parser.add_argument("--exact-share", type=float, default=0.02)
    parser.add_argument("--near-share", type=float, default=0.02)
    parser.add_argument("--contact-share", type=float, default=0.05)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder")
    args = parser.parse_args(argv)
    stats = generate(
        args.out,
        args.docs,
        args.seed,
        args.docs_per_file,
        tuple(args.layouts.split(",")),
        args.exact_share,
        args.near_share,
        args.contact_share,
        args.data,
    )
    print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
