"""How the decoder runs on the hardware: the processes, and the wrappers applied to the model.

The model (:mod:`llmflow.models.decoder`) knows nothing of parallelism, as in torchtitan: this
module joins the process group that ``torchrun`` describes (:func:`init_distributed`) and applies
what the run's config asks for to a plain :class:`~llmflow.models.decoder.Decoder`
(:func:`parallelize`), in this order:

1. activation checkpointing (``activation_checkpointing``): each decoder block's forward runs
   under ``torch.utils.checkpoint`` (non-reentrant), so its activations are recomputed in the
   backward pass instead of kept: less memory, about a third more compute. Only the blocks'
   ``forward`` is replaced, so parameter names and checkpoints are unchanged.
2. ``parallelism="fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on each decoder block,
   then on the root (the embedding, tied to the output projection, and the final norm), over all
   the run's processes. Parameters, gradients and optimizer state are sharded: each process
   holds ``1/world`` of them as ``DTensor`` shards and gathers a block's weights just before its
   forward and backward. When the run's dtype is bfloat16 the gathered parameters are bfloat16
   and gradients are reduced in float32 (``MixedPrecisionPolicy``). It is applied in place: the
   plain module's parameters become the shards, so the optimizer is built after this step. A
   one-process FSDP run joins a one-process group (FSDP needs one), so its checkpoints have the
   same format whatever the number of processes.
3. ``torch.compile`` (``compile``), of the whole model (lazily, so the order against step 2 does
   not matter; FSDP's hooks run outside the compiled graphs).
4. ``parallelism="ddp"`` with more than one process: DDP around the (compiled) model.

The training loop steps what comes back and keeps the plain module for its weights; between
micro-batches of one step :func:`gradient_sync` holds back the gradient reduction (DDP's
``no_sync``, FSDP2's ``set_requires_gradient_sync``) so it happens once per step. Under FSDP the
skipped reductions leave full-size (unsharded) float32 gradients on each process until the step's
last micro-batch: the price of one reduce-scatter per step instead of one per micro-batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from llmflow.models.decoder import Decoder
from llmflow.tasks.train.train_config import TrainConfig


@dataclass
class Distributed:
    """This process's place among the run's processes (one of one when not under torchrun), and
    whether the model is sharded (FSDP) over them."""

    rank: int
    local_rank: int
    world: int
    sharded: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    @property
    def has_group(self) -> bool:
        """Whether collectives run (several processes, or a one-process FSDP run's group)."""
        return self.world > 1 or self.sharded


def train_dtype(config: TrainConfig, device: torch.device) -> str:
    """The run's compute dtype: ``config.dtype``, ``auto`` resolved (bfloat16 on CUDA)."""
    if config.dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return config.dtype


def init_distributed(config: TrainConfig) -> tuple[Distributed, torch.device]:
    """This process's rank (from torchrun's environment) and device; joins the process group
    (gloo on the CPU, NCCL on GPUs) when there are several processes, or one process that shards
    (FSDP), which gets a group of its own in memory."""
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
    sharded = config.parallelism == "fsdp"
    backend = "nccl" if use_cuda else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=None)
    elif sharded and not dist.is_initialized():
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return Distributed(rank, local_rank, world, sharded), device


def parallelize(
    model: Decoder, config: TrainConfig, parallel: Distributed, device: torch.device
) -> torch.nn.Module:
    """What the training steps run: ``model`` with activation checkpointing, sharded (FSDP),
    compiled and wrapped in DDP as ``config`` asks (see the module's docstring). Its parameters
    are ``model``'s own (under FSDP, ``model``'s parameters are the shards), so optimizer and
    checkpoints keep using the plain module; build the optimizer after this call."""
    if config.activation_checkpointing:
        for block in model.model.layers:
            _checkpoint_activations(block)
    if parallel.sharded:
        _fully_shard(model, train_dtype(config, device) == "bfloat16")
    wrapped: torch.nn.Module = model
    if config.compile:
        # typed as returning a plain callable; for a module it is a (compiled) module
        wrapped = cast(torch.nn.Module, torch.compile(wrapped))
    if parallel.world > 1 and not parallel.sharded:
        wrapped = DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None
        )
    return wrapped


def _checkpoint_activations(block: torch.nn.Module) -> None:
    """Run ``block``'s forward under non-reentrant activation checkpointing. The forward is
    replaced on the instance: its hooks (FSDP's) still run around it, and its parameters keep
    their names (no wrapper module, nothing renamed in a checkpoint)."""
    forward: Callable[..., Any] = block.forward

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation, sampling: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = checkpointed


def _fully_shard(model: Decoder, bf16: bool) -> None:
    """FSDP2 in place: each block its own unit, then the root (embedding, final norm, output
    projection). The last block keeps its gathered weights after the forward: the backward
    starts with it."""
    mesh = init_device_mesh(
        "cuda" if next(model.parameters()).is_cuda else "cpu", (dist.get_world_size(),)
    )
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    layers = list(model.model.layers)
    for i, block in enumerate(layers):
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the module a compiled wrapper holds) is FSDP-sharded."""
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Where the backward pass runs: for a micro-batch whose gradients are only accumulated
    (``sync`` false), DDP's ``no_sync`` or FSDP2's ``set_requires_gradient_sync(False)``, so the
    reduction happens once per step, in the step's last backward."""
    inner = getattr(model, "_orig_mod", model)
    if isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(sync)
        yield
    elif sync or not isinstance(model, DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield
