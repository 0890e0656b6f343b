"""Finished document datasets for tests: real Parquet shards and a real manifest, made by the
same stage mechanism as the pipeline's, so a stage under test reads what it reads in a run."""

from __future__ import annotations

from datetime import UTC, datetime

from llmflow.tasks.documents import Document
from llmflow.tasks.stage import (
    StageConfig,
    StageSpec,
    WorkUnit,
    documents_result,
    finalize_stage,
    run_unit,
    unit_key,
)

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
        records.append(run_unit(directory, unit, lambda docs=docs: documents_result(docs)))
    finalize_stage(directory, SOURCE, config, records, None)
    return ids


def write_texts(
    directory: str, texts: list[str | Document], shards: int = 2, first: int = 0
) -> list[str]:
    """Texts (or documents) dealt round-robin into ``shards`` shards; text i gets the url
    ``http://t/<first + i>``. Returns the ids in shard order."""
    docs = [
        t if isinstance(t, Document) else Document(f"http://t/{first + i}", t, "test", WHEN)
        for i, t in enumerate(texts)
    ]
    parts = {f"part-{s:05d}": docs[s::shards] for s in range(shards)}
    return write_documents(directory, parts)
