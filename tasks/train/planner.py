"""A run planner: the model's size, the batch and the steps that fit the data, the hardware and a
budget (``llmflow plan``, and ``pretrain.preset: auto``).

Plain Python (no Prefect, no torch tensors): the same inputs always give the same :class:`Plan`,
and every choice comes with a sentence in ``Plan.reasons``. What it decides, in order:

1. **Throughput.** A GPU sustains ``peak × MFU`` model FLOP/s each (bf16 dense peak from the
   trainer's table, :data:`llmflow.tasks.train.train_metrics.PEAK_FLOPS_BF16`; MFU *assumed*
   0.40, what nanoGPT/nanochat-class runs reach on an H100 with ``torch.compile``). The CPU's
   figure is *measured*: 95.2 GFLOP/s of model FLOPs, the ``tiny`` preset's 7,330 tokens/s ×
   12.98 MFLOP/token on the 2-core EPYC of ``bench/train_throughput.md``. The budget is wall
   hours, or dollars ÷ (dollars per GPU-hour × GPUs).
2. **Shape.** nanochat's rule, not the presets: depth ``d`` gives width ``64·d`` and ``d`` heads
   of 64 (so ``d = 12`` is GPT-2 small's 768 × 12 layers × 12 heads); SwiGLU width and the rest
   are the decoder's defaults. Sequence length 256 on the CPU (the ``tiny`` preset's), 2048 on
   GPUs (nanochat's), never more than a sixteenth of the training tokens.
3. **Size.** Each depth wants ``tokens_per_param × parameters`` training tokens (10.5, the ratio
   nanochat measured as compute-optimal for its models; Chinchilla's is 20). The plan takes the
   deepest model whose tokens (a) train within the budget, (b) are at most ``max_epochs`` (4)
   passes over the data (Muennighoff et al. 2023: up to ~4 epochs, repeated tokens are worth
   nearly as much as new ones) and (c) fit the memory. When no depth meets (a) and (b), it takes
   the smallest that fits the memory and trains it on as many tokens as the budget allows, but
   at most ``max(16, max_epochs)`` epochs (beyond ~16, repetition adds next to nothing).
4. **Memory** per device: :func:`~llmflow.tasks.train.memory_estimate.memory_estimate`
   (weights, gradients, optimizer state and saved activations; its formula is in that module).
5. **Batch.** The global batch is the largest power of two of tokens at most ``tokens / 200``
   (at least 200 steps), capped at 524,288 (nanoGPT's and nanochat's 0.5M); the micro batch is
   the largest power of two of sequences (at most 64) that fits the memory; when even one
   sequence does not, activation checkpointing turns on; when the states alone exceed a
   device, FSDP (on several GPUs). Gradient accumulation makes up the rest;
   ``steps = tokens / batch_tokens``.

Times, tokens/s and MFU are *predictions* from those throughput figures. A plan that needs FSDP
or activation checkpointing sets ``pretrain.parallelism: fsdp`` /
``pretrain.activation_checkpointing`` under ``pretrain.preset: auto``
(:mod:`llmflow.tasks.train.parallelize` applies them).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from llmflow.models.decoder import DecoderConfig
from llmflow.tasks.train.memory_estimate import (
    GIB,
    MemoryEstimate,
    flops_per_token,
    memory_estimate,
    parameter_count,
)

# GPU memory in GiB (vendor data sheets) by the names the trainer's peak table knows.
GPU_MEMORY_GIB: dict[str, float] = {
    "H100": 80,
    "H100 PCIe": 80,
    "H100 NVL": 94,
    "H200": 141,
    "GH200": 96,
    "B200": 180,
    "A100": 80,
    "A100 40GB": 40,
    "A10G": 24,
    "L40S": 48,
    "L4": 24,
    "RTX 4090": 24,
    "RTX 3090": 24,
}
ASSUMED_GPU_MFU = 0.40
# Measured (bench/train_throughput.md): tiny, batch 8 × 256, eager float32, 2-core AMD EPYC:
# 7,330 tokens/s × 12.98 MFLOP/token.
CPU_MODEL_FLOPS = 7330 * 12.98e6
CPU_MEMORY_GIB = 16.0  # assumed when not given
CPU_SEQ_LEN = 256
GPU_SEQ_LEN = 2048
MIN_DEPTH, MAX_DEPTH = 2, 48
WIDTH_PER_LAYER = 64  # nanochat's aspect ratio
HEAD_DIM = 64
MIN_STEPS = 200
MAX_BATCH_TOKENS = 2**19
MAX_MICRO_BATCH = 64
REPEAT_CAP_EPOCHS = 16.0


class PlanError(ValueError):
    """Inputs the planner cannot plan for (an unknown GPU, a non-positive budget…)."""


class PlanSettings(BaseModel):
    """``pretrain.plan``: what ``pretrain.preset: auto`` plans for (the data comes from the
    tokenize stage's manifest)."""

    model_config = ConfigDict(extra="forbid")

    hardware: str = Field(
        "cpu", description="'cpu' or a GPU model (H100, A100, H200, L4, RTX 4090…)."
    )
    gpus: int = Field(1, ge=1, description="GPUs on the machine (ignored on the CPU).")
    hours: float = Field(1.0, gt=0, description="Wall-clock budget of the training run.")
    tokens_per_param: float = Field(
        10.5, gt=0, description="Training tokens per parameter (nanochat 10.5, Chinchilla 20)."
    )
    max_epochs: float = Field(
        4.0, gt=0, description="Passes over the data before a smaller model is preferred."
    )


class Hardware(BaseModel):
    """What the run trains on: its sustained model FLOP/s and memory per device."""

    model_config = ConfigDict(extra="forbid")

    name: str
    count: int
    peak_flops: float | None  # per device; None on the CPU
    mfu: float | None  # assumed; None on the CPU (measured throughput instead)
    memory_gib: float

    @property
    def gpu(self) -> bool:
        return self.name != "cpu"

    @property
    def sustained_flops(self) -> float:
        """Model FLOP/s of the whole run (all devices)."""
        if self.peak_flops is None or self.mfu is None:
            return CPU_MODEL_FLOPS
        return self.count * self.peak_flops * self.mfu

    @property
    def usable_bytes(self) -> int:
        share = 0.9 if self.gpu else 0.8
        return int(share * self.memory_gib * GIB - GIB)


def _normal(name: str) -> str:
    return "".join(ch for ch in name.upper() if ch.isalnum())


def known_gpus() -> list[str]:
    return list(GPU_MEMORY_GIB)


def hardware(
    name: str, count: int = 1, mfu: float | None = None, memory_gib: float | None = None
) -> Hardware:
    """The CPU (``'cpu'``) or ``count`` GPUs of a known model; an unknown one is a PlanError."""
    if count < 1:
        raise PlanError(f"--gpus {count}: need at least one")
    if name.strip().lower() == "cpu":
        return Hardware(
            name="cpu", count=1, peak_flops=None, mfu=None, memory_gib=memory_gib or CPU_MEMORY_GIB
        )
    from llmflow.tasks.train.train_metrics import PEAK_FLOPS_BF16

    wanted = _normal(name)
    matches = [known for known in GPU_MEMORY_GIB if _normal(known) == wanted]
    if not matches:
        raise PlanError(f"--gpu {name!r}: unknown GPU; known: {', '.join(known_gpus())} (or --cpu)")
    known = matches[0]
    peaks = dict(PEAK_FLOPS_BF16)
    peak = peaks.get(known) or peaks[known.split()[0]]
    if mfu is not None and not 0 < mfu <= 1:
        raise PlanError(f"--mfu {mfu}: must be in (0, 1]")
    return Hardware(
        name=known,
        count=count,
        peak_flops=peak,
        mfu=mfu or ASSUMED_GPU_MFU,
        memory_gib=memory_gib or GPU_MEMORY_GIB[known],
    )


def shape_for_depth(depth: int, vocab_size: int, seq_len: int) -> DecoderConfig:
    """nanochat's rule: width 64·depth, heads of 64 (depth 12 is GPT-2 small's shape)."""
    width = WIDTH_PER_LAYER * depth
    return DecoderConfig(
        vocab_size=64 * -(-vocab_size // 64),
        hidden_size=width,
        num_layers=depth,
        num_heads=width // HEAD_DIM,
        max_seq_len=seq_len,
    )


class Plan(BaseModel):
    """A planned run: the model, the batch, the steps, the memory and the predicted time."""

    model_config = ConfigDict(extra="forbid")

    # inputs
    data_tokens: int
    hardware: str
    devices: int
    budget_hours: float
    tokens_per_param: float
    vocab_size: int
    # choices
    depth: int
    model: dict[str, Any]  # DecoderConfig fields (the shape), as pretrain.model takes them
    parameters: int
    flops_per_token: int
    seq_len: int
    processes: int
    micro_batch_size: int
    accumulation: int
    batch_tokens: int
    max_steps: int
    train_tokens: int
    epochs: float
    activation_checkpointing: bool
    fsdp: bool
    memory_bytes: int
    memory_states_bytes: int
    memory_activations_bytes: int
    memory_usable_bytes: int
    # predictions
    predicted_tokens_per_second: float
    predicted_seconds: float
    predicted_mfu: float | None
    predicted_cost_usd: float | None
    reasons: list[str]

    def pretrain_fields(self) -> dict[str, Any]:
        """What ``pretrain.preset: auto`` applies to the pretrain config."""
        return {
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "batch_tokens": self.batch_tokens,
            "max_steps": self.max_steps,
        }

    def text(self) -> str:
        """The plan as a few lines, then its reasons."""
        m = self.model
        device = (
            "cpu"
            if self.hardware == "cpu"
            else f"{self.devices} × {self.hardware}"
            + (" (FSDP)" if self.fsdp else " (DDP)" if self.processes > 1 else "")
        )
        mfu = "" if self.predicted_mfu is None else f", MFU {self.predicted_mfu:.0%} (assumed)"
        cost = "" if self.predicted_cost_usd is None else f", ~${self.predicted_cost_usd:,.2f}"
        lines = [
            f"llmflow plan: {self.data_tokens:,} training tokens on {device},"
            f" budget {self.budget_hours:.2f} h",
            f"  model       depth {self.depth}: width {m['hidden_size']}, {m['num_layers']}"
            f" layers, {m['num_heads']} heads, seq {self.seq_len}, vocab {self.vocab_size:,}:"
            f" {self.parameters:,} parameters, {self.flops_per_token / 1e6:,.1f} MFLOP/token",
            f"  tokens      {self.train_tokens:,} ({self.train_tokens / self.parameters:.1f} per"
            f" parameter, target {self.tokens_per_param:g}) = {self.epochs:.2f} epochs of the data",
            f"  batch       {self.batch_tokens:,} tokens/step = micro batch"
            f" {self.micro_batch_size} × seq {self.seq_len} × {self.processes} process(es) ×"
            f" {self.accumulation} accumulation; {self.max_steps:,} steps",
            f"  memory      ~{_gib(self.memory_bytes)} per device of"
            f" {_gib(self.memory_usable_bytes)} usable (states"
            f" {_gib(self.memory_states_bytes)}, activations"
            f" {_gib(self.memory_activations_bytes)}); activation checkpointing"
            f" {'on' if self.activation_checkpointing else 'off'}, FSDP"
            f" {'on' if self.fsdp else 'off'}",
            f"  predicted   ~{_duration(self.predicted_seconds)} at"
            f" ~{self.predicted_tokens_per_second:,.0f} tokens/s{mfu}{cost} (a prediction)",
            "  why:",
        ]
        lines += [f"  - {reason}" for reason in self.reasons]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024**2:.1f} MiB"


def _flops(flops: float) -> str:
    return f"{flops / 1e12:,.0f} TFLOP/s" if flops >= 1e13 else f"{flops / 1e9:,.1f} GFLOP/s"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _pow2_floor(x: float) -> int:
    return 1 if x < 1 else 2 ** int(math.floor(math.log2(x)))


def _fit_memory(
    c: DecoderConfig,
    seq_len: int,
    max_micro: int,
    hw: Hardware,
    processes: int,
    allow_checkpointing: bool,
    allow_fsdp: bool,
) -> tuple[int, MemoryEstimate] | None:
    """The largest power-of-two micro batch ≤ max_micro that fits, and its estimate: without
    checkpointing if one sequence fits, else with it; FSDP when the states exceed a device."""
    usable, bf16 = hw.usable_bytes, hw.gpu
    fsdp = False
    states = memory_estimate(c, seq_len, 1, bf16=bf16, processes=processes).states
    if states >= usable:
        if not (allow_fsdp and processes > 1):
            return None
        fsdp = True
    for checkpointing in (False, True) if allow_checkpointing else (False,):
        micro = max_micro
        while micro >= 1:
            estimate = memory_estimate(
                c,
                seq_len,
                micro,
                bf16=bf16,
                processes=processes,
                fsdp=fsdp,
                checkpointing=checkpointing,
            )
            if estimate.total <= usable:
                return micro, estimate
            micro //= 2
    return None


def plan_run(
    data_tokens: int,
    hw: Hardware,
    *,
    hours: float | None = None,
    budget_usd: float | None = None,
    usd_per_gpu_hour: float | None = None,
    tokens_per_param: float = 10.5,
    max_epochs: float = 4.0,
    vocab_size: int = 32768,
    seq_len: int | None = None,
    depth: int | None = None,
    allow_checkpointing: bool = True,
    allow_fsdp: bool = True,
) -> Plan:
    """Plan a pretraining run (the rules are in the module's docstring)."""
    if data_tokens < 1:
        raise PlanError(f"--tokens {data_tokens}: the dataset has no training tokens")
    if tokens_per_param <= 0:
        raise PlanError(f"--tokens-per-param {tokens_per_param}: must be positive")
    if max_epochs <= 0:
        raise PlanError(f"max_epochs {max_epochs}: must be positive")
    if vocab_size < 2:
        raise PlanError(f"--vocab-size {vocab_size}: must be at least 2")
    if depth is not None and not MIN_DEPTH <= depth <= MAX_DEPTH:
        raise PlanError(f"--depth {depth}: must be within {MIN_DEPTH}..{MAX_DEPTH}")
    reasons: list[str] = []
    devices = hw.count
    if budget_usd is not None:
        if hours is not None:
            raise PlanError("--hours and --budget-usd: give one budget, not both")
        if budget_usd <= 0:
            raise PlanError(f"--budget-usd {budget_usd}: must be positive")
        if not usd_per_gpu_hour or usd_per_gpu_hour <= 0:
            raise PlanError("--budget-usd needs a positive --usd-per-gpu-hour")
        hours = budget_usd / (usd_per_gpu_hour * devices)
        reasons.append(
            f"budget: ${budget_usd:,.2f} at ${usd_per_gpu_hour:,.2f} per device-hour on"
            f" {devices} device(s) buys {hours:.2f} h"
        )
    if hours is None:
        hours = 1.0
    if hours <= 0:
        raise PlanError(f"--hours {hours}: must be positive")
    seconds = hours * 3600
    flops = hw.sustained_flops
    budget_flops = seconds * flops
    if hw.gpu:
        reasons.append(
            f"throughput: {devices} × {hw.name} at {hw.peak_flops / 1e12:,.0f} TFLOP/s bf16 dense"  # type: ignore[operator]
            f" peak × {hw.mfu:.2f} MFU (assumed, with torch.compile) = {flops / 1e12:,.0f}"
            " TFLOP/s sustained"
        )
    else:
        reasons.append(
            f"throughput: {flops / 1e9:.1f} GFLOP/s of model FLOPs on the CPU, measured"
            " (bench/train_throughput.md: tiny, 2-core EPYC, float32); more cores go faster"
        )
    processes = devices if hw.gpu else 1

    base_seq = seq_len or (GPU_SEQ_LEN if hw.gpu else CPU_SEQ_LEN)
    seq = base_seq
    if seq_len is None:
        seq = min(base_seq, max(8, _pow2_floor(data_tokens / 16)))
        reasons.append(
            f"sequence length {seq}: {'nanochat' if hw.gpu else 'the tiny preset'}'s"
            f" {base_seq}" + (", cut to 1/16 of the data" if seq < base_seq else "")
        )

    def candidate(d: int) -> tuple[DecoderConfig, int, int]:
        c = shape_for_depth(d, vocab_size, seq)
        return c, parameter_count(c), flops_per_token(c, seq)

    def fits(c: DecoderConfig) -> bool:
        return _fit_memory(c, seq, 1, hw, processes, allow_checkpointing, allow_fsdp) is not None

    data_cap = max_epochs * data_tokens
    depths = [depth] if depth is not None else list(range(MIN_DEPTH, MAX_DEPTH + 1))
    chosen: int | None = None
    limits: list[str] = []
    for d in depths:
        c, n, f = candidate(d)
        need = tokens_per_param * n
        if not fits(c):
            limits.append(f"depth {d} does not fit {hw.name}'s memory")
            break
        if need * f > budget_flops:
            limits.append(
                f"depth {d} ({n:,} parameters) would need {need * f / flops / 3600:.2f} h for"
                f" its {need:,.0f} tokens"
            )
            break
        if need > data_cap:
            limits.append(
                f"depth {d} ({n:,} parameters) would need {need / data_tokens:.1f} epochs of"
                f" the data, more than {max_epochs:g}"
            )
            break
        chosen = d
    if depth is not None:
        c, n, f = candidate(depth)
        if not fits(c):
            raise PlanError(
                f"--depth {depth}: {n:,} parameters do not fit {devices} × {hw.name}"
                f" ({_gib(hw.usable_bytes)} usable each)"
                + ("" if allow_fsdp else "; FSDP is not allowed")
            )
        chosen_depth = depth
        reasons.append(f"depth {depth}: given")
    elif chosen is not None:
        chosen_depth = chosen
        reasons.append(
            f"depth {chosen}: the deepest whose {tokens_per_param:g} tokens per parameter train"
            f" within {hours:.2f} h, in at most {max_epochs:g} epochs and in memory"
            + (f"; deeper: {limits[0]}" if limits else f"; {MAX_DEPTH} is the deepest planned")
        )
    else:
        chosen_depth = MIN_DEPTH
        if not fits(candidate(MIN_DEPTH)[0]):
            raise PlanError(f"not even depth {MIN_DEPTH} fits {devices} × {hw.name}'s memory")
        reasons.append(
            f"depth {MIN_DEPTH}: the smallest planned, as no depth meets the budget, the"
            f" {max_epochs:g}-epoch limit and the memory ({limits[0]})"
        )
    c, n, f = candidate(chosen_depth)
    reasons.append(
        f"shape: nanochat's rule, width = {WIDTH_PER_LAYER} × depth = {c.hidden_size}, heads of"
        f" {HEAD_DIM} ({c.num_heads}), SwiGLU width {c.ffn_size}, tied embeddings"
    )

    # training tokens
    want = tokens_per_param * n
    budget_tokens = budget_flops / f
    if depth is None and chosen is not None:
        tokens = want
        reasons.append(f"tokens: {tokens_per_param:g} per parameter × {n:,} = {want:,.0f}")
    else:
        repeat_cap = max(REPEAT_CAP_EPOCHS, max_epochs)
        tokens = min(want, budget_tokens, repeat_cap * data_tokens)
        bound = (
            "the ratio"
            if tokens == want
            else "the time budget"
            if tokens == budget_tokens
            else f"a cap of {repeat_cap:g} epochs (more repetition adds next to nothing)"
        )
        reasons.append(
            f"tokens: {tokens:,.0f}, bound by {bound}; {tokens / n:.2f} per parameter against the"
            f" {tokens_per_param:g} wanted"
        )

    # batch
    unit = seq * processes
    target = max(unit, min(MAX_BATCH_TOKENS, _pow2_floor(tokens / MIN_STEPS)))
    max_micro = max(1, min(MAX_MICRO_BATCH, target // unit))
    fit = _fit_memory(c, seq, max_micro, hw, processes, allow_checkpointing, allow_fsdp)
    assert fit is not None  # depth chosen above fits at one sequence
    micro, estimate = fit
    accumulation = max(1, round(target / (micro * unit)))
    batch_tokens = accumulation * micro * unit
    steps = max(1, math.ceil(tokens / batch_tokens))
    train_tokens = steps * batch_tokens
    epochs = train_tokens / data_tokens
    usable_rule = (
        "90% of the GPU less 1 GiB" if hw.gpu else f"80% of {hw.memory_gib:g} GiB less 1 GiB"
    )
    reasons.append(
        f"batch: {target:,} tokens wanted (a power of two ≤ tokens / {MIN_STEPS}, at most"
        f" {MAX_BATCH_TOKENS:,}); micro batch {micro}: the largest power of two ≤"
        f" {max_micro} that fits {_gib(hw.usable_bytes)} usable per device"
        f" ({usable_rule}); {accumulation} accumulation step(s); {steps:,} steps"
    )
    if estimate.fsdp:
        reasons.append(
            f"FSDP: the {_gib(16 * n)} of weights, gradients and AdamW state (16 bytes a"
            f" parameter) do not fit one {hw.name}; sharded over {processes} it is"
            f" {_gib(estimate.states)} each, full-size gradients included"
            " (pretrain.parallelism: fsdp)"
        )
    if estimate.checkpointing:
        reasons.append(
            "activation checkpointing: one sequence's activations do not fit beside the states"
            " without it (pretrain.activation_checkpointing: true)"
        )
    if epochs > 1:
        reasons.append(
            f"epochs: {train_tokens:,} tokens are {epochs:.1f} passes over the"
            f" {data_tokens:,} of the data"
            + (
                f", more than {max_epochs:g}: more data would be better spent than a bigger model"
                if epochs > max_epochs
                else ""
            )
        )
    tokens_per_second = flops / f
    predicted = train_tokens / tokens_per_second
    cost = predicted / 3600 * devices * usd_per_gpu_hour if usd_per_gpu_hour else None
    reasons.append(
        f"prediction: {train_tokens:,} tokens × {f / 1e6:,.2f} MFLOP/token at"
        f" {_flops(flops)} = {_duration(predicted)} of the {hours:.2f} h budget"
    )
    return Plan(
        data_tokens=data_tokens,
        hardware=hw.name,
        devices=devices,
        budget_hours=hours,
        tokens_per_param=tokens_per_param,
        vocab_size=c.vocab_size,
        depth=chosen_depth,
        model={
            "hidden_size": c.hidden_size,
            "num_layers": c.num_layers,
            "num_heads": c.num_heads,
            "max_seq_len": seq,
        },
        parameters=n,
        flops_per_token=f,
        seq_len=seq,
        processes=processes,
        micro_batch_size=micro,
        accumulation=accumulation,
        batch_tokens=batch_tokens,
        max_steps=steps,
        train_tokens=train_tokens,
        epochs=epochs,
        activation_checkpointing=estimate.checkpointing,
        fsdp=estimate.fsdp,
        memory_bytes=estimate.total,
        memory_states_bytes=estimate.states,
        memory_activations_bytes=estimate.activations,
        memory_usable_bytes=hw.usable_bytes,
        predicted_tokens_per_second=tokens_per_second,
        predicted_seconds=predicted,
        predicted_mfu=hw.mfu,
        predicted_cost_usd=cost,
        reasons=reasons,
    )


def plan_from_manifest(manifest: dict[str, Any], settings: PlanSettings, **options: Any) -> Plan:
    """The plan for a tokenize manifest's training tokens and vocabulary."""
    tokens = int(manifest.get("tokens", {}).get("train", 0))
    tokenizer = manifest.get("tokenizer") or {}
    return plan_run(
        tokens,
        hardware(settings.hardware, settings.gpus),
        hours=settings.hours,
        tokens_per_param=settings.tokens_per_param,
        max_epochs=settings.max_epochs,
        vocab_size=int(tokenizer.get("vocab_size", 32768)),
        **options,
    )
