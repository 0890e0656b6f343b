"""decontaminate: take out training text that contains the benchmark items the model is scored on.

A web crawl holds benchmark items: HellaSwag contexts come from ActivityNet and WikiHow, ARC and
MMLU questions sit on quiz sites. A model that trained on an item scores it from memory. As GPT-3
did, a document is contaminated by an item when they share one n-gram of ``n`` words (13) after
the same simplification on both sides (:mod:`~llmflow.tasks.curate.benchmark_ngrams`), and the
items are exactly those the evaluate stage scores: its tasks, from its ``data_dir`` (the shipped
subsets by default), every item of each file.

Every document gets a ``benchmark_items`` column: the ``task/item`` of each item it overlaps (an
empty list for most). With ``mode: reject`` (the default) such a document goes to the rejected set
with reason ``benchmark_overlap`` and a detail naming the items; with ``mode: flag`` it is kept
with its column filled, and the evaluate stage finds the items a model saw through that column
(:func:`contaminated_items`) and scores the clean subset beside all items. The SFT stage runs the
same check on its conversations (:func:`check_conversations`).

The index is built once per benchmark set: it is saved under ``index_dir`` (``benchmark-index/``
in the data root by default) in a folder named by the digest of the n-gram size and every item's
text, and a run with the same items loads it.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import pyarrow as pa
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import Field, field_validator

from llmflow.tasks.core import shards
from llmflow.tasks.core.manifests import finalize_stage
from llmflow.tasks.core.stage import (
    Rejection,
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    plan_shard_units,
    put_column,
    read_unit_input,
    route,
    run_unit,
)
from llmflow.tasks.core.unit_output import ShardResult
from llmflow.tasks.curate.benchmark_ngrams import (
    DEFAULT_N,
    ITEMS_JSON,
    BenchmarkIndex,
    benchmark_items,
    build_index,
    items_digest,
    load_index,
    ngram_hashes,
    simplify,
)
from llmflow.tasks.evaluate.benchmarks import TASKS

STAGE = StageSpec(name="decontaminate", version="1")
REASON = "benchmark_overlap"
INDEX_DIR = "benchmark-index"
ITEMS_FIELD = pa.field("benchmark_items", pa.list_(pa.string()))
_SHOWN = 3  # items named in a rejection's detail


class DecontaminateConfig(StageConfig):
    """Which benchmark items are looked for, how, and what becomes of a document that has one."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset({"index_dir"})

    mode: Literal["reject", "flag"] = Field(
        "reject",
        description=(
            "reject: a document sharing an n-gram with an item goes to the rejected set (reason"
            " benchmark_overlap). flag: it is kept and its benchmark_items column names the"
            " items, so the evaluate stage reports the clean subset beside all items."
        ),
    )
    n: int = Field(
        DEFAULT_N,
        ge=5,
        le=50,
        description=(
            "Words per n-gram (13, as GPT-3 and lm-evaluation-harness). Fewer catches shorter"
            " shared phrases and more common ones; an item shorter than n words is not checked."
        ),
    )
    tasks: list[str] | None = Field(
        None, description="Benchmark tasks whose items are looked for. None: evaluate.tasks."
    )
    data_dir: str | None = Field(
        None,
        description=(
            "Folder of the benchmark files. None: evaluate.data_dir (the shipped subsets when"
            " that is None too)."
        ),
    )
    index_dir: str | None = Field(
        None,
        description=(
            "Where built indexes are kept, one folder per benchmark set. None: benchmark-index/"
            " in the data root, shared by every run there."
        ),
    )
    check_sft: bool = Field(
        True,
        description="Run the same check, in the same mode, on the SFT stage's conversations.",
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str] | None) -> list[str] | None:
        unknown = [t for t in tasks or () if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        return tasks


def with_evaluated_tasks(
    config: DecontaminateConfig, evaluate: Any, index_dir: str
) -> DecontaminateConfig:
    """The config with the evaluate stage's tasks and benchmark folder where it names none, and
    the default index folder: the stage checks exactly what will be scored."""
    update: dict[str, Any] = {}
    if config.tasks is None:
        update["tasks"] = list(evaluate.tasks)
    if config.data_dir is None and evaluate.data_dir is not None:
        update["data_dir"] = evaluate.data_dir
    if config.index_dir is None:
        update["index_dir"] = index_dir
    return config.model_copy(update=update)


# --- the index -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexRef:
    """A saved index: where it is, its digest, and whether this call built it."""

    path: str
    digest: str
    built: bool


def ensure_index(config: DecontaminateConfig) -> IndexRef:
    """The index of the configured tasks' items: loaded from ``index_dir`` when this benchmark
    set was indexed before (the folder is named by the items' digest), else built and saved."""
    from llmflow.tasks.ingest.embedded_data import BENCHMARKS_DIR

    assert config.tasks is not None and config.index_dir is not None, "configure first"
    items = list(benchmark_items(config.tasks, config.data_dir or BENCHMARKS_DIR))
    digest = items_digest(items, config.n)
    path = shards.join(config.index_dir, digest[:16])
    if shards.exists(shards.join(path, ITEMS_JSON)) and cached_index(path).digest == digest:
        return IndexRef(path, digest, built=False)
    saved = build_index(items, config.n).save(config.index_dir)
    cached_index.cache_clear()
    return IndexRef(saved, digest, built=True)


@functools.lru_cache(maxsize=2)
def cached_index(path: str) -> BenchmarkIndex:
    """One load per process of an index folder (every shard of a run checks the same one)."""
    return load_index(path)


def overlaps(texts: Iterable[str | None], index: BenchmarkIndex) -> list[list[str]]:
    """For each text, the ``task/item`` of every item it shares an n-gram with."""
    labels = [f"{task}/{item}" for task, item in index.items]
    words: dict[str, int] = {}  # word hashes, shared by the texts of one call
    found = []
    for text in texts:
        grams = ngram_hashes(simplify(text or ""), index.n, words)
        found.append([labels[row] for row in index.matched_rows(grams)])
        if len(words) > 1_000_000:
            words.clear()
    return found


def overlap_detail(items: list[str], n: int) -> str:
    """A rejection's detail: the first items a document shares an n-gram with, and how many."""
    shown = ", ".join(items[:_SHOWN])
    more = f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return f"shares a {n}-gram with {shown}{more}"


# --- the stage -----------------------------------------------------------------------------------


def decontaminate_documents(table: pa.Table, index: BenchmarkIndex, mode: str) -> ShardResult:
    """Fill every document's ``benchmark_items``; in reject mode, route those with any away."""
    found = overlaps(table.column("text").to_pylist(), index)
    stats: Counter[str] = Counter(documents_with_overlap=0)
    decisions: list[Rejection | None] = []
    for items in found:
        stats["documents_with_overlap"] += bool(items)
        stats.update(f"overlap_documents.{t}" for t in sorted({i.split("/", 1)[0] for i in items}))
        rejected = items and mode == "reject"
        decisions.append(Rejection(REASON, overlap_detail(items, index.n)) if rejected else None)
    table = put_column(table, ITEMS_FIELD, pa.array(found, ITEMS_FIELD.type))
    return route(table, decisions, stats)


@task(name="decontaminate-shard", cache_policy=NO_CACHE, persist_result=False)
def decontaminate_shard(unit: WorkUnit, config: DecontaminateConfig, stage_dir: str) -> UnitRecord:
    index = cached_index(unit.source["index_path"])
    return run_unit(
        stage_dir,
        unit,
        lambda _: decontaminate_documents(read_unit_input(unit), index, config.mode),
    )


def plan_units(config: DecontaminateConfig, input_dir: str) -> tuple[list[WorkUnit], str]:
    """One unit per shard, keyed by the shard and the benchmark set's digest (the index is
    found or built here, once, before any unit runs)."""
    ref = ensure_index(config)
    return plan_shard_units(
        STAGE, config, input_dir, context=ref.digest, source={"index_path": ref.path}
    )


def index_summary(index: BenchmarkIndex, path: str, mode: str) -> dict[str, Any]:
    """What the manifest records of the index: the evaluate stage reads which tasks it covers."""
    per_task = Counter(task for task, _ in index.items)
    return {
        "path": path,
        "digest": index.digest,
        "n": index.n,
        "mode": mode,
        "items": dict(sorted(per_task.items())),
        "ngrams": len(index.hashes),
    }


def finish(
    units: list[WorkUnit],
    config: DecontaminateConfig,
    stage_dir: str,
    records: list[UnitRecord],
    input_digest: str | None,
) -> dict[str, Any]:
    """The manifest, with the index it was checked against (its tasks, items and digest) and
    the run summary's line: documents overlapping each task's items."""
    manifest = finalize_stage(stage_dir, STAGE, config, records, input_digest)
    if units:
        path = units[0].source["index_path"]
        summary = index_summary(cached_index(path), path, config.mode)
        manifest["benchmark_index"] = summary
        prefix = "overlap_documents."
        found = {k.removeprefix(prefix): v for k, v in manifest["stats"].items() if prefix in k}
        overlapping = ", ".join(f"{t} {n}" for t, n in sorted(found.items())) or "none"
        manifest["summary"] = (
            f"{sum(summary['items'].values()):,} items of {len(summary['items'])} tasks"
            f" ({config.n}-grams, {config.mode}); documents overlapping them: {overlapping}"
        )
        shards.write_json_atomic(shards.join(stage_dir, shards.MANIFEST_NAME), manifest)
    return manifest


def items_seen(stage_dir: str, kinds: tuple[str, ...] = ("shards",)) -> Counter[str]:
    """How many documents of a dataset's shards (``kinds`` of its manifest) name each item."""
    manifest = shards.read_manifest(stage_dir)
    counts: Counter[str] = Counter()
    if ITEMS_FIELD.name not in {f["name"] for f in manifest.get("schema", [])}:
        return counts
    for kind in kinds:
        for shard in shards.manifest_shards(manifest, kind):
            column = shards.read_shard(stage_dir, shard, [ITEMS_FIELD.name]).column(0)
            for items in column.to_pylist():
                counts.update(items or ())
    return counts


def report(run: Any, units: list[WorkUnit], config: DecontaminateConfig, stage_dir: str) -> None:
    """Contamination per task in the stage's MLflow run: items indexed, items found in the
    crawl (kept or rejected), and a table of every item found with its document count."""
    if not units:
        return
    manifest = shards.read_manifest(stage_dir)
    summary = manifest.get("benchmark_index", {})
    found = items_seen(stage_dir, ("shards", "rejected_shards"))
    per_task = Counter(item.split("/", 1)[0] for item in found)
    metrics = {f"indexed_items.{t}": float(n) for t, n in summary.get("items", {}).items()}
    metrics |= {f"contaminated_items.{t}": float(per_task.get(t, 0)) for t in summary["items"]}
    run.log(metrics=metrics, tags={"llmflow.benchmark_index": summary.get("digest", "")})
    rows = [{"item": item, "documents": n} for item, n in sorted(found.items())]
    run.log_table(rows, "decontaminate/overlapping_items.json")


# --- what other stages ask -----------------------------------------------------------------------


@dataclass
class Screened:
    """Texts checked against the index: which are kept, and the items those kept still hold
    (flag mode) or how many were removed (reject mode)."""

    keep: list[bool]
    flagged: list[str]
    removed: int
    index_digest: str


def screen_texts(texts: list[str], config: DecontaminateConfig) -> Screened:
    """The stage's check on texts outside the documents (the SFT conversations)."""
    ref = ensure_index(config)
    found = overlaps(texts, cached_index(ref.path))
    if config.mode == "reject":
        keep = [not items for items in found]
        return Screened(keep, [], keep.count(False), ref.digest)
    flagged = sorted({item for items in found for item in items})
    return Screened([True] * len(texts), flagged, 0, ref.digest)


@dataclass
class Contamination:
    """The benchmark items a model's training text held: per task, the ids of items some kept
    document (or conversation) overlaps, and the tasks whose items were looked for at all."""

    checked_tasks: frozenset[str]
    items: dict[str, set[str]]
    index_digest: str

    def add(self, labels: Iterable[str]) -> None:
        for label in labels:
            task_name, _, item = label.partition("/")
            self.items.setdefault(task_name, set()).add(item)


def training_contamination(documents_dir: str) -> Contamination | None:
    """The items the published documents version holds, read from its ``benchmark_items``
    column, and the tasks its decontaminate stage indexed; None when that stage never ran on
    it (no lineage to tell clean items from seen ones)."""
    from llmflow.tasks.core.document_versions import version_name

    if not shards.exists(shards.join(documents_dir, shards.MANIFEST_NAME)):
        return None
    manifest = shards.read_manifest(documents_dir)
    version = manifest.get("version")
    stage_dir = shards.join(documents_dir, version_name(int(version or 0)), STAGE.name)
    if version is None or not shards.exists(shards.join(stage_dir, shards.MANIFEST_NAME)):
        return None
    summary = shards.read_manifest(stage_dir).get("benchmark_index")
    if not summary:
        return None
    found = Contamination(frozenset(summary["items"]), {}, summary["digest"])
    found.add(items_seen(documents_dir))
    return found
