"""The training loop (pretraining and SFT): one process of it, alone or as one rank under torchrun.

The same code trains on a laptop's CPU and on each GPU of a node: ``torchrun`` sets the
``RANK``/``WORLD_SIZE`` environment, and :mod:`llmflow.tasks.train.parallelize` joins the process
group and wraps the model. Run directly as ``python -m llmflow.tasks.train.trainer job.json``
(which is what :mod:`llmflow.tasks.train.pretrain` hands to torchrun).

A :class:`Trainer` is the run's state: model, optimizer, scheduler, step and data position. Its
:meth:`~Trainer.state_dict` is exactly what a checkpoint holds and :meth:`~Trainer.load_state_dict`
exactly what resuming restores (:mod:`llmflow.tasks.train.checkpoints` writes and reads that dict),
so saving and loading cannot drift apart. :func:`train` builds one and steps it.

Exactness is a design goal, not an accident: the batch of step ``s`` is a pure function of the seed
and ``s`` (:mod:`llmflow.tasks.train.train_data`), the checkpoint holds the optimizer, the scheduler
and every rank's RNG states, so a run resumed from step ``k`` produces the same losses, step for
step, as one that never stopped; and a global batch is the same sequences whatever the split into
processes and micro-batches, so two DDP processes match one process with twice the accumulation.

Pretraining and SFT differ only in their data (windows cut from the token stream, packed
conversations with an assistant-only loss), in where the weights start (SFT: the pretrained
checkpoint) and in what a sample is (a continuation, a chat reply). The loss of a step is the summed
loss over the step's trained targets divided by their number over the whole global batch: the mean
over tokens, whatever the split into processes and micro-batches (SFT rows hold different numbers
of assistant tokens, so a mean of per-micro-batch means would weigh them unevenly).

Under ``parallelism="fsdp"`` the model's parameters, gradients and optimizer state are DTensor
shards (:mod:`llmflow.tasks.train.parallelize`): the loop is the same, the optimizer is built on
the shards, the gradient norm is the whole model's, and a checkpoint holds the shards (DCP) beside
the full weights (:mod:`llmflow.tasks.train.checkpoints`); evaluation runs on the shards, samples
on a full copy of the weights on rank 0.

The loss and gradient norm stay on the device between logged steps, as nanoGPT keeps them: the
host waits for the device only when it logs, evaluates or saves, and that is where a NaN or
infinite loss of any step since the last such point stops the run (:class:`NonFiniteLossError`),
before anything of it is logged as good or saved.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

from llmflow.models.decoder import Decoder
from llmflow.models.generate import generate
from llmflow.tasks.train import checkpoints
from llmflow.tasks.train.parallelize import (
    Distributed,
    gradient_sync,
    init_distributed,
    parallelize,
    train_dtype,
)
from llmflow.tasks.train.token_shards import TokenStream
from llmflow.tasks.train.train_config import TrainConfig, TrainJob
from llmflow.tasks.train.train_data import (
    PackedConversations,
    TrainWindows,
    eval_batches,
    unigram_entropy,
    validation_loss,
)
from llmflow.tasks.train.train_metrics import MetricsSink, Stopwatch, peak_flops

PROGRESS_PREFIX = "LLMFLOW_PROGRESS "
RESULT_FILE = "result.json"


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss or the gradient norm is NaN or infinite."""


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine or warmup-stable-decay down to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = config.max_steps - max(1, round(config.decay_fraction * config.max_steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, config.max_steps - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW, or Muon on the blocks' matrices with AdamW on the rest (``config.optimizer``): one
    torch Optimizer either way (:mod:`llmflow.tasks.train.optimizers`)."""
    from llmflow.tasks.train import optimizers

    return optimizers.build_optimizer(model, config, device)


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if train_dtype(config, device) == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _samples(
    model: Decoder, tokenizer: Any, prompts: list[str], tokens: int, chat: bool, seed: int
) -> str:
    """Continuations of the prompts, each started after ``<|eos|>`` as a new document is
    (sampled); or, for a chat model, its greedy reply to each prompt as a user message, up to
    its ``<|end|>``."""
    from llmflow.tasks.train.bpe_tokenizer import special_token_id
    from llmflow.tasks.train.chat_format import encode_chat

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for prompt in prompts:
        if chat:
            ids, _ = encode_chat(tokenizer, [{"role": "user", "content": prompt}], True)
            stop, keep = special_token_id(tokenizer, "<|end|>"), len(ids)
            settings: dict[str, Any] = {"temperature": 0.0}
        else:
            stop = special_token_id(tokenizer, "<|eos|>")
            ids, keep = [stop, *tokenizer.encode(prompt, add_special_tokens=False).ids], 1
            settings = {"temperature": 0.8, "top_k": 50, "generator": generator}
        out = generate(model, torch.tensor([ids], device=device), tokens, eos_id=stop, **settings)
        text = tokenizer.decode(out[0, keep:].tolist(), skip_special_tokens=True)
        parts.append(f"### {prompt!r}\n{text}\n")
    model.train()
    return "\n".join(parts)


class Trainer:
    """One process's training run. Its :meth:`state_dict` (model, optimizer, scheduler, step,
    data position, every rank's RNG states) is exactly what a checkpoint holds; the rest is
    rebuilt from the job. :func:`train` calls its steps in order."""

    def __init__(self, job: TrainJob) -> None:
        from llmflow.tasks.train.bpe_tokenizer import load_tokenizer

        self.job, self.config = job, job.config
        self.parallel, self.device = init_distributed(self.config)
        self.run_dir = Path(job.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.seq_len, self.accumulation = self._batch_shape()
        self.global_sequences = self.config.batch_tokens // self.seq_len
        self.chat = job.kind == "sft"
        self.tokenizer = load_tokenizer(job.tokenizer_dir)
        self.token_bytes = self._token_bytes()
        self.data = self._training_data()
        self.val_batches = eval_batches(job, self.seq_len, self.device)
        if not self.val_batches and self.parallel.main:
            print(
                "no held-out data: validation loss and bits per byte are not measured"
                f" (raise {'sft' if self.chat else 'tokenize'}.val_fraction, or add data)",
                flush=True,
            )
        torch.manual_seed(self.config.seed)
        self.model = Decoder(job.decoder).to(self.device)  # the weights, saved and loaded
        # what the steps run: the decoder, checkpointed, sharded, compiled and/or wrapped for
        # DDP as configured; under FSDP self.model's parameters are now the shards, which is
        # what the optimizer must be built on
        self.parallel_model = parallelize(self.model, self.config, self.parallel, self.device)
        self.optimizer = build_optimizer(self.model, self.config, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_multiplier(step, self.config)
        )
        self.step = self.resumed_from = 0
        self.sink: MetricsSink | None = None
        self.entropy = math.nan
        self.last: dict[str, float] = {}  # the last step's metrics
        # the learning rates of the last step: AdamW's, and Muon's where it has the matrices
        self.lrs: dict[str, float] = {"lr": self.config.lr}
        # (step, loss, grad norm) of the steps since the host last looked, on the device
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._stopwatch = Stopwatch(self.device)

    def _batch_shape(self) -> tuple[int, int]:
        """(sequence length, micro-batches per step), checked against the model and batch."""
        config, decoder, world = self.config, self.job.decoder, self.parallel.world
        seq_len = config.seq_len or decoder.max_seq_len
        if seq_len > decoder.max_seq_len:
            raise ValueError(
                f"{self.job.kind}.seq_len={seq_len} exceeds the model's max_seq_len="
                f"{decoder.max_seq_len}"
            )
        per_micro = config.micro_batch_size * seq_len * world
        if config.batch_tokens % per_micro:
            raise ValueError(
                f"{self.job.kind}.batch_tokens={config.batch_tokens} is not a multiple of"
                f" micro_batch_size × seq_len × processes = {config.micro_batch_size} × {seq_len}"
                f" × {world} = {per_micro}"
            )
        return seq_len, config.batch_tokens // per_micro

    def _token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes per token id (0 for special tokens), for bits per byte."""
        from llmflow.tasks.train.bpe_tokenizer import token_byte_lengths

        token_bytes = torch.zeros(self.job.decoder.vocab_size, dtype=torch.int64)
        lengths = np.asarray(token_byte_lengths(self.tokenizer), dtype=np.int64)
        token_bytes[: len(lengths)] = torch.from_numpy(lengths)
        return token_bytes.to(self.device)

    def _training_data(self) -> TrainWindows | PackedConversations:
        if self.chat:
            return PackedConversations(self.job.train_shards[0], self.seq_len, self.config.seed)
        return TrainWindows(TokenStream(self.job.train_shards), self.seq_len, self.config.seed)

    # --- the state a checkpoint holds -------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint saves: ``model``, ``optimizer``, ``trainer`` (scheduler, step, data
        position, every rank's RNG states) and ``decoder`` (the model's shape). Under torchrun
        every rank calls it (the RNG states are gathered); only rank 0's is written, so only
        rank 0 copies the weights to the host.

        Sharded (FSDP), ``sharded`` holds the model's and optimizer's state dicts of shards
        (every rank's is written, with DCP) instead of ``optimizer``, and ``model`` the full
        weights, gathered to rank 0's host (empty on the other ranks)."""
        rng: list[dict[str, Any] | None] = [checkpoints.rng_state(self.device)]
        if self.parallel.world > 1:
            rng = [None] * self.parallel.world
            dist.all_gather_object(rng, checkpoints.rng_state(self.device))
        parts: dict[str, Any]
        if self.parallel.sharded:
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            parts = {
                "model": self.full_weights(),
                "sharded": {"model": model_state, "optimizer": optimizer_state},
            }
        else:
            weights = self.model.state_dict()
            parts = {
                "model": {
                    k: v.detach().cpu() if self.parallel.main else v for k, v in weights.items()
                },
                "optimizer": self.optimizer.state_dict(),
            }
        return parts | {
            "trainer": {
                "step": self.step,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng,
                "global_sequences": self.global_sequences,
                "sequences_consumed": self.step * self.global_sequences,
                "seq_len": self.seq_len,
            },
            "decoder": self.job.decoder.model_dump(),
        }

    def full_weights(self) -> dict[str, Any]:
        """The model's whole weights on rank 0's host (empty on the other ranks; every rank
        calls it, as the sharded weights are gathered)."""
        if not self.parallel.sharded:
            return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)

    def load_weights(self, weights: dict[str, Any]) -> None:
        """Set the model's weights from a full set (every rank's copy), sharding them if the
        model is sharded."""
        if self.parallel.sharded:
            set_model_state_dict(
                self.model, weights, options=StateDictOptions(full_state_dict=True)
            )
        else:
            self.model.load_state_dict(weights)

    def load_state_dict(self, state: dict[str, Any], sharded_from: Path | None = None) -> None:
        """Continue from ``state`` (:meth:`state_dict`'s, as a checkpoint gives it back); the
        model and optimizer from ``sharded_from``'s DCP folder when the checkpoint is sharded
        (every rank calls it), resharded to this run's processes (or none)."""
        trainer = state["trainer"]
        if sharded_from is not None:
            model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
            sharded: dict[str, Any] = {"model": model_state, "optimizer": optimizer_state}
            checkpoints.load_sharded(sharded_from, sharded)
            set_state_dict(
                self.model,
                self.optimizer,
                model_state_dict=sharded["model"],
                optim_state_dict=sharded["optimizer"],
            )
        elif self.parallel.sharded:  # a DDP checkpoint: its full state, sharded here
            self.load_weights(state["model"])
            set_optimizer_state_dict(
                self.model,
                self.optimizer,
                self._named_optimizer_state(state["optimizer"]),
                options=StateDictOptions(full_state_dict=True),
            )
        else:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.step = trainer["step"]
        rng, rank = trainer["rng"], self.parallel.rank
        checkpoints.set_rng_state(rng[rank] if rank < len(rng) else rng[0], self.device)

    def _named_optimizer_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A ``torch.optim`` state dict (parameters numbered in the optimizer's order) with the
        parameters named instead, as DCP's ``set_optimizer_state_dict`` takes it."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        ours = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        saved = [i for group in state["param_groups"] for i in group["params"]]
        if len(saved) != len(ours):
            raise ValueError(
                f"the checkpoint's optimizer has {len(saved)} parameters, this run's {len(ours)}"
            )
        name_of = dict(zip(saved, ours, strict=True))
        return {
            "state": {name_of[i]: value for i, value in state["state"].items()},
            "param_groups": [
                group | {"params": [name_of[i] for i in group["params"]]}
                for group in state["param_groups"]
            ],
        }

    def resume(self) -> None:
        """Continue from the run's latest checkpoint, or (a new SFT run) start from the
        pretrained weights; then open the run's metrics where the checkpoint left them."""
        latest = checkpoints.latest_checkpoint(self.checkpoint_dir)
        if latest is not None:
            sharded = checkpoints.is_sharded(latest)
            parts = ("trainer",) if sharded else checkpoints.PT_PARTS
            state = checkpoints.load_checkpoint(latest, map_location=self.device, parts=parts)
            made_with = state["trainer"]["global_sequences"]
            if made_with != self.global_sequences:
                raise ValueError(
                    f"checkpoint {latest} was made with {made_with} sequences per step, this run"
                    f" has {self.global_sequences}: start a new run folder"
                )
            self.load_state_dict(state, latest if sharded else None)
        elif self.job.init_checkpoint is not None:
            initial = checkpoints.load_checkpoint(
                Path(self.job.init_checkpoint),
                map_location=self.device,
                parts=("model", "trainer"),  # not the optimizer's state: a new run's own
            )
            if initial["decoder"] != self.job.decoder.model_dump():
                raise ValueError(
                    f"checkpoint {self.job.init_checkpoint} is a different model shape than the"
                    " run's"
                )
            self.load_weights(initial["model"])
        self.resumed_from = self.step
        if self.parallel.main:
            self._open_metrics()
        self.parallel_model.train()
        self._stopwatch.resume()

    def _open_metrics(self) -> None:
        """Rank 0's record, with the run's sizes at step 0 (only rank 0 reads the whole split
        for the unigram entropy)."""
        self.sink = MetricsSink(self.job, self.step)
        if isinstance(self.data, TrainWindows):
            self.entropy = unigram_entropy(self.data.stream, self.job.decoder.vocab_size)
        if self.step == 0:
            counts = {"train_tokens": self.data.tokens, "parameters": self.model.num_parameters()}
            self.sink.log(0, counts | ({} if self.chat else {"unigram_entropy": self.entropy}))

    # --- one step ---------------------------------------------------------------------------

    def train_step(self) -> None:
        """One optimizer step on the global batch; its loss and gradient norm stay on the
        device (read at the next log, evaluation or save)."""
        config, parallel = self.config, self.parallel
        first = self.step * self.global_sequences
        # every rank knows the whole step's count of trained targets (the data is a pure
        # function of the step), so each scales its sum by it; DDP's mean over ranks is undone
        # by the factor world
        step_targets = max(1, self.data.targets(first, self.global_sequences))
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accumulation):
            start = first + (micro * parallel.world + parallel.rank) * config.micro_batch_size
            batch = self.data.batch(start, config.micro_batch_size, self.device)
            with gradient_sync(self.parallel_model, micro == self.accumulation - 1):
                with _autocast(config, self.device):
                    logits = batch.logits(self.parallel_model)
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    batch.y.reshape(-1),
                    reduction="sum",
                )
                (loss * (parallel.world / step_targets)).backward()
            loss_sum += loss.detach()
        grad_norm = self._clip_gradients()
        self._pending.append((self.step + 1, parallel.all_sum(loss_sum) / step_targets, grad_norm))
        self.lrs = {"lr": self.optimizer.param_groups[0]["lr"]}
        muon = getattr(self.optimizer, "parts", {}).get("muon")
        if muon is not None:
            self.lrs["muon_lr"] = muon.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._stopwatch.steps += 1

    def _clip_gradients(self) -> torch.Tensor:
        """The gradients' total norm, after clipping them to ``grad_clip`` (if set). Sharded
        gradients (DTensors) give the whole model's norm: torch reduces it over the ranks."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.config.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def _host_losses(self) -> list[tuple[float, float]]:
        """(loss, grad norm) of the steps since the host last looked, in one copy from the
        device; a NaN or infinite one stops the run here, before it is logged or saved."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        values = torch.stack([torch.stack([x.double(), n.double()]) for _, x, n in pending])
        rows: list[tuple[float, float]] = [(loss, norm) for loss, norm in values.tolist()]
        for (step, _, _), (loss, norm) in zip(pending, rows, strict=True):
            if not (math.isfinite(loss) and math.isfinite(norm)):
                latest = checkpoints.latest_checkpoint(self.checkpoint_dir)
                raise NonFiniteLossError(
                    f"step {step}: training loss {loss}, gradient norm {norm}; the run diverged"
                    f" and was stopped before saving it. Lower {self.job.kind}.lr, lengthen"
                    f" {self.job.kind}.warmup_steps or set pretrain.model.qk_norm=true, then"
                    f" re-run (it resumes from {latest or 'the start'})."
                )
        return rows

    # --- what happens between steps ---------------------------------------------------------

    def _evaluates_now(self) -> bool:
        return self.step % self.config.eval_interval == 0 or self.step == self.config.max_steps

    def _logs_now(self) -> bool:
        return (
            self.step % self.config.log_interval == 0
            or self.step == self.config.max_steps
            or (self._evaluates_now() and bool(self.val_batches))
        )

    def reports_now(self) -> bool:
        """Whether this step is logged or evaluated: the steps where the host reads the loss."""
        return self._logs_now() or self._evaluates_now()

    def step_metrics(self) -> dict[str, float]:
        """The last step's training metrics, throughput over the steps since the last report."""
        loss, grad_norm = self._host_losses()[-1]
        seconds, steps = self._stopwatch.lap()
        tokens_per_s = self.config.batch_tokens * steps / seconds
        flops_per_token = self.model.flops_per_token(self.seq_len)
        metrics = {
            "loss": loss,
            **self.lrs,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": self.step * self.config.batch_tokens,
            "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
        }
        peak = peak_flops(self.device, self.config.peak_flops)
        if peak:
            metrics["mfu"] = tokens_per_s * flops_per_token / peak
        return metrics

    def maybe_evaluate(self) -> dict[str, float]:
        """At an evaluation step, :meth:`evaluate_and_sample` (its time is not training's)."""
        if not self._evaluates_now():
            return {}
        self._stopwatch.pause()
        metrics = self.evaluate_and_sample()
        self._stopwatch.resume()
        return metrics

    def evaluate_and_sample(self) -> dict[str, float]:
        """Held-out loss and bits per byte (when there is a held-out split); rank 0 writes the
        model's samples beside the run and to MLflow."""
        metrics: dict[str, float] = {}
        if self.val_batches:
            # sharded, every rank must run as many forwards as the others (each gathers the
            # weights with all of them): an uneven split is evaluated whole on every rank
            split = self.parallel
            if split.sharded and len(self.val_batches) % split.world:
                split = Distributed(0, split.local_rank, 1, True)
            loss, bpb = validation_loss(
                self.parallel_model,
                self.val_batches,
                self.token_bytes,
                split,
                lambda: _autocast(self.config, self.device),
            )
            metrics = {"val_loss": loss, "val_bpb": bpb}
        sampler: Decoder | None = self.model
        if self.parallel.sharded:  # rank 0 samples alone, from a full copy of the weights
            weights = self.full_weights()
            sampler = None
            if self.sink is not None:
                sampler = Decoder(self.job.decoder).to(self.device)
                sampler.load_state_dict(weights)
        if self.sink is not None and sampler is not None:
            name = checkpoints.step_name(self.step)
            prompts, tokens = self.config.sample_prompts, self.config.sample_tokens
            text = _samples(sampler, self.tokenizer, prompts, tokens, self.chat, self.step)
            self.sink.log_text(text, f"samples/{name}.txt")
            (self.run_dir / "samples").mkdir(exist_ok=True)
            (self.run_dir / "samples" / f"{name}.txt").write_text(text)
        return metrics

    def log(self, metrics: dict[str, float]) -> None:
        """Record a reported step: to the metrics at a log step, a line to the output at an
        evaluation step (the log, Prefect's or torchrun's, says how the run goes)."""
        self.last = metrics
        if self.sink is not None and self._logs_now():
            self.sink.log(self.step, metrics)
        if self.parallel.main and self._evaluates_now():
            line = f"{self.job.kind} step {self.step}/{self.config.max_steps}"
            line += f": loss {metrics['loss']:.4f}"
            if "val_loss" in metrics:
                line += f", val loss {metrics['val_loss']:.4f} ({metrics['val_bpb']:.3f} bits/byte)"
            print(f"{line}, {metrics['tokens_per_s']:,.0f} tokens/s", flush=True)

    def maybe_save(self) -> None:
        """At a checkpoint step, save the state (its time is not training's)."""
        if self.step % self.config.checkpoint_interval and self.step != self.config.max_steps:
            return
        self._stopwatch.pause()
        self._host_losses()  # a diverged state is never saved
        state = self.state_dict()
        if self.parallel.main or self.parallel.sharded:  # sharded: every rank writes its shards
            checkpoints.save_checkpoint(
                self.checkpoint_dir, self.step, state, self.config.keep_checkpoints
            )
        self._stopwatch.resume()

    def finish(self) -> dict[str, Any]:
        """Rank 0's summary of the run (also written as ``result.json``); the processes part."""
        if self.resumed_from >= self.config.max_steps:  # done before, stopped before its export
            self.last = self.evaluate_and_sample()
        result = {
            "steps": self.step,
            "resumed_from": self.resumed_from,
            "final_loss": self.last.get("loss"),
            "val_loss": self.last.get("val_loss"),
            "val_bpb": self.last.get("val_bpb"),
            "unigram_entropy": None if self.chat else self.entropy,
            "train_tokens": self.data.tokens,
            "val_batches": len(self.val_batches),
            "parameters": self.model.num_parameters(),
            "world_size": self.parallel.world,
            "device": str(self.device),
            "checkpoint": str(checkpoints.latest_checkpoint(self.checkpoint_dir)),
        }
        if self.sink is not None:
            self.sink.close()
            text = json.dumps(result, indent=2, sort_keys=True) + "\n"
            (self.run_dir / RESULT_FILE).write_text(text)
        if self.parallel.has_group:
            dist.barrier()
            dist.destroy_process_group()
        return result


def train(job: TrainJob, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``job``; returns rank 0's summary of it."""
    trainer = Trainer(job)
    trainer.resume()
    while trainer.step < job.config.max_steps:
        trainer.train_step()
        if trainer.reports_now():
            metrics = trainer.step_metrics()
            trainer.log(metrics | trainer.maybe_evaluate())
        trainer.maybe_save()
        if trainer.parallel.main and on_step is not None:
            on_step(trainer.step, job.config.max_steps)
    return trainer.finish()


def _print_progress(step: int, total: int) -> None:
    print(f"{PROGRESS_PREFIX}{step} {total}", flush=True)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies. torchrun's agent starts each
    worker in a session of its own, so a torchrun killed outright (SIGKILL, an OOM kill, a
    worker node's Prefect process killed) cannot pass the signal on: without this its workers
    would train on as orphans, writing into a run folder that a re-run is resuming."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent was gone before the request: stop now
        raise SystemExit("trainer: torchrun exited before this worker started")


def main(argv: Iterator[str] | list[str] | None = None) -> None:
    """torchrun's entry point: ``python -m llmflow.tasks.train.trainer <job.json>``."""
    args = list(argv if argv is not None else sys.argv[1:])
    if len(args) != 1:
        raise SystemExit("usage: python -m llmflow.tasks.train.trainer JOB.json")
    die_with_parent()
    job = TrainJob.model_validate_json(Path(args[0]).read_text())
    train(job, on_step=_print_progress)


if __name__ == "__main__":
    main()
