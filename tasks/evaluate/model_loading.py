"""The models the evaluator scores: whatever transformers loads as a causal LM, found from a path.

One loader for every kind keeps the scoring code single: a Hugging Face model directory, a GGUF
file (transformers dequantizes it; needs the ``gguf`` package), one of our pretraining or SFT
runs (its ``hf/`` export, a Llama directory with our tokenizer and chat template beside it), or
one of a run's checkpoints (exported to a temporary folder on the way).
Nothing is fetched from a hub: a path that is none of these is an error that says what was
expected.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# What ``device`` may say (the CLI's --device, the evaluate stage's device field).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]+)?)$"


def resolve_device(device: str) -> str:
    """The torch device to evaluate on: ``auto`` is CUDA when this machine has it, else the CPU;
    a device named explicitly must exist here (an error says why not, rather than a torch
    failure deep inside the first forward pass)."""
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ValueError(f"device {device!r}: expected auto, cpu, cuda, cuda:N or mps")
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r}: CUDA is not available on this machine"
                f" (torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})"
            )
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: Apple's MPS backend is not available on this machine")
    return device


def resolve_model_path(path: str | Path) -> tuple[Path, str | None]:
    """(directory to load from, GGUF file name or None) for a model path."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return p.parent, p.name
    if (p / "config.json").is_file():
        return p, None
    if (p / "hf" / "config.json").is_file():  # a pretraining or SFT run folder
        return p / "hf", None
    raise ValueError(
        f"model {path}: expected a Hugging Face model directory (with config.json), a .gguf file,"
        " an llmflow run folder (data/pretrain/runs/<key> or data/sft/runs/<key>, with hf/) or"
        " one of its checkpoints (checkpoints/step-NNNNNN)"
    )


def _export_checkpoint(checkpoint: Path, into: Path) -> Path:
    """One of our checkpoints (``<run>/checkpoints/step-NNNNNN``, written during training, before
    any export) as a Hugging Face folder, with the tokenizer of its run's export."""
    from llmflow.tasks.train.pretrain import export_hf

    tokenizer_dir = checkpoint.parent.parent / "hf"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ValueError(
            f"model {checkpoint}: a checkpoint, but no tokenizer at {tokenizer_dir}"
            " (its run has not exported yet): evaluate the run folder once it has finished"
        )
    return export_hf(checkpoint, str(tokenizer_dir), into / checkpoint.name)


@contextmanager
def _no_loading_bars() -> Iterator[None]:
    """transformers' tqdm bars ("Loading weights 12/12 [00:00, 12476.86it/s]") off while a
    model loads: on a terminal they fight llmflow's own bars, and in a log file or the Prefect
    UI they are carriage-return debris. The previous setting comes back afterwards, so a
    caller's own transformers bars are left as they were."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_causal_lm(path: str | Path, device: str = "auto") -> tuple[Any, Any]:
    """The model (float32, eval mode) on ``device`` (see :func:`resolve_device`) and its
    tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(device)
    checkpoint = Path(path)
    if (checkpoint / "decoder.json").is_file() and (checkpoint / "model.pt").is_file():
        with tempfile.TemporaryDirectory(prefix="llmflow-checkpoint-") as tmp:
            return load_causal_lm(_export_checkpoint(checkpoint, Path(tmp)), device)
    directory, gguf_file = resolve_model_path(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        with _no_loading_bars():
            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype="float32", **kwargs)
    except ImportError as error:
        raise ImportError(f"model {path}: {error} (GGUF files need `pip install gguf`)") from error
    # transformers types PreTrainedModel.to through a decorator that hides its arguments
    return model.to(device).eval(), tokenizer  # type: ignore[arg-type]
