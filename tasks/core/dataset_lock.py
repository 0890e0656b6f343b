"""One writer per dataset root: a second pipeline run on the same data refuses at once.

Two runs writing the same stages at the same time (two refreshes, a refresh and a manual run)
would each resume the other's half-written units and race on the manifests. The lock is an
``flock`` on ``<data_root>/.llmflow.lock``, held for the whole flow run: the operating system
releases it when the holder exits for any reason (SIGKILL included), so a crash never leaves a
stale lock behind, and it works the same for ``llmflow run``, a served deployment or a worker.
The file names the holder, so the refusal can say who it is. This is the one mechanism: a
scheduled refresh that finds the previous one still running fails at once with this message.
Object-store roots (``s3://``…) have no ``flock``; there the lock is not taken (README says so).

Holding the lock also makes it safe to sweep what killed writers left: every atomic write goes
through a ``*.tmp-<uuid>`` sibling, and a writer killed between the write and the rename leaves
that file (or a checkpoint's temporary folder) behind. With the lock held nobody else can be
writing one, so the new holder removes them.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmflow.tasks.core import shards

LOCK_NAME = ".llmflow.lock"
# What shards.write_bytes_atomic and checkpoints.save_checkpoint name their temporary files.
_TEMPORARY = re.compile(r"\.tmp-[0-9a-f]{32}$")
logger = logging.getLogger(__name__)


class DatasetBusyError(RuntimeError):
    """Another run holds the dataset root's lock."""


@contextmanager
def exclusive_writer(data_root: str, holder: str) -> Iterator[None]:
    """Hold ``data_root``'s lock for the block, or raise :class:`DatasetBusyError` naming the
    run that holds it. ``holder`` describes this run (a flow-run name) for the next one."""
    if not shards.is_local(data_root):
        yield
        return
    root = Path(data_root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            current = path.read_text() or "{}"
            raise DatasetBusyError(
                f"{data_root} is being written by another llmflow run ({current.strip()});"
                " wait for it to finish, or give this run another workdir/data_root"
            ) from None
        record = {
            "holder": holder,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        sweep_temporary_files(root)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def sweep_temporary_files(root: Path) -> int:
    """Remove the ``*.tmp-<uuid>`` files and folders under ``root`` that killed writers left.

    Only call it while holding ``root``'s lock (:func:`exclusive_writer` does): a live writer's
    temporary file would otherwise vanish under it. Returns how many were removed.
    """
    removed = 0
    for directory, subdirs, files in os.walk(root):
        for name in [d for d in subdirs if _TEMPORARY.search(d)]:
            shutil.rmtree(Path(directory) / name, ignore_errors=True)
            subdirs.remove(name)
            removed += 1
        for name in files:
            if _TEMPORARY.search(name):
                (Path(directory) / name).unlink(missing_ok=True)
                removed += 1
    if removed:
        logger.warning("removed %d temporary files left by killed writers under %s", removed, root)
    return removed
