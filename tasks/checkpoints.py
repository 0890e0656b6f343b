"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``step-000100/`` holding ``model.pt`` (weights), ``optimizer.pt`` and
``trainer.pt`` (scheduler, step, data position, every rank's RNG states) plus ``decoder.json`` (the
model's shape, so weights can be loaded without the run's config). It is written under a temporary
name and renamed into place, and ``latest.json`` is replaced atomically after it: a run killed
mid-write leaves the previous checkpoint as the latest, never half of a new one.

Checkpoints live on a local (or mounted) filesystem: ``torch.save`` of multi-GB states to an
object store belongs to a copy step after training, not inside the loop.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

LATEST = "latest.json"


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(
    directory: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    decoder_config: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``directory/step-NNNNNN`` atomically, point ``latest.json`` at it, keep the newest
    ``keep`` checkpoints (0 keeps all)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_name(step)
    tmp = directory / f".{step_name(step)}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    torch.save(model_state, tmp / "model.pt")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save(trainer_state, tmp / "trainer.pt")
    (tmp / "decoder.json").write_text(json.dumps(decoder_config, indent=2, sort_keys=True) + "\n")
    if final.exists():  # the same step saved again (a resumed run's final save): replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_latest(directory, step)
    if keep > 0:
        for old in list_checkpoints(directory)[:-keep]:
            shutil.rmtree(directory / step_name(old), ignore_errors=True)
    return final


def _write_latest(directory: Path, step: int) -> None:
    tmp = directory / f".{LATEST}.tmp-{uuid.uuid4().hex}"
    tmp.write_text(json.dumps({"step": step, "path": step_name(step)}) + "\n")
    os.replace(tmp, directory / LATEST)


def list_checkpoints(directory: Path) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        if entry.is_dir() and entry.name.startswith("step-") and (entry / "trainer.pt").exists():
            steps.append(int(entry.name.removeprefix("step-")))
    return sorted(steps)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or the newest complete one if that file is gone."""
    pointer = directory / LATEST
    if pointer.exists():
        path = directory / json.loads(pointer.read_text())["path"]
        if (path / "trainer.pt").exists():
            return path
    steps = list_checkpoints(directory)
    return directory / step_name(steps[-1]) if steps else None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The three states of one checkpoint, on ``map_location``."""
    try:
        return {
            "model": torch.load(path / "model.pt", map_location=map_location, weights_only=True),
            "optimizer": torch.load(
                path / "optimizer.pt", map_location=map_location, weights_only=True
            ),
            # RNG states and the scheduler's dict are plain Python and tensors
            "trainer": torch.load(path / "trainer.pt", map_location="cpu", weights_only=False),
            "decoder": json.loads((path / "decoder.json").read_text()),
        }
    except (OSError, RuntimeError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {path}: cannot load it ({error})") from error
