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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmflow.tasks.core import shards
from llmflow.tasks.core.progress import StepProgress
from llmflow.tasks.core.stage import StageSpec, WorkUnit, read_unit_input
from llmflow.tasks.core.steps import completed_step, run_step, step_key, step_output_intact
from llmflow.tasks.curate.dedup_index import IndexView, batch_name, index_for, key_array
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
    """(k, 2) positions that share a key: each position paired with the next one of its key."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    same = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
    return np.stack([order[same], order[same + 1]], axis=1)


def _pairs_with_index(run_keys: np.ndarray, index: IndexView, column: str) -> np.ndarray:
    """Node pairs that share a key of ``column``: the run's nodes (0..n_run) with each other and
    with the index rows (node n_run + row) that hold one of the run's keys.

    Keys that no run document has only pair index documents with each other, pairs the resolve
    drops, so only the matching index rows are read in: the pairs are the ones a sort of the
    whole index's column would give (nodes stay in node order within a key).
    """
    n_run = len(run_keys)
    rows, keys = index.matching(column, np.unique(run_keys))
    nodes = np.concatenate([np.arange(n_run, dtype=np.int64), n_run + rows])
    return nodes[_adjacent_equal_pairs(np.concatenate([run_keys, keys]))]


def _estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal MinHash values, row by row (what datasketch's ``MinHash.jaccard`` returns)."""
    return (a == b).mean(axis=1)


def resolve_duplicates(
    units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str, signatures_reused: int = 0
) -> Counter[str]:
    """Step 2: cluster every document of the run (and the index documents that share a key with
    one) and write each shard's decisions, unless the step is done for this run's context (its
    manifest, written last by :func:`~llmflow.tasks.core.steps.run_step`). Memory: a few numpy
    arrays of one entry per run document, one band at a time, plus the index rows that match;
    signatures are read back only for documents that are in a candidate pair."""
    decisions_dir = shards.join(stage_dir, DECISIONS_DIR)
    manifest, _ = run_step(
        decisions_dir,
        RESOLVE_STEP,
        resolve_key(units, config),
        lambda: _resolve(units, config, stage_dir, signatures_reused),
    )
    return Counter(manifest["stats"])


def _index_view(units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str) -> IndexView:
    """The index batches this run is checked against (all but its own), verified."""
    index = index_for(config, stage_dir)
    batches: dict[str, dict[str, Any]] = {}
    if config.incremental and units:
        batches = index.batches_except(config, batch_name(units[0].source["input_digest"]))
    view = index.view(batches)
    view.verify()
    return view


def _resolve(
    units: Sequence[WorkUnit], config: DedupConfig, stage_dir: str, signatures_reused: int
) -> tuple[list[str], dict[str, Any]]:
    """Cluster and write the decisions; their file names and the step manifest's fields.

    Nodes are the run's documents (0..n_run, shard by shard) and then the index's rows (n_run +
    row); only the index rows that share a key with a run document are ever in memory.
    """
    context = units[0].source["context"] if units else ""
    stats: Counter[str] = Counter({"signature_shards_reused": signatures_reused})
    sig_paths = [signatures_path(stage_dir, u.name) for u in units]
    tables = [shards.read_parquet(p, ["order", "exact"]) for p in sig_paths]
    offsets = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])]).astype(np.int64)
    n_run = int(offsets[-1])
    index = _index_view(units, config, stage_dir)
    stats["index_documents"] = index.rows

    order = _concat_np([t.column("order") for t in tables])
    gone = n_run + _withdrawn_rows(units, index)
    stats["index_documents_withdrawn"] = len(gone)
    # A run document whose id an earlier run kept (and this one does not withdraw) stays kept.
    rows, orders = index.matching("order", np.unique(order))
    previously_kept = np.isin(order, orders[~np.isin(n_run + rows, gone)])

    pairs: list[np.ndarray] = [np.zeros((0, 2), dtype=np.int64)]
    if config.exact:
        exact = key_array(pa.chunked_array([t.column("exact") for t in tables], pa.binary(16)))
        pairs.append(_pairs_with_index(exact, index, "exact"))
        del exact
    del tables
    if config.near:
        with StepProgress("dedup-bands", "dedup: LSH bands", config.bands) as progress:
            for b in range(config.bands):
                column = band_column(b)
                keys = _concat_np([shards.read_parquet(p, [column]).column(0) for p in sig_paths])
                pairs.append(_pairs_with_index(keys, index, column))
                progress.advance()
    candidates = np.sort(np.concatenate(pairs), axis=1)
    candidates = candidates[candidates[:, 0] < n_run]  # a pair of index documents: both kept
    candidates = candidates[~np.isin(candidates, gone).any(axis=1)]
    candidates = np.unique(candidates, axis=0)
    stats["candidate_pairs"] = len(candidates)

    involved = np.unique(candidates)  # node numbers, ascending
    store = _NodeStore(offsets, sig_paths, units, index)
    minhash = store.minhash(involved, config.num_perm)
    if config.min_similarity > 0 and len(candidates):
        similarity = _estimated_jaccard(
            minhash[np.searchsorted(involved, candidates[:, 0])],
            minhash[np.searchsorted(involved, candidates[:, 1])],
        )
        keep = similarity >= config.min_similarity
        stats["candidate_pairs_below_min_similarity"] = int((~keep).sum())
        candidates = candidates[keep]

    # Keep order: documents kept by an earlier run first (they are already in the corpus), then
    # the lowest order key; node number breaks ties between copies of the same id. Index nodes
    # in a pair are never withdrawn ones, so all of them were kept.
    in_run = involved < n_run
    kept_before = np.ones(len(involved), dtype=bool)
    kept_before[in_run] = previously_kept[involved[in_run]]
    involved_order = np.empty(len(involved), dtype=np.uint64)
    involved_order[in_run] = order[involved[in_run]]
    if not in_run.all():
        involved_order[~in_run] = store.index_values(involved[~in_run], "order")
    rank = np.empty(len(involved), dtype=np.int64)
    rank[np.lexsort((involved, involved_order, ~kept_before))] = np.arange(len(involved))

    clusters = _UnionFind(rank)
    for a, b in np.searchsorted(involved, candidates).tolist():
        clusters.union(a, b)
    roots = involved[[clusters.find(x) for x in range(len(involved))]]
    removed = (roots != involved) & in_run & ~kept_before
    dup_nodes, dup_roots = involved[removed], roots[removed]
    similarity = _estimated_jaccard(
        minhash[np.searchsorted(involved, dup_nodes)], minhash[np.searchsorted(involved, dup_roots)]
    )
    exact_dup = np.array(store.values(dup_nodes, "exact"), dtype=object) == np.array(
        store.values(dup_roots, "exact"), dtype=object
    )
    root_ids = store.values(dup_roots, "id")
    removed_count = np.bincount(dup_roots[dup_roots < n_run], minlength=n_run)
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


def _withdrawn_rows(units: Sequence[WorkUnit], index: IndexView) -> np.ndarray:
    """Index rows whose documents have since left the dataset (never a keeper)."""
    path = units[0].source.get("withdrawn") if units else None
    if path is None or not index.rows:
        return np.zeros(0, dtype=np.int64)
    withdrawn_ids = shards.read_parquet(path, ["id"]).column("id").combine_chunks()
    if not len(withdrawn_ids):
        return np.zeros(0, dtype=np.int64)
    return index.rows_in("id", withdrawn_ids)


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


def _rows_of(path: str, column: str, rows: np.ndarray) -> pa.Array:
    """``column`` at ``rows`` of a signatures file, read a record batch at a time: the MinHash
    column of a whole shard (50,000 x 128 values) is never in memory at once, only the rows
    asked for (the documents in a candidate pair, a few percent)."""
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    parts, start = [], 0
    fs, local = shards.filesystem(path)
    with fs.open(local, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=4096, columns=[column]):
            stop = start + batch.num_rows
            lo, hi = np.searchsorted(wanted, [start, stop])
            if hi > lo:
                parts.append(batch.column(0).take(pa.array(wanted[lo:hi] - start)))
            start = stop
    return pa.concat_arrays(parts).take(pa.array(np.argsort(order, kind="stable")))


def _select(values: list[str], mask: np.ndarray) -> list[str]:
    return [v for v, m in zip(values, mask.tolist(), strict=True) if m]


def _concat_np(arrays: Iterable[pa.ChunkedArray | pa.Array]) -> np.ndarray:
    """uint64 key columns of the run's shards as one numpy array."""
    parts = [key_array(a) for a in arrays]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)


@dataclass(frozen=True)
class _NodeStore:
    """Where each node's rows live: the run's shards (signatures, input ids), then the index."""

    offsets: np.ndarray
    sig_paths: list[str]
    units: Sequence[WorkUnit]
    index: IndexView

    def _run_values(self, nodes: np.ndarray, column: str) -> pa.Array:
        """``column`` of run nodes, in their order, reading each shard's file at most once."""
        unit_of = np.searchsorted(self.offsets, nodes, side="right") - 1
        parts, positions = [], []
        for u in np.unique(unit_of).tolist():
            mine = np.flatnonzero(unit_of == u)
            rows = nodes[mine] - self.offsets[u]
            if column == "id":
                table = read_unit_input(self.units[u], ["id"])
                parts.append(table.column(column).take(pa.array(rows)))
            else:
                parts.append(_rows_of(self.sig_paths[u], column, rows))
            positions.append(mine)
        taken = pa.chunked_array(parts).combine_chunks()
        return taken.take(pa.array(np.argsort(np.concatenate(positions), kind="stable")))

    def _arrays(self, nodes: np.ndarray, column: str) -> list[tuple[np.ndarray, pa.Array]]:
        """(positions, values) of the run nodes and of the index nodes among ``nodes``."""
        n_run = int(self.offsets[-1])
        out = []
        in_run = np.flatnonzero(nodes < n_run)
        if len(in_run):
            out.append((in_run, self._run_values(nodes[in_run], column)))
        in_index = np.flatnonzero(nodes >= n_run)
        if len(in_index):
            out.append((in_index, self.index.take(nodes[in_index] - n_run, column)))
        return out

    def values(self, nodes: np.ndarray, column: str) -> list[Any]:
        """``column`` ("id" or "exact") of the given nodes, in their order, as Python values."""
        result: list[Any] = [None] * len(nodes)
        for positions, values in self._arrays(nodes, column):
            for p, v in zip(positions.tolist(), values.to_pylist(), strict=True):
                result[p] = v
        return result

    def index_values(self, nodes: np.ndarray, column: str) -> np.ndarray:
        """A uint64 column of index nodes."""
        return key_array(self.index.take(nodes - int(self.offsets[-1]), column))

    def minhash(self, nodes: np.ndarray, num_perm: int) -> np.ndarray:
        """(nodes, num_perm) MinHash values of the given nodes."""
        result = np.zeros((len(nodes), num_perm), dtype=np.uint32)
        for positions, values in self._arrays(nodes, "minhash"):
            flat = values.flatten().to_numpy(zero_copy_only=False)
            result[positions] = flat.reshape(len(positions), num_perm)
        return result


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
