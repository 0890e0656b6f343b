"""Parquet files: one document per row of a string ``text`` column, read batch by batch.

Optional ``url`` and ``fetched_at`` columns are used when present. A file without a string
``text`` column is a configuration error, refused when the crawl is planned
(:func:`check_parquet_schema`) rather than half way through a run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from llmflow.tasks.core.documents import Document
from llmflow.tasks.ingest.readers.common import parse_datetime, rejected, text_document

PARQUET_SUFFIXES = (".parquet",)
_PARQUET_BATCH_ROWS = 1024


def parquet_documents(
    fs: fsspec.AbstractFileSystem, path: str, name: str, max_page_bytes: int
) -> Iterator[Document]:
    source = f"parquet:{name}"
    with fs.open(path, "rb") as f:
        try:
            parquet = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            yield rejected(None, source, None, "malformed_record", f"{path}: {e}")
            return
        schema = parquet.schema_arrow
        text_field = schema.field("text") if "text" in schema.names else None
        if text_field is None or not _is_string_type(text_field.type):
            found = ", ".join(f"{field.name}: {field.type}" for field in schema)
            raise ValueError(f"{path}: needs a string column 'text'; its columns are {found}")
        columns = ["text"] + [c for c in ("url", "fetched_at") if c in schema.names and c != "text"]
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                data = {c: batch.column(c).to_pylist() for c in columns}
                for i in range(batch.num_rows):
                    row += 1
                    yield _parquet_row(data, i, row, source, max_page_bytes)
        except (pa.ArrowException, OSError) as e:
            yield rejected(None, source, None, "malformed_record", f"{path}: after row {row}: {e}")


def _is_string_type(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _parquet_row(
    data: dict[str, list[Any]], i: int, row: int, source: str, max_page_bytes: int
) -> Document:
    url = data["url"][i] if "url" in data and isinstance(data["url"][i], str) else None
    fetched_at = parse_datetime(data["fetched_at"][i]) if "fetched_at" in data else None
    text = data["text"][i]
    if text is None:
        return rejected(url, source, fetched_at, "malformed_record", f"row {row}: text is null")
    return text_document(text, url, source, fetched_at, max_page_bytes, f"row {row}")


def check_parquet_schema(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """A Parquet seed needs a string ``text`` column: checked from its footer when the crawl is
    planned, so a wrong file is refused before any unit runs rather than failing mid-run."""
    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"Parquet seed {path}: not a readable Parquet file ({error})") from error
    text_field = schema.field("text") if "text" in schema.names else None
    if text_field is None or not _is_string_type(text_field.type):
        found = ", ".join(f"{field.name}: {field.type}" for field in schema)
        raise ValueError(f"Parquet seed {path}: needs a string column 'text'; its columns: {found}")
