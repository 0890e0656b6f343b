"""Datasets on disk: Parquet shards, a rejected set and a manifest, under any fsspec root.

Layout of one stage's dataset::

    <root>/<stage>/part-00000.parquet           kept documents
    <root>/<stage>/rejected/part-00000.parquet  removed documents, with `reason` and `detail`
    <root>/<stage>/_done/part-00000.json        completion marker of one unit of work
    <root>/<stage>/manifest.json                shards, rows, bytes, hashes, schema, config, counts

Every file is written under a temporary name and renamed into place, so a reader never sees half a
shard and an interrupted run leaves either the old file or the new one. The manifest holds no
timestamps: the same work gives a byte-identical manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

MANIFEST_NAME = "manifest.json"
REJECTED_DIR = "rejected"
DONE_DIR = "_done"
MANIFEST_FORMAT = 1


def join(root: str, *parts: str) -> str:
    """Join path parts under an fsspec root (a local path or a URL such as s3://bucket/x)."""
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    return url_to_fs(path)


def is_local(path: str) -> bool:
    """Whether ``path`` is on the local (or a mounted) filesystem rather than an object store."""
    fs, _ = filesystem(path)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols


def local_path(path: str, why: str) -> Path:
    """``path`` as a local filesystem path, or an error saying ``why`` it has to be one (the
    trainer memory-maps tokens and writes checkpoints with torch.save)."""
    fs, p = filesystem(path)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if not is_local(path):
        raise ValueError(
            f"{path} is not on a local filesystem ({protocols[0]}://): {why}; copy it to local"
            " (or mounted) storage, or set data_root to a local path"
        )
    return Path(p)


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.exists(p)


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write to a temporary sibling, then rename: readers see the old file or the new one."""
    fs, p = filesystem(path)
    parent = p.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{p}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, p)


def read_bytes(path: str) -> bytes:
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return f.read()


def file_sha256(path: str, chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file of any size, read in chunks (token shards can be many GB)."""
    fs, p = filesystem(path)
    digest = hashlib.sha256()
    with fs.open(p, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str, obj: Any) -> None:
    """Sorted keys and a trailing newline, so equal content gives equal bytes."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json(path: str) -> Any:
    return json.loads(read_bytes(path))


def remove(path: str) -> None:
    fs, p = filesystem(path)
    if fs.exists(p):
        fs.rm(p)


def list_names(directory: str, suffix: str) -> list[str]:
    """File names (not paths) in a directory that end with suffix; empty if it does not exist."""
    fs, p = filesystem(directory)
    if not fs.exists(p):
        return []
    names = [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(p, detail=False)]
    return sorted(n for n in names if n.endswith(suffix))


@dataclass(frozen=True)
class ShardFile:
    """One Parquet file of a dataset as the manifest lists it; ``path`` is relative to the stage."""

    path: str
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShardFile:
        return cls(path=d["path"], rows=int(d["rows"]), bytes=int(d["bytes"]), sha256=d["sha256"])


def write_shard(
    stage_dir: str, relative_path: str, table: pa.Table, keep_identical: bool = False
) -> ShardFile:
    """Write one table as a Parquet shard, atomically, and describe it for the manifest.

    The file is built in memory first: its hash is then known before it lands, and a shard is a
    few tens of MB at most (the stage decides how much goes into one). ``keep_identical`` leaves
    a file that already holds these bytes untouched (for files rewritten on every run, so that a
    run with nothing to do touches nothing).
    """
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd", row_group_size=10_000)
    data = buffer.getvalue()
    path = join(stage_dir, relative_path)
    if not (keep_identical and exists(path) and read_bytes(path) == data):
        write_bytes_atomic(path, data)
    return ShardFile(
        path=relative_path,
        rows=table.num_rows,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )


class CorruptShardError(ValueError):
    """A shard whose bytes are not the ones its manifest or marker recorded (a flipped bit, a
    truncated copy, a file replaced by hand), or that does not decode; the message names the
    file and what to do."""


def read_shard(stage_dir: str, shard: ShardFile, columns: list[str] | None = None) -> pa.Table:
    """A shard a manifest lists, after checking its bytes against the recorded size and sha256.

    Whole shards are read anyway (a few tens of MB; see :func:`write_shard`), so hashing them
    costs one pass over bytes already in memory and catches corruption before its text travels
    on into later stages, instead of a decoder error naming no file (or no error at all).
    """
    path = join(stage_dir, shard.path)
    data = read_bytes(path)
    _check_bytes(path, shard, len(data), hashlib.sha256(data).hexdigest())
    return _decode_parquet(path, data, columns)


def verify_shard(stage_dir: str, shard: ShardFile) -> None:
    """:func:`read_shard`'s check, streamed: for a reader that then reads a column at a time
    (the dedup index), so the whole file never sits in memory."""
    path = join(stage_dir, shard.path)
    fs, p = filesystem(path)
    _check_bytes(path, shard, int(fs.size(p)), file_sha256(path))


def _check_bytes(path: str, shard: ShardFile, size: int, digest: str) -> None:
    if size != shard.bytes or digest != shard.sha256:
        raise CorruptShardError(
            f"{path} is corrupt: {size} bytes with sha256 {digest[:16]}…, but its manifest"
            f" recorded {shard.bytes} bytes with sha256 {shard.sha256[:16]}…. Delete the file"
            " and run the stage that wrote it again: that stage redoes the missing shard"
        )


def read_parquet(path: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file by its full path (a derived table that no manifest lists); only the
    ``columns`` asked for are read from storage."""
    fs, p = filesystem(path)
    try:
        with fs.open(p, "rb") as f:
            return pq.read_table(f, columns=columns)
    except (pa.ArrowException, OSError) as error:
        if not fs.exists(p):
            raise
        raise _unreadable(path, error) from error


def _decode_parquet(path: str, data: bytes, columns: list[str] | None) -> pa.Table:
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise _unreadable(path, error) from error


def _unreadable(path: str, error: Exception) -> CorruptShardError:
    return CorruptShardError(
        f"{path} is not a readable Parquet file ({error}). Delete it and run the stage that"
        " wrote it again"
    )


def schema_description(schema: pa.Schema) -> list[dict[str, str]]:
    """The schema as plain JSON (name and Arrow type per column) for the manifest."""
    return [{"name": f.name, "type": str(f.type)} for f in schema]


def read_manifest(stage_dir: str) -> dict[str, Any]:
    """Read a stage's manifest, or say clearly that the stage has not produced one."""
    path = join(stage_dir, MANIFEST_NAME)
    if not exists(path):
        raise FileNotFoundError(
            f"no dataset at {stage_dir}: {MANIFEST_NAME} is missing (has its stage run?)"
        )
    manifest = read_json(path)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{path}: manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"
        )
    return manifest


def manifest_shards(manifest: dict[str, Any], kind: str = "shards") -> list[ShardFile]:
    return [ShardFile.from_dict(d) for d in manifest[kind]]


def iter_documents(stage_dir: str, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Every kept document of a dataset as a dict, shard by shard (for tests and inspection)."""
    manifest = read_manifest(stage_dir)
    for shard in manifest_shards(manifest):
        yield from read_shard(stage_dir, shard, columns).to_pylist()


def manifest_sha256(stage_dir: str) -> str:
    """The digest that names a dataset version: the hash of its manifest's bytes."""
    data = read_bytes(join(stage_dir, MANIFEST_NAME))
    return hashlib.sha256(data).hexdigest()
