"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a :class:`~llmflow.tasks.train.trainer.Trainer`'s state dict on disk, one file per
part: a directory ``step-000100/`` holding ``model.pt`` (weights), ``optimizer.pt`` and
``trainer.pt`` (scheduler, step, data position, every rank's RNG states) plus ``decoder.json`` (the
model's shape, so weights can be loaded without the run's config). :func:`save_checkpoint` writes
such a dict and :func:`load_checkpoint` reads the same dict back, so saving and resuming are one
code path. It is written under a temporary name and renamed into place, and ``latest.json`` is
replaced atomically after it: a run killed mid-write leaves the previous checkpoint as the latest,
never half of a new one.

A sharded (FSDP) run's checkpoint holds its model and optimizer state as each process has it, in
the format of ``torch.distributed.checkpoint`` (DCP): ``step-000100/dcp/`` (one ``.distcp`` file
per process and a ``.metadata`` index), written by every process into the same temporary folder,
which rank 0 then renames as above. Beside it rank 0 writes ``trainer.pt``, ``decoder.json`` and
``model.pt``, the full weights gathered from the shards, so export, evaluation and SFT's start
read an FSDP run's checkpoint exactly as a DDP run's; there is no ``optimizer.pt``. DCP re-shards
on loading, so such a run resumes on another number of processes (or unsharded, from ``dcp/``),
and a DDP checkpoint resumes a sharded run (its full weights and optimizer state are sharded on
loading). With several machines the run folder must be on a filesystem they all share.

Checkpoints live on a local (or mounted) filesystem: ``torch.save`` of multi-GB states to an
object store belongs to a copy step after training, not inside the loop.

Loading executes nothing from the files. A checkpoint is something a user hands in (``llmflow
evaluate --model``, ``evaluate.model``, SFT's starting point, a run folder resumed), and a pickle
can run any code while it is read; so every ``.pt`` file is read with ``torch.load(...,
weights_only=True)``, which rebuilds only tensors and plain containers and refuses anything else
before calling it. ``trainer.pt`` is written in that vocabulary too (the NumPy RNG's key as a
tensor, see :func:`portable_rng_state`). Checkpoints written before that hold the NumPy key as an
``ndarray``: they still load, through an allow-list of exactly the four NumPy names an array's
pickle uses (no function of them runs anything but array construction). Paths read back from
``latest.json`` are kept inside the checkpoint folder (:func:`resolve_inside`).

DCP's own reader is not that careful: it unpickles ``.metadata`` with plain ``pickle.load`` and
non-tensor entries (the optimizer's hyperparameters) with ``torch.load(weights_only=False)``.
:func:`load_sharded` replaces both: ``.metadata`` is read by an unpickler that admits only the
names of DCP's metadata dataclasses, ``torch.Size``, dtypes and layouts (:data:`DCP_METADATA_NAMES`,
all of them plain records whose construction runs no code of the file's choosing), and non-tensor
entries by ``torch.load(weights_only=True)``; tensors DCP already reads weights-only. What is still
trusted is DCP's own code: the files the index names are kept inside ``dcp/``
(:func:`resolve_inside`), and the byte offsets and lengths it gives slice them (a tampered index
can make loading fail or load wrong numbers, not run code or read files elsewhere).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import pickle
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

LATEST = "latest.json"
# The parts of a checkpoint saved with ``torch.save``, each as ``<part>.pt``, in writing order.
PT_PARTS = ("model", "optimizer", "trainer")
# A sharded (FSDP) checkpoint's model and optimizer state: DCP's folder inside the checkpoint.
SHARDED_DIR = "dcp"
_STEP_DIR = re.compile(r"step-(\d+)")


def resolve_inside(base: Path, value: object, source: Path | str, field: str) -> Path:
    """``base / value`` for a relative path read back from a file, refusing any that leaves
    ``base``.

    Manifests and pointer files name folders relative to their own; a value that is absolute or
    climbs out with ``..`` (a tampered or hand-edited file) would otherwise make the run read or
    write wherever it points. The check is lexical (``os.path.normpath``), not ``resolve()``:
    a stage folder that is itself a symlink to a bigger disk stays usable, and symlinks inside
    the folder are the owner's own doing. ``source`` and ``field`` name the file and the entry
    in the error.
    """
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError(f"{source}: {field}={value!r} is not a relative path inside {base}")
    relative = os.path.normpath(value)
    if (
        os.path.isabs(value)
        or Path(value).drive
        or relative == os.curdir
        or relative == os.pardir
        or relative.startswith(os.pardir + os.sep)
    ):
        raise ValueError(
            f"{source}: {field}={value!r} points outside {base}: only a path relative to that"
            " folder, not climbing out of it, is accepted (the file was edited or is not ours)"
        )
    return base / relative


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` (the parts of :data:`PT_PARTS` it has and ``decoder``, the model's shape)
    as ``directory/step-NNNNNN`` atomically, point ``latest.json`` at it, keep the newest ``keep``
    checkpoints (0 keeps all).

    Rank 0 alone calls it for an unsharded state. A state with a ``sharded`` part (FSDP: the
    model's and optimizer's state dicts of DTensor shards) is saved by every rank: each writes its
    shards with DCP into the same temporary folder, then rank 0 writes the rest and renames it."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_name(step)
    name = [f".{step_name(step)}.tmp-{uuid.uuid4().hex}"]
    sharded = state.get("sharded")
    if sharded is not None and dist.is_initialized():
        dist.broadcast_object_list(name, src=0)  # one folder for all ranks' shards
    tmp = directory / name[0]
    tmp.mkdir(exist_ok=True)
    if sharded is not None:
        dcp.save(sharded, storage_writer=FileSystemWriter(tmp / SHARDED_DIR))
        if dist.is_initialized() and dist.get_rank() != 0:
            return final
    for part in PT_PARTS:
        if part in state:
            torch.save(state[part], tmp / f"{part}.pt")
    decoder = json.dumps(state["decoder"], indent=2, sort_keys=True) + "\n"
    (tmp / "decoder.json").write_text(decoder)
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
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and (entry / "trainer.pt").exists():
            steps.append(int(match.group(1)))
    return sorted(steps)


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint ``latest.json`` names, or the newest complete one if that file is gone.

    The pointer's ``path`` must name a folder inside ``directory``: anything else is an error
    naming the file, not a checkpoint loaded from wherever it points.
    """
    pointer = directory / LATEST
    if pointer.exists():
        try:
            latest = json.loads(pointer.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{pointer}: not a readable checkpoint pointer ({error})") from error
        if not isinstance(latest, dict) or "path" not in latest:
            raise ValueError(f"{pointer}: expected {{'step': N, 'path': 'step-NNNNNN'}}")
        path = resolve_inside(directory, latest["path"], pointer, "path")
        step = latest.get("step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"{pointer}: step={step!r} is not a step number")
        if (path / "trainer.pt").exists():
            return path
    steps = list_checkpoints(directory)
    return directory / step_name(steps[-1]) if steps else None


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator's state (torch, NumPy, Python, and the CUDA device's), in the form a
    weights-only ``trainer.pt`` holds."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return portable_rng_state(state)


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Put every generator back as :func:`rng_state` found it (old checkpoints' form too)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(numpy_rng_state(state["numpy"]))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def portable_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """An RNG state dict (``torch``/``numpy``/``python``/``cuda``) in what ``weights_only``
    loading accepts: NumPy's ``('MT19937', uint32 key array, pos, has_gauss, gauss)`` becomes the
    same tuple with the key as an int64 tensor. :func:`numpy_rng_state` undoes it."""
    out = dict(state)
    if "numpy" in out:
        kind, key, *rest = out["numpy"]
        out["numpy"] = (kind, torch.from_numpy(np.asarray(key, dtype=np.int64)), *rest)
    return out


def numpy_rng_state(state: tuple[Any, ...]) -> tuple[Any, ...]:
    """The tuple ``np.random.set_state`` takes, from a stored one in either form."""
    kind, key, *rest = state
    if isinstance(key, torch.Tensor):
        key = key.numpy().astype(np.uint32)
    return (kind, key, *rest)


def _legacy_numpy_globals() -> list[Any]:
    """What the pickle of a NumPy uint32 array names: checkpoints written before
    :func:`portable_rng_state` hold the NumPy RNG key that way."""
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def unpickler_detail(error: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` objected to, without its advice to retry with
    ``weights_only=False`` (which is exactly what must not be done with an untrusted file)."""
    text = str(error)
    at = text.find("WeightsUnpickler error:")
    detail = text[at:] if at >= 0 else text
    detail = detail.split("Check the documentation of torch.load")[0]
    return " ".join(detail.split())[:300]


def _load_pt(file: Path, map_location: str | torch.device, legacy_numpy: bool = False) -> Any:
    """One ``.pt`` file, tensors and plain containers only: a pickle that names anything else
    (a payload's ``os.system``, any class) is refused before it is called. ``legacy_numpy``
    also admits NumPy arrays (the old ``trainer.pt``'s RNG key)."""
    allowed = _legacy_numpy_globals() if legacy_numpy else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint file {file}: refused, it holds Python objects other than tensors and"
            " plain containers (only weights-only checkpoints written by llmflow are loaded;"
            f" nothing in it was run). Delete it or retrain. {unpickler_detail(error)}"
        ) from error
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(f"checkpoint file {file}: cannot load it ({error})") from error


def _check_trainer_state(state: Any, file: Path) -> dict[str, Any]:
    """The trainer state's shape, checked: what resume reads from it must be there."""
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint file {file}: expected a dict, found {type(state).__name__}")
    expected = {"step": int, "scheduler": dict, "rng": list, "global_sequences": int}
    for key, kind in expected.items():
        if key in state and not isinstance(state[key], kind):
            raise ValueError(
                f"checkpoint file {file}: {key} is a {type(state[key]).__name__},"
                f" expected {kind.__name__}"
            )
    return state


def is_sharded(path: Path) -> bool:
    """Whether the checkpoint at ``path`` holds a sharded (FSDP, DCP) model and optimizer."""
    return (path / SHARDED_DIR).is_dir()


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", parts: tuple[str, ...] = PT_PARTS
) -> dict[str, Any]:
    """The state dict :func:`save_checkpoint` wrote to ``path``: its ``parts`` (of
    :data:`PT_PARTS`) on ``map_location`` (``trainer`` on the CPU), loaded without running any
    code from the files (see the module's docstring), and ``decoder``. A sharded checkpoint has no
    ``optimizer`` part (it is in :data:`SHARDED_DIR`, read by :func:`load_sharded`)."""
    decoder = path / "decoder.json"
    try:
        decoder_config = json.loads(decoder.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"checkpoint {path}: cannot read {decoder.name} ({error})") from error
    state: dict[str, Any] = {}
    for part in parts:
        file = path / f"{part}.pt"
        if part == "trainer":
            state[part] = _check_trainer_state(_load_pt(file, "cpu", True), file)
        elif part == "optimizer" and not file.exists() and is_sharded(path):
            continue
        else:
            state[part] = _load_pt(file, map_location)
    return state | {"decoder": decoder_config}


# What a DCP ``.metadata`` pickle may name: DCP's metadata records and the torch values in them.
DCP_METADATA_NAMES = frozenset(
    {
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("torch.distributed.checkpoint.metadata", "StorageMeta"),
        ("torch.distributed.checkpoint.metadata", "MetadataIndex"),
        ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "BytesStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "ChunkStorageMetadata"),
        ("torch.distributed.checkpoint.metadata", "TensorProperties"),
        ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),  # a layout by its name, from torch's own table
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
    }
)


class _MetadataUnpickler(pickle.Unpickler):
    """Rebuilds DCP's metadata and nothing else: any other name is refused before it is used."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in DCP_METADATA_NAMES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's index")


class _SafeReader(FileSystemReader):
    """DCP's file reader, its index read by :class:`_MetadataUnpickler` (not ``pickle.load``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        file = Path(self.path) / ".metadata"
        try:
            with file.open("rb") as stream:
                metadata = _MetadataUnpickler(stream).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
            raise ValueError(
                f"checkpoint file {file}: refused, it is not a DCP index written by llmflow"
                f" (nothing in it was run): {error}"
            ) from error
        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise ValueError(f"checkpoint file {file}: not a DCP index")
        for info in metadata.storage_data.values():  # the shards' files: inside the folder
            resolve_inside(Path(self.path), getattr(info, "relative_path", None), file, "path")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafePlanner(DefaultLoadPlanner):
    """DCP's planner, its non-tensor entries read weights-only (plain values and containers)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"checkpoint entry {read_item.dest_index.fqn}: refused, it holds Python objects"
                f" other than plain values (nothing in it was run). {unpickler_detail(error)}"
            ) from error
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def load_sharded(path: Path, state: dict[str, Any]) -> None:
    """Fill ``state`` in place from the sharded part of the checkpoint at ``path``: its tensors
    (DTensor shards or whole tensors, any split) get the checkpoint's values, its other entries
    are replaced. Every rank calls it. Reads run no code from the files (module docstring)."""
    try:
        dcp.load(state, storage_reader=_SafeReader(path / SHARDED_DIR), planner=_SafePlanner())
    except CheckpointException as error:  # a BaseException: one naming each rank's failure
        reasons = "; ".join(sorted({str(failure) for failure, _ in error.failures.values()}))
        raise ValueError(f"checkpoint {path}: cannot load its sharded state ({reasons})") from None
