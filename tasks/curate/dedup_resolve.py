"""dedup step 2, resolve: the one global step, which decides which copy of each duplicate stays.

Candidate pairs are documents that share an exact hash or any LSH band key, found by sorting one
band column at a time, never by holding an LSH table of Python objects, so memory stays a few
numpy arrays of one entry per document. Pairs are joined into clusters with union-find. Each
cluster keeps one document, chosen by an order that depends only on the documents (documents
already kept by an earlier run first, then the lowest hash of the id), so the same input gives the
same kept ids whatever the shard order or worker count. Decisions go to
``<stage>/_decisions/<shard>.parquet``; the step's manifest (``_decisions/manifest.json``, the
one-step stages' :mod:`~llmflow.tasks.core.steps` manifest) is written last, keyed by the run's
context (the input, the index and the withdrawn ids) and declaring those files. A re-run with the
same context finds the resolve done and skips it; the apply step and the index update read the
decisions back through :func:`read_decisions`, which refuses files of another context.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llmflow.tasks.core import shards
from llmflow.tasks.core.progress import StepProgress
from llmflow.tasks.core.stage import StageSpec, WorkUnit, read_unit_input
from llmflow.tasks.core.steps import completed_step, run_step, step_key, step_output_intact
from llmflow.tasks.curate.dedup_index import DedupIndex, batch_name, index_for
from llmflow.tasks.curate.dedup_minhash import band_column, signatures_path

if TYPE_CHECKING:
    # The config belongs to the stage (flows build it); this module only reads its fields.
    from llmflow.tasks.curate.dedup import DedupConfig

DECISIONS_DIR = "_decisions"
# The resolve step's identity: its key is the stage's key over the run's context.
RESOLVE_STEP = StageSpec("dedup-resolve", "1")
REASON_EXACT = "exact_duplicate"
REASON_NEAR = "near_duplicate"


class _UnionFind:
    """Union-find over node numbers whose root is always the cluster's highest-priority node."""

    def __init__(self, rank: np.ndarray) -> None:
        self.parent = np.arange(len(rank), dtype=np.int64)
        self.rank = rank

    def find(self, x: int) -> int:
        parent = self.parent
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.rank[ra] < self.rank[rb]:
            self.parent[rb] = ra
        else:
            self.parent[ra] = rb


def _adjacent_equal_pairs(keys: np.ndarray) -> np.ndarray:
    """(k, 2) node pairs that share a key: each node paired with the next one of its key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    return np.stack([order[same], order[same + 1]], axis=1)


def _estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values, row by row (what datasketch's ``MinHash.jaccard`` returns)."""
    return (a == b).mean(axis=1)


def resolve_duplicates(
    units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str, signatures_reused: int = 0
) -> Counter[str]:
    """Step 2: cluster every document of the run (and the index it is checked against) and write
    each shard's decisions, unless the step is done for this run's context (its manifest, written
    last by :func:`~llmflow.tasks.core.steps.run_step`). Memory: a few numpy arrays of one entry
    per document, one band at a time; signatures are read back only for documents that are in a
    candidate pair."""
    decisions_dir = shards.join(stage_dir, DECISIONS_DIR)
    manifest, _ = run_step(
        decisions_dir,
        RESOLVE_STEP,
        resolve_key(units, config),
        lambda: _resolve(units, config, stage_dir, signatures_reused),
    )
    return Counter(manifest["stats"])


def _resolve(
    units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str, signatures_reused: int
) -> tuple[list[str], dict[str, Any]]:
    """Cluster and write the decisions; their file names and the step manifest's fields."""
    context = units[0].source["context"] if units else ""
    stats: Counter[str] = Counter({"signature_shards_reused": signatures_reused})
    sig_paths = [signatures_path(stage_dir, u.name) for u in units]
    tables = [shards.read_parquet(p, ["order", "exact"]) for p in sig_paths]
    sizes = [t.num_rows for t in tables]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_run = int(offsets[-1])

    index = index_for(config, stage_dir)
    batches: dict[str, dict[str, Any]] = {}
    if config.incremental and units:
        batches = index.batches_except(config, batch_name(units[0].source["input_digest"]))
    index_tables = [index.read_batch(b, ["order", "exact"]) for b in batches]
    index_sizes = [t.num_rows for t in index_tables]

    order = _concat_np([t.column("order") for t in tables + index_tables], np.uint64)
    n_nodes = len(order)
    is_index = np.zeros(n_nodes, dtype=bool)
    is_index[n_run:] = True
    gone = _withdrawn_nodes(units, index, list(batches), n_run, n_nodes)
    stats["index_documents_withdrawn"] = int(gone.sum())
    # Documents kept by an earlier run come first (they are already in the corpus), then the
    # lowest order key; node number breaks ties between copies of the same id.
    previously_kept = is_index & ~gone
    if n_nodes > n_run:
        previously_kept[:n_run] = np.isin(order[:n_run], order[n_run:][~gone[n_run:]])
    rank = np.empty(n_nodes, dtype=np.int64)
    rank[np.lexsort((np.arange(n_nodes), order, ~previously_kept))] = np.arange(n_nodes)
    stats["index_documents"] = n_nodes - n_run

    pairs: list[np.ndarray] = []
    if config.exact:
        exact = _concat_exact([t.column("exact") for t in tables + index_tables])
        pairs.append(_adjacent_equal_pairs(exact))
        del exact
    del tables, index_tables
    if config.near:
        with StepProgress("dedup-bands", "dedup: LSH bands", config.bands) as progress:
            for b in range(config.bands):
                column = band_column(b)
                keys = _concat_np(
                    [shards.read_parquet(p, [column]).column(0) for p in sig_paths]
                    + [index.read_batch(name, [column]).column(0) for name in batches],
                    np.uint64,
                )
                pairs.append(_adjacent_equal_pairs(keys))
                progress.advance()
    candidates = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
    candidates = np.sort(candidates, axis=1)
    candidates = candidates[~(is_index[candidates[:, 0]] & is_index[candidates[:, 1]])]
    candidates = candidates[~(gone[candidates[:, 0]] | gone[candidates[:, 1]])]
    candidates = np.unique(candidates, axis=0)
    stats["candidate_pairs"] = len(candidates)

    involved = np.unique(candidates)
    store = _NodeStore(offsets, sig_paths, units, index, list(batches), index_sizes)
    minhash = np.array(store.values(involved, "minhash"), dtype=np.uint32)
    minhash = minhash.reshape(-1, config.num_perm)
    if config.min_similarity > 0 and len(candidates):
        similarity = _estimated_jaccard(
            minhash[np.searchsorted(involved, candidates[:, 0])],
            minhash[np.searchsorted(involved, candidates[:, 1])],
        )
        keep = similarity >= config.min_similarity
        stats["candidate_pairs_below_min_similarity"] = int((~keep).sum())
        candidates = candidates[keep]

    clusters = _UnionFind(rank)
    for a, b in candidates.tolist():
        clusters.union(a, b)
    roots = np.array([clusters.find(int(x)) for x in involved], dtype=np.int64)
    removed = (roots != involved) & (involved < n_run) & ~previously_kept[involved]
    dup_nodes, dup_roots = involved[removed], roots[removed]
    similarity = _estimated_jaccard(
        minhash[np.searchsorted(involved, dup_nodes)], minhash[np.searchsorted(involved, dup_roots)]
    )
    exact_dup = np.array(store.values(dup_nodes, "exact"), dtype=object) == np.array(
        store.values(dup_roots, "exact"), dtype=object
    )
    root_ids = store.values(dup_roots, "id")
    removed_count = np.bincount(dup_roots, minlength=n_nodes)
    stats["clusters"] = int(len(np.unique(dup_roots)))

    for u, unit in enumerate(units):
        lo, hi = offsets[u], offsets[u + 1]
        mine = (dup_nodes >= lo) & (dup_nodes < hi)
        rows = dup_nodes[mine] - lo
        reason: list[str | None] = [None] * (hi - lo)
        dup_of: list[str | None] = [None] * (hi - lo)
        sim: list[float | None] = [None] * (hi - lo)
        for row, is_exact, root_id, s in zip(
            rows.tolist(),
            exact_dup[mine].tolist(),
            _select(root_ids, mine),
            similarity[mine],
            strict=True,
        ):
            reason[row] = REASON_EXACT if is_exact else REASON_NEAR
            dup_of[row] = root_id
            sim[row] = round(float(s), 4)
        decisions = pa.table(
            {
                "reason": pa.array(reason, pa.string()),
                "duplicate_of": pa.array(dup_of, pa.string()),
                "duplicate_similarity": pa.array(sim, pa.float32()),
                "duplicates_removed": pa.array(removed_count[lo:hi].astype(np.int32)),
            }
        )
        shards.write_shard(stage_dir, f"{DECISIONS_DIR}/{unit.name}.parquet", decisions)
    outputs = [f"{unit.name}.parquet" for unit in units]
    return outputs, {"context": context, "stats": dict(sorted(stats.items()))}


def _withdrawn_nodes(
    units: Sequence[WorkUnit], index: DedupIndex, batches: list[str], n_run: int, n_nodes: int
) -> np.ndarray:
    """Which nodes are index documents that have since left the dataset (never a keeper)."""
    gone = np.zeros(n_nodes, dtype=bool)
    path = units[0].source.get("withdrawn") if units else None
    if path is None or not batches:
        return gone
    withdrawn_ids = shards.read_parquet(path, ["id"]).column("id")
    if len(withdrawn_ids):
        ids = pa.concat_arrays(
            [index.read_batch(b, ["id"]).column("id").combine_chunks() for b in batches]
        )
        member = pc.is_in(ids, value_set=withdrawn_ids.combine_chunks())
        gone[n_run:] = member.to_numpy(zero_copy_only=False)
    return gone


def resolve_key(units: Sequence[WorkUnit], config: DedupConfig) -> str:
    """The resolve step's key: the run's context (every input shard, the index batches it is
    checked against, the withdrawn ids) under the stage's config."""
    context = units[0].source["context"] if units else ""
    return step_key(RESOLVE_STEP, config, {"context": context})


def resolve_stats(units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str) -> dict[str, int]:
    """The counts of the resolve step that made the current decisions (for the manifest)."""
    if not units:
        return {}
    done = completed_step(shards.join(stage_dir, DECISIONS_DIR), resolve_key(units, config))
    if done is None:
        return {}
    return {f"resolve_{k}": v for k, v in done["stats"].items()}


def _select(values: list[str], mask: np.ndarray) -> list[str]:
    return [v for v, m in zip(values, mask.tolist(), strict=True) if m]


def _concat_np(arrays: Iterable[pa.ChunkedArray | pa.Array], dtype: type) -> np.ndarray:
    parts: list[np.ndarray] = [np.asarray(a.to_numpy(), dtype=dtype) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _concat_exact(arrays: Iterable[pa.ChunkedArray]) -> np.ndarray:
    """16-byte exact keys as one numpy void array (sortable, comparable)."""
    parts = []
    for a in arrays:
        combined = a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a
        raw = np.frombuffer(combined.buffers()[1], dtype="V16", count=len(combined), offset=0)
        parts.append(raw[combined.offset : combined.offset + len(combined)])
    return np.concatenate(parts) if parts else np.zeros(0, dtype="V16")


def _locate(nodes: np.ndarray, offsets: np.ndarray, index_sizes: list[int]) -> list[tuple]:
    """Node number → ("run", unit number, row) or ("index", batch number, row)."""
    n_run = int(offsets[-1])
    index_offsets = np.concatenate([[n_run], n_run + np.cumsum(index_sizes)]).astype(np.int64)
    out = []
    for node in nodes.tolist():
        if node < n_run:
            u = int(np.searchsorted(offsets, node, side="right") - 1)
            out.append(("run", u, node - int(offsets[u])))
        else:
            b = int(np.searchsorted(index_offsets, node, side="right") - 1)
            out.append(("index", b, node - int(index_offsets[b])))
    return out


def _gather(
    nodes: np.ndarray,
    offsets: np.ndarray,
    read_run: Callable[[int], pa.Table],
    read_index: Callable[[int], pa.Table],
    index_sizes: list[int],
    column: str,
) -> list[Any]:
    """Values of ``column`` for the given nodes, reading each file at most once."""
    located = _locate(nodes, offsets, index_sizes)
    wanted: dict[tuple[str, int], list[int]] = {}
    for kind, f, row in located:
        wanted.setdefault((kind, f), []).append(row)
    values: dict[tuple[str, int, int], Any] = {}
    for (kind, f), rows in wanted.items():
        table = read_run(f) if kind == "run" else read_index(f)
        taken = table.column(column).take(pa.array(rows)).to_pylist()
        values.update({(kind, f, r): v for r, v in zip(rows, taken, strict=True)})
    return [values[loc] for loc in located]


@dataclass(frozen=True)
class _NodeStore:
    """Where each node's rows live: the run's shards (signatures, input ids), then index batches."""

    offsets: np.ndarray
    sig_paths: list[str]
    units: Sequence[WorkUnit]
    index: DedupIndex
    batch_names: list[str]
    index_sizes: list[int]

    def values(self, nodes: np.ndarray, column: str) -> list[Any]:
        """``column`` ("id" or a signature column) of the given nodes, in their order."""

        def run(u: int) -> pa.Table:
            if column == "id":
                return read_unit_input(self.units[u], ["id"])
            return shards.read_parquet(self.sig_paths[u], [column])

        def indexed(b: int) -> pa.Table:
            return self.index.read_batch(self.batch_names[b], [column])

        return _gather(nodes, self.offsets, run, indexed, self.index_sizes, column)


def read_decisions(unit: WorkUnit, config: DedupConfig, stage_dir: str) -> pa.Table:
    """One shard's decisions, refused unless this run's resolve wrote them (its step manifest
    has this run's key and the file is the one it declared)."""
    decisions_dir = shards.join(stage_dir, DECISIONS_DIR)
    key = step_key(RESOLVE_STEP, config, {"context": unit.source["context"]})
    if not step_output_intact(decisions_dir, key, f"{unit.name}.parquet"):
        raise RuntimeError(
            f"dedup decisions for {unit.name} belong to another run; resolve must run first"
        )
    return shards.read_parquet(shards.join(decisions_dir, f"{unit.name}.parquet"), None)
