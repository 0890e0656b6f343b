"""The package builds quietly and whole: every module and data file ends up in the wheel.

`pyproject.toml` lists the packages by hand (the top-level folders install as ``llmflow.*``), so
a new folder left off the list, or a data folder setuptools does not know, shows up here: as a
module missing from the wheel, or as setuptools' "Package would be ignored" warnings (hundreds of
lines at every `make setup`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The folders that install as llmflow.<name> (pyproject.toml's package-dir).
PACKAGE_DIRS = ("flows", "tasks", "models", "deployments")


def _source_files() -> list[Path]:
    """The files the wheel should carry: every file under the package folders but bytecode."""
    return [
        p.relative_to(ROOT)
        for folder in PACKAGE_DIRS
        for p in sorted((ROOT / folder).rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    ]


def test_wheel_builds_without_warnings_and_holds_every_file(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in PACKAGE_DIRS:
        shutil.copytree(
            ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-v"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = built.stdout + built.stderr
    assert built.returncode == 0, log[-3000:]
    assert "would be ignored" not in log, log[log.find("would be ignored") - 1500 :][:3000]
    (wheel,) = (tmp_path / "dist").glob("llmflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = [str(p) for p in _source_files() if f"llmflow/{p.as_posix()}" not in names]
    assert not missing, f"not in the wheel: {missing[:20]}"
