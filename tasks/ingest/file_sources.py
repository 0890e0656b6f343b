"""Documents from file seeds: which files a seed names, and which reader reads each.

A file seed is read, never crawled: the reader is chosen by the file's suffix, and every file is
opened through fsspec, so ``memory://`` and ``s3://`` roots behave like local paths. The readers,
one per format, are in :mod:`llmflow.tasks.ingest.readers`: WARC/ARC/WET archives, plain text,
HTML, JSON Lines and Parquet. Damaged input never stops a reader: it becomes ``malformed_record``
rejections (:mod:`llmflow.tasks.ingest.readers.warc` says what that means for each archive quirk).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from llmflow.tasks.core.documents import Document, FetchFailure
from llmflow.tasks.ingest.bounded_extractor import BoundedExtractor
from llmflow.tasks.ingest.readers.jsonl import JSONL_SUFFIXES, jsonl_documents
from llmflow.tasks.ingest.readers.parquet import (
    PARQUET_SUFFIXES,
    check_parquet_schema,
    parquet_documents,
)
from llmflow.tasks.ingest.readers.text import HTML_SUFFIXES, TEXT_SUFFIXES, whole_file_document
from llmflow.tasks.ingest.readers.warc import (
    ARCHIVE_SUFFIXES,
    DEFAULT_CONTENT_TYPES,
    ArchiveReader,
)

FILE_SUFFIXES: tuple[str, ...] = (
    ARCHIVE_SUFFIXES + TEXT_SUFFIXES + HTML_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
)

_GLOB_CHARS = re.compile(r"[*?\[]")


def is_file_seed(seed: str) -> bool:
    """Whether a seed names files to read rather than a site to crawl (http(s) URLs, 'pydoc:')."""
    s = seed.strip()
    if not s:
        return False
    lowered = s.lower()
    return not lowered.startswith(("http://", "https://", "pydoc:"))


def supported_suffix(path: str) -> str | None:
    """The longest supported suffix of a path, or None (so .warc.wet.gz is not read as .gz)."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    matches = [s for s in FILE_SUFFIXES if name.endswith(s)]
    return max(matches, key=len) if matches else None


def expand_file_seed(seed: str) -> list[str]:
    """Every file a seed names, sorted, as paths or URLs that :func:`iter_file_documents` opens.

    A directory is walked recursively; its unsupported files are skipped, and so are names
    starting with '.' or '_' (hidden or bookkeeping files, as pyarrow.dataset skips them). A glob
    keeps its supported matches. A seed naming nothing raises FileNotFoundError; a seed naming only
    files of other types raises ValueError, since silently reading nothing hides a typo.
    """
    fs, root = url_to_fs(seed.strip())
    if fs.exists(root) and not fs.isdir(root):
        if supported_suffix(root) is None:
            raise ValueError(
                f"file seed {seed!r}: {root!r} is not a supported file type;"
                f" supported suffixes: {', '.join(FILE_SUFFIXES)}"
            )
        if supported_suffix(root) in PARQUET_SUFFIXES:
            check_parquet_schema(fs, root)
        return [_as_url(fs, root)]

    if fs.exists(root):
        found = sorted(_walk(fs, root))
        base = root
    elif _GLOB_CHARS.search(root):
        found = []
        for match in sorted(fs.glob(root)):
            found.extend(sorted(_walk(fs, match)) if fs.isdir(match) else [match])
        base = _GLOB_CHARS.split(root, maxsplit=1)[0].rsplit("/", 1)[0] or "/"
    else:
        raise FileNotFoundError(f"file seed {seed!r} matches no file or directory")

    supported = sorted({p for p in found if supported_suffix(p) is not None})
    if supported:
        for path in supported:
            _check_inside(fs, seed, base, path)
            if supported_suffix(path) in PARQUET_SUFFIXES:
                check_parquet_schema(fs, path)
        return [_as_url(fs, p) for p in supported]
    if not found:
        raise FileNotFoundError(f"file seed {seed!r} matches no file")
    shown = ", ".join(repr(p) for p in found[:5]) + (" ..." if len(found) > 5 else "")
    raise ValueError(
        f"file seed {seed!r} matches no supported file (found {shown});"
        f" supported suffixes: {', '.join(FILE_SUFFIXES)}"
    )


def _check_inside(fs: fsspec.AbstractFileSystem, seed: str, base: str, path: str) -> None:
    """Refuse a file a seed directory reaches through a symbolic link that leads out of it.

    A link in a shared or downloaded folder (``notes -> ~/.ssh/id_rsa``) would otherwise put a
    file the user never named into the shards and MLflow. A file named as a seed of its own is
    the user's explicit choice and is not checked.
    """
    if not isinstance(fs, LocalFileSystem):
        return  # object stores have no symbolic links
    real_base = os.path.realpath(base)
    target = os.path.realpath(path)
    if os.path.commonpath([real_base, target]) != real_base:
        raise ValueError(
            f"file seed {seed!r}: {path} is a symbolic link to {target}, outside {base};"
            " llmflow does not follow links out of a seed directory (copy the file in, or name"
            " it as a seed of its own)"
        )


def _walk(fs: fsspec.AbstractFileSystem, directory: str) -> list[str]:
    base = directory.rstrip("/")
    files = []
    for path in fs.find(base, withdirs=False):
        relative = path[len(base) :].strip("/")
        if not any(part.startswith((".", "_")) for part in relative.split("/")):
            files.append(path)
    return files


def _as_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Local files stay plain paths (readable in logs); other filesystems keep their protocol."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def iter_file_documents(
    path: str,
    extractor: BoundedExtractor,
    max_page_bytes: int,
    content_types: Sequence[str] = DEFAULT_CONTENT_TYPES,
) -> Iterator[Document | FetchFailure]:
    """Every document (kept or rejected) and fetch failure in one file, in file order.

    Damaged input yields ``malformed_record`` rejections, never an exception. A file that cannot
    be opened, or a Parquet file without a ``text`` column (a configuration error), does raise.
    """
    fs, p = url_to_fs(path)
    suffix = supported_suffix(p)
    if suffix is None:
        raise ValueError(
            f"{path!r} is not a supported file type; supported suffixes: {', '.join(FILE_SUFFIXES)}"
        )
    name = p.rsplit("/", 1)[-1]
    if suffix in ARCHIVE_SUFFIXES:
        reader = ArchiveReader(fs, p, name, extractor, max_page_bytes, content_types)
        yield from reader.documents()
    elif suffix in TEXT_SUFFIXES + HTML_SUFFIXES:
        yield whole_file_document(fs, p, suffix, extractor, max_page_bytes)
    elif suffix in JSONL_SUFFIXES:
        yield from jsonl_documents(fs, p, name, max_page_bytes)
    else:
        yield from parquet_documents(fs, p, name, max_page_bytes)
