"""How a one-step stage resumes: the units' key and marker rule, for a stage of one unit.

The tokenizer, pretraining, SFT and evaluation are one step over their whole input. Each is keyed
like any unit (:func:`~llmflow.tasks.core.stage.unit_key`: stage, code version, the config's
output fields, a digest of what it reads) and writes, last, a manifest (:class:`StepManifest`)
that carries the key and declares the files the step made. A re-run with the same key whose
declared files are all still there, with their sizes (and, for small files, their sha256), is
skipped; anything else runs the step again. :func:`run_step` is the one executor of a step, as
``run_unit`` is of a unit; dedup's global resolve is a step too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

from llmflow.tasks.core import shards
from llmflow.tasks.core.stage import StageConfig, StageSpec, unit_key

# Declared files up to this size are re-hashed when a re-run checks them (a tokenizer, a
# config); larger ones (model weights) are checked by size, since hashing GBs to decide to skip
# would cost more than many steps.
VERIFY_SHA256_BYTES = 16 * 1024 * 1024


class OutputFile(BaseModel):
    """A file a step made, relative to its stage's folder (never outside it)."""

    path: str
    bytes: int
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        if value.startswith("/") or ".." in value.split("/") or not value:
            raise ValueError(f"output path {value!r} is not inside the stage's folder")
        return value


class StepManifest(BaseModel):
    """What every one-step stage's manifest holds; a stage adds its own fields beside these."""

    model_config = ConfigDict(extra="allow")

    format: int
    stage: str
    code_version: str
    key: str
    outputs: list[OutputFile] = []


def step_key(spec: StageSpec, config: StageConfig, inputs: dict[str, Any]) -> str:
    """A step's key: the unit key over a digest of what it reads (hashes of its inputs)."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    return unit_key(spec, config, digest)


def output_file(stage_dir: str, path: str) -> OutputFile:
    """Describe a file the step wrote (``path`` relative to ``stage_dir``)."""
    data = shards.read_bytes(shards.join(stage_dir, path))
    return OutputFile(path=path, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())


def _intact(stage_dir: str, output: OutputFile) -> bool:
    path = shards.join(stage_dir, output.path)
    if not shards.exists(path):
        return False
    fs, local = shards.filesystem(path)
    if fs.size(local) != output.bytes:
        return False
    if output.bytes > VERIFY_SHA256_BYTES:
        return True
    return hashlib.sha256(shards.read_bytes(path)).hexdigest() == output.sha256


def completed_step(stage_dir: str, key: str) -> dict[str, Any] | None:
    """The manifest of the step's finished run with this key, if its files are all intact."""
    path = shards.join(stage_dir, shards.MANIFEST_NAME)
    if not shards.exists(path):
        return None
    try:
        data = shards.read_json(path)
        manifest = StepManifest.model_validate(data)
    except ValueError:
        return None  # unreadable, or from before manifests declared their outputs: redo
    if manifest.key != key:
        return None
    if not all(_intact(stage_dir, output) for output in manifest.outputs):
        return None
    return data


def step_output_intact(stage_dir: str, key: str, path: str) -> bool:
    """Whether the step's manifest has this key and declares ``path``, still intact: what one
    consumer of one output checks (without re-reading every other output of the step)."""
    manifest_path = shards.join(stage_dir, shards.MANIFEST_NAME)
    if not shards.exists(manifest_path):
        return False
    try:
        manifest = StepManifest.model_validate(shards.read_json(manifest_path))
    except ValueError:
        return False
    declared = [o for o in manifest.outputs if o.path == path]
    return manifest.key == key and len(declared) == 1 and _intact(stage_dir, declared[0])


def write_step_manifest(
    stage_dir: str, spec: StageSpec, key: str, outputs: list[str], fields: dict[str, Any]
) -> dict[str, Any]:
    """Write the step's manifest, last: its key, its declared ``outputs`` (paths relative to
    ``stage_dir``, described as they are now) and the stage's own ``fields``."""
    manifest = StepManifest(
        format=shards.MANIFEST_FORMAT,
        stage=spec.name,
        code_version=spec.code_version(),
        key=key,
        outputs=[output_file(stage_dir, p) for p in outputs],
    )
    data = manifest.model_dump(mode="json") | fields
    shards.write_json_atomic(shards.join(stage_dir, shards.MANIFEST_NAME), data)
    return data


def run_step(
    stage_dir: str,
    spec: StageSpec,
    key: str,
    make: Callable[[], tuple[list[str], dict[str, Any]]],
) -> tuple[dict[str, Any], bool]:
    """The one executor of a step, as :func:`~llmflow.tasks.core.stage.run_unit` is of a unit:
    skip it when its manifest has this key and its files are intact; else run ``make`` (which
    writes the step's files and returns their paths, relative to ``stage_dir``, and the
    manifest's own fields) and write the manifest last. Returns (manifest, skipped)."""
    done = completed_step(stage_dir, key)
    if done is not None:
        return done, True
    outputs, fields = make()
    return write_step_manifest(stage_dir, spec, key, outputs, fields), False
