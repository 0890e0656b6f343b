"""The n-gram index of benchmark items that decontamination checks training text against.

GPT-3's recipe (and lm-evaluation-harness's decontamination): both sides are simplified the same
way (lower case, words of letters and digits only, punctuation and spacing dropped), and a
training text is contaminated by an item when they share one n-gram of ``n`` words (13 by
default). An item is what the evaluator scores: its zero-shot context and its gold answer
(:func:`~llmflow.tasks.evaluate.benchmarks.load_task`), so a page quoting a question with its
answer is caught and one sharing a shorter phrase is not.

An n-gram is a 64-bit hash of its words' 64-bit hashes (a polynomial over them, modulo 2^64),
so the index is two numpy arrays: the sorted n-gram hashes and, for each, the item that has it
first. A lookup is one ``searchsorted`` over a document's n-grams. Two distinct 13-grams share a
hash with probability ~2^-64 per pair; a false match would name its item, for a person to check.
The index is saved as ``.npy`` arrays (loaded with ``allow_pickle=False``) and a JSON list of the
items, named by a digest of the n-gram size and every item's text, so it is built once per
benchmark set.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmflow.tasks.core import shards

DEFAULT_N = 13
INDEX_FORMAT = 1
ITEMS_JSON = "items.json"
_WORD = re.compile(r"[^\W_]+")
_PRIME = np.uint64(0x100000001B3)  # FNV-64's prime: odd, so the polynomial mixes every word


def simplify(text: str) -> list[str]:
    """The words both sides are compared on: lower case, letters and digits only."""
    return _WORD.findall(text.lower())


def _word_hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")


def ngram_hashes(words: list[str], n: int, cache: dict[str, int] | None = None) -> np.ndarray:
    """The 64-bit hash of every run of ``n`` consecutive words (none when fewer words);
    ``cache`` keeps word hashes across calls (the documents of a shard share most words)."""
    if len(words) < n:
        return np.zeros(0, dtype=np.uint64)
    cache = {} if cache is None else cache
    values = np.array([cache.setdefault(w, _word_hash(w)) for w in words], dtype=np.uint64)
    count = len(words) - n + 1
    acc = np.zeros(count, dtype=np.uint64)
    for j in range(n):  # uint64 arithmetic wraps: the polynomial is modulo 2^64
        acc = acc * _PRIME + values[j : j + count]
    return acc


@dataclass(frozen=True)
class Item:
    """A benchmark item as the index knows it: its task, its id and the text checked."""

    task: str
    id: str
    text: str


@dataclass
class BenchmarkIndex:
    """Sorted n-gram hashes of every item and the item (a row of ``items``) each comes from."""

    n: int
    hashes: np.ndarray  # uint64, sorted, unique
    owners: np.ndarray  # int64, the first item with each n-gram
    items: list[tuple[str, str]]  # (task, item id)
    digest: str

    def matches(self, text: str) -> list[tuple[str, str]]:
        """The (task, item id) of every item sharing an n-gram with ``text``, in item order."""
        found = self.matched_rows(ngram_hashes(simplify(text), self.n))
        return [self.items[i] for i in found]

    def matched_rows(self, grams: np.ndarray) -> list[int]:
        if not len(grams) or not len(self.hashes):
            return []
        at = np.searchsorted(self.hashes, grams)
        at[at == len(self.hashes)] = 0
        hit = self.hashes[at] == grams
        return sorted({int(i) for i in self.owners[at[hit]]})

    def save(self, folder: str) -> str:
        """Write the index into ``folder/<digest>/`` (any fsspec root): arrays, then the item
        list last, each atomically, so a folder with ``items.json`` is a whole index."""
        path = shards.join(folder, self.digest[:16])
        for name, array in (("hashes.npy", self.hashes), ("owners.npy", self.owners)):
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            shards.write_bytes_atomic(shards.join(path, name), buffer.getvalue())
        meta = {"format": INDEX_FORMAT, "n": self.n, "digest": self.digest, "items": self.items}
        shards.write_json_atomic(shards.join(path, ITEMS_JSON), meta)
        return path


def items_digest(items: list[Item], n: int) -> str:
    h = hashlib.sha256(f"{INDEX_FORMAT}:{n}\0".encode())
    for item in items:
        h.update(f"{item.task}\0{item.id}\0{item.text}\0".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def build_index(items: Iterable[Item], n: int = DEFAULT_N) -> BenchmarkIndex:
    """The index of ``items``' n-grams; an item shorter than ``n`` words adds none."""
    listed = list(items)
    grams, owners = [], []
    for row, item in enumerate(listed):
        hashes = np.unique(ngram_hashes(simplify(item.text), n))
        grams.append(hashes)
        owners.append(np.full(len(hashes), row, dtype=np.int64))
    all_grams = np.concatenate(grams) if grams else np.zeros(0, dtype=np.uint64)
    all_owners = np.concatenate(owners) if owners else np.zeros(0, dtype=np.int64)
    order = np.lexsort((all_owners, all_grams))  # by hash, then the first item
    all_grams, all_owners = all_grams[order], all_owners[order]
    first = np.ones(len(all_grams), dtype=bool)
    first[1:] = all_grams[1:] != all_grams[:-1]
    return BenchmarkIndex(
        n,
        all_grams[first],
        all_owners[first],
        [(i.task, i.id) for i in listed],
        items_digest(listed, n),
    )


def load_index(path: str) -> BenchmarkIndex:
    """An index saved by :meth:`BenchmarkIndex.save`; a file that is not one is an error."""
    try:
        meta = shards.read_json(shards.join(path, ITEMS_JSON))
        hashes, owners = (
            np.load(io.BytesIO(shards.read_bytes(shards.join(path, name))), allow_pickle=False)
            for name in ("hashes.npy", "owners.npy")
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"benchmark index {path}: unreadable ({error})") from error
    if (
        not isinstance(meta, dict)
        or meta.get("format") != INDEX_FORMAT
        or hashes.dtype != np.uint64
        or owners.dtype != np.int64
        or hashes.shape != owners.shape
        or hashes.ndim != 1
        or (len(owners) and not 0 <= int(owners.min()) <= int(owners.max()) < len(meta["items"]))
    ):
        raise ValueError(f"benchmark index {path}: not an index this version wrote")
    items = [(str(t), str(i)) for t, i in meta["items"]]
    return BenchmarkIndex(int(meta["n"]), hashes, owners, items, str(meta["digest"]))


def benchmark_items(
    tasks: list[str], data_dir: str | Path, limit: int | None = None
) -> Iterator[Item]:
    """Every item the evaluator would score for ``tasks``: its zero-shot context and its gold
    answer (for WinoGrande, the gold option's context and the shared continuation)."""
    from llmflow.tasks.evaluate.benchmarks import load_task
    from llmflow.tasks.evaluate.evaluation import find_benchmark

    for task in tasks:
        data = load_task(task, find_benchmark(task, data_dir), num_fewshot=0, limit=limit)
        for item in data.items:
            if item.contexts is not None:
                text = item.contexts[item.gold] + item.choices[0]
            else:
                text = item.context + item.choices[item.gold]
            yield Item(task, item.id, text)
