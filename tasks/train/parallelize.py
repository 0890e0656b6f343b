"""How the decoder runs on the hardware: the processes, and the wrappers applied to the model.

The model (:mod:`llmflow.models.decoder`) knows nothing of parallelism, as in torchtitan: this
module joins the process group that ``torchrun`` describes (:func:`init_distributed`) and applies
what the run's config asks for to a plain :class:`~llmflow.models.decoder.Decoder`
(:func:`parallelize`): ``torch.compile``, then DDP when there is more than one process. The
training loop steps what comes back and keeps the plain module for its weights.

Sharding goes here next: FSDP2 (``fully_shard`` per decoder layer, then on the root) and
activation checkpointing are applied in :func:`parallelize`, between compiling and the DDP wrap it
replaces, so neither the model nor the loop changes for them.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import cast

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from llmflow.models.decoder import Decoder
from llmflow.tasks.train.train_config import TrainConfig


@dataclass
class Distributed:
    """This process's place among the run's processes (one of one when not under torchrun)."""

    rank: int
    local_rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


def init_distributed(config: TrainConfig) -> tuple[Distributed, torch.device]:
    """This process's rank (from torchrun's environment) and device; joins the process group
    (gloo on the CPU, NCCL on GPUs) when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pretrain.device is 'cuda' but torch sees no CUDA device")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=None)
    return Distributed(rank, local_rank, world), device


def parallelize(
    model: Decoder, config: TrainConfig, parallel: Distributed, device: torch.device
) -> torch.nn.Module:
    """What the training steps run: ``model`` compiled (``config.compile``) and wrapped in DDP
    (several processes). Its parameters are ``model``'s own, so optimizer and checkpoints keep
    using the plain module."""
    wrapped: torch.nn.Module = model
    if config.compile:
        # typed as returning a plain callable; for a module it is a (compiled) module
        wrapped = cast(torch.nn.Module, torch.compile(wrapped))
    if parallel.world > 1:
        wrapped = DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None
        )
    return wrapped


def gradient_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Where the backward pass runs: DDP's ``no_sync`` for a micro-batch whose gradients are
    only accumulated (``sync`` false), so the all-reduce happens once per step."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
