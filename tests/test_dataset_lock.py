"""One writer per dataset root: a second run refuses at once, naming the first; a killed holder
leaves no lock behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_llmflow

from llmflow.tasks.core.dataset_lock import LOCK_NAME, DatasetBusyError, exclusive_writer


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    root = str(tmp_path / "data")
    with exclusive_writer(root, "flow run first-run"):
        with (
            pytest.raises(DatasetBusyError, match=r"another llmflow run .*first-run"),
            exclusive_writer(root, "flow run second-run"),
        ):
            pass
        holder = json.loads((tmp_path / "data" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid()
    with exclusive_writer(root, "flow run third-run"):  # released at the end of the block
        pass
    with exclusive_writer("memory://no-lock-here", "object store"):  # no flock: not taken
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    root = tmp_path / "data"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from llmflow.tasks.core.dataset_lock import exclusive_writer\n"
            f"with exclusive_writer({str(root)!r}, 'doomed run'):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(600)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(DatasetBusyError, match="doomed run"), exclusive_writer(str(root), "x"):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with exclusive_writer(str(root), "after the crash"):
        pass


@pytest.mark.server
def test_llmflow_run_on_a_busy_workdir_exits_with_the_reason(
    prefect_api: str, tmp_path: Path
) -> None:
    workdir = tmp_path / "work"
    (tmp_path / "note.txt").write_text("A note.\n")
    with exclusive_writer(str(workdir / "data"), "flow run busy-refresh"):
        started = time.monotonic()
        seeds = json.dumps([str(tmp_path / "note.txt")])
        args = ["--workdir", str(workdir), "--stages", "crawl", "--set", f"crawl.seeds={seeds}"]
        result = run_llmflow(args, prefect_api, returncode=3, timeout=300)
    assert "being written by another llmflow run" in result.stderr
    assert "busy-refresh" in result.stderr
    assert not (workdir / "data" / "documents").exists()  # refused before writing anything
    assert time.monotonic() - started < 120


def test_temporary_files_of_killed_writers_are_swept_by_the_next_holder(tmp_path: Path) -> None:
    """A writer SIGKILLed between its write and its rename leaves a *.tmp-<uuid> file (or a
    checkpoint's temporary folder); the next run, holding the lock, removes them."""
    root = tmp_path / "data"
    code = (
        "import os, uuid\n"
        "from pathlib import Path\n"
        "from llmflow.tasks.core import shards\n"
        "shards.write_bytes_atomic(os.environ['ROOT'] + '/stage/kept.parquet', b'kept')\n"
        "Path(os.environ['ROOT'], 'stage', f'part.parquet.tmp-{uuid.uuid4().hex}')"
        ".write_bytes(b'half')\n"
        "ckpt = Path(os.environ['ROOT'], 'pretrain', f'.step-000010.tmp-{uuid.uuid4().hex}')\n"
        "ckpt.mkdir(parents=True); (ckpt / 'model.pt').write_bytes(b'half')\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, "-c", code], env=os.environ | {"ROOT": str(root)})
    left = sorted(p.name for p in root.rglob("*.tmp-*"))
    assert len(left) == 2, left
    (root / "stage" / "notes.tmp-mine").write_text("not ours: no uuid")
    with exclusive_writer(str(root), "next run"):
        assert sorted(p.name for p in root.rglob("*.tmp-*")) == ["notes.tmp-mine"]
        assert (root / "stage" / "kept.parquet").read_bytes() == b"kept"
