"""Where the quality classifier's labelled texts come from.

* **Reference against crawl** (DCLM's recipe): the positives are a reference set (the
  conversations shipped with llmflow by default, as DCLM used instruction data; or any path: an
  llmflow dataset folder, instruction files in any shape SFT reads, or documents in any format the
  crawl's file readers read), the negatives a sample of the crawl being curated.
* **User labels**: a file of ``text`` and ``label`` (1 or true: good; 0 or false: not), as JSON
  Lines, CSV or Parquet.

The crawl sample is a bottom-k sample by a hash of each document's id: the same documents
whatever the order or number of shards, and memory bounded by ``k`` texts. Every text is cut to
``max_chars`` as it is read (the classifier reads no further). A record that cannot be used (no
text, an unknown label) is skipped and counted by reason, never silently.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from llmflow.tasks.core import shards
from llmflow.tasks.ingest.embedded_data import INSTRUCTIONS_FILE

__all__ = ["Labelled", "crawl_sample", "reference_texts", "user_labels"]

_TRUE = {"1", "true", "yes", "good", "positive"}
_FALSE = {"0", "false", "no", "bad", "negative"}


@dataclass
class Labelled:
    """Texts of each class, and records skipped by reason."""

    positives: list[str] = field(default_factory=list)
    negatives: list[str] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)

    def digest(self) -> str:
        """A hash of the labelled texts: the model's key depends on exactly what it learned."""
        h = hashlib.sha256()
        for label, texts in ((b"+", self.positives), (b"-", self.negatives)):
            for text in texts:
                h.update(label + text.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()


def _id_rank(doc_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")


def crawl_sample(stage_dir: str, count: int, max_chars: int) -> list[str]:
    """``count`` documents of a dataset, the same ones however it is sharded (bottom-k by a
    hash of the id), in that hash's order."""
    heap: list[tuple[int, str]] = []  # (-rank, text): the k lowest ranks so far
    manifest = shards.read_manifest(stage_dir)
    for shard in shards.manifest_shards(manifest):
        table = shards.read_shard(stage_dir, shard, ["id", "text"])
        for doc_id, text in zip(
            table.column("id").to_pylist(), table.column("text").to_pylist(), strict=True
        ):
            if not text:
                continue
            rank = _id_rank(doc_id)
            if len(heap) < count:
                heapq.heappush(heap, (-rank, text[:max_chars]))
            elif -heap[0][0] > rank:
                heapq.heapreplace(heap, (-rank, text[:max_chars]))
    return [text for _, text in sorted(heap, key=lambda item: -item[0])]


def reference_texts(path: str | None, max_chars: int) -> tuple[list[str], Counter[str]]:
    """The positives of the reference recipe: a dataset's documents, conversations (each as its
    turns' text) or documents read from files; ``None`` is the shipped conversations."""
    from llmflow.tasks.train.sft_data import read_conversations

    source = str(INSTRUCTIONS_FILE) if path is None else path
    if shards.exists(shards.join(source, shards.MANIFEST_NAME)):
        texts = [d["text"][:max_chars] for d in shards.iter_documents(source, ["text"])]
        return [t for t in texts if t], Counter()
    if source.endswith((".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz", ".ndjson")):
        conversations, skipped = read_conversations(source)
        if conversations:
            texts = ["\n\n".join(m["content"] for m in c)[:max_chars] for c in conversations]
            return texts, skipped
    return _file_documents(source, max_chars)


def _file_documents(source: str, max_chars: int) -> tuple[list[str], Counter[str]]:
    """Documents read by the crawl's file readers (text, HTML, JSONL with ``text``, Parquet,
    WARC); rejected records counted by their reason."""
    from llmflow.tasks.core.documents import FetchFailure
    from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
    from llmflow.tasks.ingest.file_sources import expand_file_seed, iter_file_documents

    texts: list[str] = []
    skipped: Counter[str] = Counter()
    with BoundedExtractor(workers=1) as extractor:
        for file in expand_file_seed(source):
            for item in iter_file_documents(file, extractor, max_page_bytes=10_000_000):
                if isinstance(item, FetchFailure):
                    skipped[item.reason] += 1
                elif item.reject_reason or not item.text:
                    skipped[item.reject_reason or "empty"] += 1
                else:
                    texts.append(item.text[:max_chars])
    return texts, skipped


def user_labels(path: str, max_chars: int) -> Labelled:
    """``text`` and ``label`` rows from JSONL, CSV or Parquet (by the file's suffix)."""
    labelled = Labelled()
    for record in _label_records(path):
        if not isinstance(record, dict):
            labelled.skipped["not_an_object"] += 1
            continue
        text, label = record.get("text"), str(record.get("label", "")).strip().lower()
        if not isinstance(text, str) or not text.strip():
            labelled.skipped["no_text"] += 1
        elif label in _TRUE:
            labelled.positives.append(text[:max_chars])
        elif label in _FALSE:
            labelled.negatives.append(text[:max_chars])
        else:
            labelled.skipped["unknown_label"] += 1
    return labelled


def _label_records(path: str) -> Iterator[object]:
    name = path.lower().removesuffix(".gz")
    if name.endswith(".parquet"):
        fs, p = shards.filesystem(path)
        with fs.open(p, "rb") as f:
            table = pq.read_table(f, columns=["text", "label"])
        yield from table.to_pylist()
        return
    data = shards.read_bytes(path)
    if path.lower().endswith(".gz"):
        import gzip

        data = gzip.decompress(data)
    text = data.decode("utf-8", errors="replace")
    if name.endswith(".csv"):
        yield from csv.DictReader(io.StringIO(text, newline=""))
    elif name.endswith((".jsonl", ".ndjson")):
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                yield None
    else:
        raise ValueError(
            f"quality_model labels file {path!r}: not .jsonl, .csv or .parquet (optionally .gz)"
        )
