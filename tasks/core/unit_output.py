"""A unit's output: kept and rejected rows written as parts of a bounded size, as they come.

A stage's plain function either returns whole tables (a shard in, a shard out: the output is no
bigger than the input) or, for a source stage reading one big file or a long crawl, streams its
rows into a :class:`UnitOutput` as it reads them. Either way the output is cut into parts of at
most ``max_rows`` rows or ``max_bytes`` bytes (Arrow's in-memory size), so memory is bounded by
the part size, not by the input, and every later stage gets one unit of work per part.

Parts are named by the unit: ``<unit>.parquet`` when the unit fits in one (the common case, and
the name a later stage's unit takes), else ``<unit>.00000.parquet``, ``<unit>.00001.parquet``...
in the order the rows came, so concatenating the parts gives the rows in the reader's order and
the ids are the reader's. Rejected rows go the same way to ``rejected/``.

A reader that checkpoints (a long crawl) calls :meth:`UnitOutput.flush` before each checkpoint,
so every row it has read is in a part on disk, and after a restart :meth:`UnitOutput.resume`
with the parts its checkpoint lists: the next part gets the next number.

:func:`documents_result` routes a reader's outcomes (documents, rejections, fetch failures):
into memory for a small source, or into a :class:`UnitOutput` batch by batch for a big one.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from llmflow.tasks.core import shards
from llmflow.tasks.core.documents import (
    DOCUMENT_SCHEMA,
    Document,
    FetchFailure,
    Unchanged,
    rejected_schema,
)

SHARD_SUFFIX = ".parquet"
# Rows of a streamed source turned into one Arrow table at a time (a few MB of text).
_BATCH_ROWS = 1_000


@dataclass
class ShardResult:
    """What a stage's plain function returns for one unit of work.

    ``kept`` and ``rejected`` hold the rows not yet written: all of them for a stage that returns
    whole tables, none for a source that streamed its rows into the unit's :class:`UnitOutput`.
    ``docs_in`` counts every document read either way.
    """

    kept: pa.Table
    rejected: pa.Table
    docs_in: int
    stats: Counter[str] = field(default_factory=Counter)
    failures: list[dict[str, Any]] = field(default_factory=list)


def part_name(unit_name: str, index: int | None) -> str:
    """A part's file name: the unit's own when it is the only one, else numbered."""
    if index is None:
        return f"{unit_name}{SHARD_SUFFIX}"
    return f"{unit_name}.{index:05d}{SHARD_SUFFIX}"


def is_part_of(path: str, unit_name: str) -> bool:
    """Whether a shard path (relative to its stage) is one of the unit's parts."""
    name = path.rsplit("/", 1)[-1]
    return name == f"{unit_name}{SHARD_SUFFIX}" or bool(
        re.fullmatch(re.escape(unit_name) + r"\.\d{5}" + re.escape(SHARD_SUFFIX), name)
    )


class _Parts:
    """One side (kept or rejected) of a unit's output: a buffer cut into parts when full."""

    def __init__(
        self, stage_dir: str, prefix: str, unit_name: str, max_rows: int, max_bytes: int
    ) -> None:
        self.stage_dir, self.prefix, self.unit_name = stage_dir, prefix, unit_name
        self.max_rows, self.max_bytes = max_rows, max_bytes
        self.buffer: list[pa.Table] = []
        self.rows = 0
        self.bytes = 0
        self.written: list[shards.ShardFile] = []
        self.schema: pa.Schema | None = None

    def add(self, table: pa.Table) -> None:
        if self.schema is None:
            self.schema = table.schema
        offset = 0
        while offset < table.num_rows:
            # Cut the table where the part fills up, by rows or (estimated per row) by bytes.
            room = self.max_rows - self.rows
            rest = table.slice(offset)
            if rest.nbytes > 0 and self.max_bytes:
                per_row = rest.nbytes / rest.num_rows
                room = min(room, max(1, int((self.max_bytes - self.bytes) / per_row)))
            piece = rest.slice(0, room)
            self.buffer.append(piece)
            self.rows += piece.num_rows
            self.bytes += piece.nbytes
            offset += piece.num_rows
            if self.rows >= self.max_rows or self.bytes >= self.max_bytes:
                self._write_part()

    def _write_part(self) -> None:
        """The buffer as the next numbered part (nothing when it is empty)."""
        if not self.buffer:
            return
        table = pa.concat_tables(self.buffer)
        self.buffer, self.rows, self.bytes = [], 0, 0
        name = part_name(self.unit_name, len(self.written))
        self.written.append(shards.write_shard(self.stage_dir, self.prefix + name, table))

    def close(self, empty_schema: pa.Schema | None) -> list[shards.ShardFile]:
        """Write what is left: under the unit's own name when nothing was cut before it (an
        empty table when ``empty_schema`` asks for a file even without rows)."""
        if not self.written:
            table = pa.concat_tables(self.buffer) if self.buffer else None
            if table is None and empty_schema is not None:
                table = (self.schema or empty_schema).empty_table()
            self.buffer = []
            if table is not None:
                name = part_name(self.unit_name, None)
                self.written.append(shards.write_shard(self.stage_dir, self.prefix + name, table))
            return self.written
        self._write_part()
        return self.written


class UnitOutput:
    """Where one unit's rows go: kept rows to its parts, rejected rows to ``rejected/``.

    Rows are written as soon as a part fills, so a reader that streams into it holds at most one
    part of each in memory. The kept side always ends with at least one file (an empty shard for
    a unit that kept nothing), so every unit is a shard of the dataset; the rejected side only
    when something was rejected.
    """

    def __init__(
        self,
        stage_dir: str,
        unit_name: str,
        max_rows: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        rows = max_rows or 2**62
        size = max_bytes or 2**62
        self.kept = _Parts(stage_dir, "", unit_name, rows, size)
        self.rejected = _Parts(stage_dir, f"{shards.REJECTED_DIR}/", unit_name, rows, size)
        self.reasons: Counter[str] = Counter()

    def keep(self, table: pa.Table) -> None:
        self.kept.add(table)

    def reject(self, table: pa.Table) -> None:
        """Rejected rows, with their ``reason`` and ``detail`` columns (counted by reason)."""
        self.reasons.update(table.column("reason").to_pylist())
        self.rejected.add(table)

    def flush(self) -> tuple[list[shards.ShardFile], list[shards.ShardFile]]:
        """Write what is buffered as the next numbered parts; (kept parts, rejected parts) so far.

        For a checkpoint: afterwards every row handed in is on disk, in the parts returned."""
        self.kept._write_part()
        self.rejected._write_part()
        return list(self.kept.written), list(self.rejected.written)

    def resume(
        self,
        kept: list[shards.ShardFile],
        rejected: list[shards.ShardFile],
        reasons: dict[str, int],
    ) -> None:
        """Go on after parts an earlier, interrupted run wrote (what :meth:`flush` returned then,
        and the rejection counts): they stay, and the next part gets the next number."""
        self.kept.written = list(kept)
        self.rejected.written = list(rejected)
        self.reasons = Counter(reasons)

    def close(
        self, kept_schema: pa.Schema
    ) -> tuple[list[shards.ShardFile], list[shards.ShardFile]]:
        """Write the last parts; (kept parts, rejected parts)."""
        return self.kept.close(kept_schema), self.rejected.close(None)


def documents_result(
    outcomes: Iterable[Document | FetchFailure | Unchanged],
    output: UnitOutput | None = None,
    kept_ids: set[str] | None = None,
) -> ShardResult:
    """Route a reader's outcomes: documents kept, rejections with reasons, fetch failures listed.

    Used by source stages (crawl), whose input is not a table: every document read counts as one
    in, so nothing is dropped without a trace. With ``output``, rows go there a batch at a time
    (the result's tables are then empty); without, they are returned. Kept documents with an id
    already seen in the unit are counted under ``stats['duplicate_id_in_unit']`` and rejected
    with that reason; pages a refresh found unchanged are counted under
    ``stats['unchanged_<why>']``; documents whose text held a lone UTF-16 surrogate are kept with
    U+FFFD in its place and counted under ``stats['lone_surrogates_replaced']``. ``kept_ids``,
    when given, receives the ids of the documents kept.
    """
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    kept_tables: list[pa.Table] = []
    rejected_tables: list[pa.Table] = []
    failures: list[dict[str, Any]] = []
    seen: set[str] = kept_ids if kept_ids is not None else set()
    stats: Counter[str] = Counter()
    docs_in = 0

    def flush() -> None:
        for rows, schema, send, tables in (
            (kept, DOCUMENT_SCHEMA, output.keep if output else None, kept_tables),
            (
                rejected,
                rejected_schema(DOCUMENT_SCHEMA),
                output.reject if output else None,
                rejected_tables,
            ),
        ):
            if rows:
                table = pa.Table.from_pylist(rows, schema=schema)
                send(table) if send is not None else tables.append(table)
                rows.clear()

    for outcome in outcomes:
        if isinstance(outcome, Unchanged):
            stats[f"unchanged_{outcome.reason}"] += 1
            continue
        if isinstance(outcome, FetchFailure):
            failures.append(outcome.row())
            continue
        docs_in += 1
        if _replace_lone_surrogates(outcome):
            stats["lone_surrogates_replaced"] += 1
        row = outcome.row()
        if outcome.reject_reason is None and row["id"] in seen:
            outcome.reject_reason, outcome.detail = "duplicate_id_in_unit", "same url and text"
            stats["duplicate_id_in_unit"] += 1
        if outcome.reject_reason is None:
            seen.add(row["id"])
            kept.append(row)
        else:
            rejected.append(row | {"reason": outcome.reject_reason, "detail": outcome.detail})
        if len(kept) + len(rejected) >= _BATCH_ROWS:
            flush()
    flush()
    for failure in failures:
        failure["url"], _ = without_lone_surrogates(failure["url"])
        failure["detail"], _ = without_lone_surrogates(failure["detail"])
    failures.sort(key=lambda f: (f["url"], f["reason"]))
    return ShardResult(
        kept=pa.concat_tables(kept_tables) if kept_tables else DOCUMENT_SCHEMA.empty_table(),
        rejected=pa.concat_tables(rejected_tables)
        if rejected_tables
        else rejected_schema(DOCUMENT_SCHEMA).empty_table(),
        docs_in=docs_in,
        stats=stats,
        failures=failures,
    )


def without_lone_surrogates(value: str | None) -> tuple[str | None, bool]:
    """``value`` with every lone UTF-16 surrogate (U+D800-U+DFFF) replaced by U+FFFD.

    JSON escapes such as ``"\\ud800"`` decode to Python strings that no UTF-8 writer (Parquet,
    JSON manifests) accepts; half a pair carries no character, so U+FFFD loses nothing. Returns
    the string and whether anything was replaced; the ASCII check keeps the common case cheap.
    """
    if value is None or value.isascii():
        return value, False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", value), True
    return value, False


_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(document: Document) -> bool:
    """Make a document's strings storable in place; whether any had to change."""
    text, in_text = without_lone_surrogates(document.text)
    url, in_url = without_lone_surrogates(document.url)
    source, in_source = without_lone_surrogates(document.source)
    detail, in_detail = without_lone_surrogates(document.detail)
    document.text, document.url = text or "", url
    document.source, document.detail = source or "", detail or ""
    return in_text or in_url or in_source or in_detail
