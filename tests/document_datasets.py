"""Finished document datasets for tests: real Parquet shards and a real manifest, made by the
same stage mechanism as the pipeline's, so a stage under test reads what it reads in a run."""

from __future__ import annotations

import pydoc_data.topics
import random
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from llmflow.tasks.core.documents import Document
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import (
    StageConfig,
    StageSpec,
    WorkUnit,
    run_unit,
    unit_key,
)
from llmflow.tasks.core.unit_output import documents_result

SOURCE = StageSpec(name="source", version="1")
WHEN = datetime(2026, 1, 2, tzinfo=UTC)


def write_documents(directory: str, shards: dict[str, list[Document]]) -> list[str]:
    """One shard per entry (name → documents); returns the documents' ids in order."""
    config = StageConfig()
    ids: list[str] = []
    records = []
    for name, docs in shards.items():
        ids += [d.row()["id"] for d in docs]
        material = f"{name}:{[(d.url, d.text) for d in docs]}"
        unit = WorkUnit(name=name, key=unit_key(SOURCE, config, material), source={})
        records.append(run_unit(directory, unit, lambda _, docs=docs: documents_result(docs)))
    finalize_stage(directory, SOURCE, config, records, None)
    return ids


def write_texts(
    directory: str, texts: Sequence[str | Document], shards: int = 2, first: int = 0
) -> list[str]:
    """Texts (or documents) dealt round-robin into ``shards`` shards; text i gets the url
    ``http://t/<first + i>``. Returns the ids in shard order."""
    docs = [
        t if isinstance(t, Document) else Document(f"http://t/{first + i}", t, "test", WHEN)
        for i, t in enumerate(texts)
    ]
    parts = {f"part-{s:05d}": docs[s::shards] for s in range(shards)}
    return write_documents(directory, parts)


def reference_documents(size: int = 1500) -> list[tuple[str, str]]:
    """The Python language reference that ships with CPython (``pydoc_data.topics``) as
    (url, text) documents of about ``size`` characters: real text that is always at hand."""
    docs = []
    for name, text in sorted(pydoc_data.topics.topics.items()):
        for start in range(0, len(text), size):
            docs.append((f"pydoc-topic://{name}/{start}", text[start : start + size]))
    return docs


def build_token_dirs(root: Path, vocab_size: int = 512) -> tuple[str, str]:
    """(tokenize dir, tokenizer dir) made from :func:`reference_documents` by the real tokenizer
    and tokenize stages, as training reads them in a pipeline run."""
    from llmflow.tasks.train import bpe_tokenizer, tokenize

    source_dir = str(root / "pii")
    docs = [Document(url, text, "test", WHEN) for url, text in reference_documents()]
    write_documents(source_dir, {"part-00000": docs[0::2], "part-00001": docs[1::2]})
    tokenizer_dir = str(root / "tokenizer")
    bpe_tokenizer.train_tokenizer(
        source_dir, tokenizer_dir, bpe_tokenizer.TokenizerConfig(vocab_size=vocab_size), 0.1
    )
    tokens_dir = str(root / "tokenize")
    tok_config = tokenize.TokenizeConfig(val_fraction=0.1)
    units, digest = tokenize.plan_tokenize_units(tok_config, source_dir, tokenizer_dir)
    done = [tokenize.tokenize_shard.fn(u, tok_config, tokens_dir) for u in units]
    tokenize.finish(units, tok_config, tokens_dir, done, digest)
    return tokens_dir, tokenizer_dir


NAV = ["Home", "About", "Contact", "Login", "Register", "Privacy", "Cookies", "Share", "Menu"]
SPAM = ["cheap", "best", "free", "buy", "deal", "casino", "bonus", "win", "sale", "offer"]


def junk_texts(count: int, seed: int) -> list[str]:
    """Navigation and keyword spam, the crawl's commonest junk (a quality classifier's
    negatives)."""
    rng = random.Random(seed)
    return [
        " | ".join(rng.sample(NAV, 5)) + " " + " ".join(rng.choices(SPAM, k=rng.randint(8, 30)))
        for _ in range(count)
    ]


_SUBJECTS = [
    "The farmer",
    "A teacher",
    "My neighbour",
    "The old captain",
    "Her brother",
    "A young doctor",
    "The baker",
    "Our guide",
    "The mayor",
    "A painter",
    "The children",
    "His mother",
]
_VERBS = [
    "walked to",
    "wrote about",
    "remembered",
    "looked after",
    "talked about",
    "visited",
    "painted",
    "cleaned",
    "repaired",
    "described",
    "photographed",
    "planned",
]
_OBJECTS = [
    "the harbour",
    "a small garden",
    "the river bank",
    "an empty house",
    "the market",
    "the school on the hill",
    "a quiet village",
    "the railway station",
    "the museum",
    "the forest",
    "a narrow bridge",
    "the library",
]
_TAILS = [
    "before the rain came",
    "in the early morning",
    "with great care",
    "after a long day",
    "during the summer holidays",
    "while the town was asleep",
    "for the first time",
    "on a cold evening",
    "because it was needed",
    "and then went home",
    "with a few friends",
    "as the sun set",
]


def prose_texts(count: int, seed: int, sentences: int = 12) -> list[str]:
    """Plain English paragraphs of varied sentences that pass the quality rules (the crawl's
    good documents in tests that run every curation stage)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        parts = [
            f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
            f" {rng.choice(_TAILS)}."
            for _ in range(sentences)
        ]
        texts.append(" ".join(parts))
    return texts
