"""Benchmark: training throughput (tokens/s, MFU) of llmflow's decoder against nanoGPT's GPT.

The question it answers is whether llmflow's Llama-style decoder, trained the way
``llmflow.tasks.train.trainer`` trains it, keeps up with the well-known fast baseline at the same
size:
nanoGPT's ``model.py`` (GPT-2 architecture: learned positions, LayerNorm, GELU MLP, fused qkv),
with the same layers, heads, width, vocabulary and sequence length, on the same device and batch.
The reference is re-written here from nanoGPT's source (``GPT`` below) rather than vendored or
downloaded, so the bench runs offline and nothing of nanoGPT ships in the package.

Both models run the one ``train_step`` (forward, float32 cross-entropy, backward, gradient clip
1.0, AdamW, ``zero_grad(set_to_none=True)``), so the only difference measured is the model. On
CUDA: bf16 autocast, fused AdamW, TF32 matmuls, ``torch.cuda.synchronize`` around every timed
step; on the CPU: float32 (what the trainer does there). Batches are random token ids from a
fixed seed: data loading is not what is measured. The two models' steps alternate, so a
neighbour's load on a shared machine slows both alike instead of whichever ran second.

MFU = tokens/s x FLOPs per token / the device's peak: ``Decoder.flops_per_token`` for llmflow and
the same PaLM formula nanoGPT's ``estimate_mfu`` uses for the reference (6 x matmul weights +
12 x layers x width x seq_len). The peak comes from the trainer's table of GPUs (bf16 dense), or
``--peak-flops``; on a CPU none is known and MFU reads n/a.

Peak memory (CUDA only; n/a on a CPU) is each model's own: its weights and optimizer state plus
the most ``torch.cuda.max_memory_allocated`` rose during one of its timed steps (its activations
and gradients), the peak counter reset with ``torch.cuda.reset_peak_memory_stats`` before each
step. Both models are resident at once (their steps alternate), so the device-wide peak would
count the other model's weights too.

Run (from the repository root)::

    /tmp/venv/bin/python bench/train_throughput.py --preset tiny
    python bench/train_throughput.py --preset gpt2-small --batch-size 16   # on a GPU

``--help`` lists the options; results are in ``bench/train_throughput.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmflow.models.decoder import PRESETS, Decoder, DecoderConfig
from llmflow.tasks.core.shards import write_json_atomic
from llmflow.tasks.train.train_config import PretrainConfig
from llmflow.tasks.train.train_metrics import peak_flops
from llmflow.tasks.train.trainer import build_optimizer

# The reference has no grouped-query attention and a 4x GELU MLP, so only presets it can mirror
# (llama-1b's GQA and 8192-wide SwiGLU would make it a different model) are offered.
BENCH_PRESETS = ("tiny", "gpt2-small")
DEFAULT_BATCH = {"tiny": 8, "gpt2-small": 16}
LR, WEIGHT_DECAY, BETAS, GRAD_CLIP = 6e-4, 0.1, (0.9, 0.95), 1.0
GIB = 1024**3
# The printed table's columns (``format_table``); the GPU check's report shows the same table.
TABLE_COLUMNS = (
    "compile",
    "llmflow tokens/s",
    "llmflow MFU",
    "nanoGPT tokens/s",
    "nanoGPT MFU",
    "llmflow / nanoGPT",
    "peak memory llmflow / nanoGPT",
)


# --------------------------------------------------------------------------------------------
# The reference: nanoGPT's model.py (karpathy/nanoGPT), re-written at train.py's defaults
# (bias=False, dropout=0.0). Dropout modules are left out: at p=0 they do nothing but cost a call
# in eager mode, so leaving them out can only make the reference faster, never flatter llmflow.
# --------------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    block_size: int
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.n_head, self.n_embd = config.n_head, config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class GPTMLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class GPTBlock(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        # nanoGPT's LayerNorm(bias=False): F.layer_norm with a weight and no bias, eps 1e-5.
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=False)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=False)
        self.mlp = GPTMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT: ``forward`` returns the logits of every position (its ``targets`` path)
    and leaves the loss to ``train_step``, so both models share the loss code."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(config.vocab_size, config.n_embd),
                "wpe": nn.Embedding(config.block_size, config.n_embd),
                "h": nn.ModuleList(GPTBlock(config) for _ in range(config.n_layer)),
                "ln_f": nn.LayerNorm(config.n_embd, bias=False),
            }
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def flops_per_token(self, seq_len: int) -> int:
        """nanoGPT's ``estimate_mfu`` count: parameters less the position table (a lookup, not a
        matmul; the tied token table counts once, as the output projection)."""
        c = self.config
        n = sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()
        return 6 * n + 12 * c.n_layer * c.n_embd * seq_len

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device: str
    ) -> torch.optim.AdamW:
        """nanoGPT's: decay on >= 2-dim parameters, none on the rest, fused on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device == "cuda")


# --------------------------------------------------------------------------------------------
# The measurement.
# --------------------------------------------------------------------------------------------

Batch = tuple[torch.Tensor, torch.Tensor]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """One optimizer step as ``llmflow.tasks.train.trainer`` takes it (one micro-batch): the same
    code
    for both models, so the comparison is of the models alone."""
    x, y = batch
    with autocast():
        logits = model(x)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


@dataclass
class Contender:
    """One model under test, and what was measured of it."""

    name: str
    compiled: bool
    flops_per_token: int
    params: int
    model: nn.Module | None = field(default=None, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, repr=False)
    step_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None  # CUDA only: see the module's docstring
    warmup_s: float = 0.0
    error: str | None = None


def decoder_config(preset: str, vocab_size: int | None) -> DecoderConfig:
    base = PRESETS[preset]
    if vocab_size is None:
        return base
    return DecoderConfig(**{**base.model_dump(), "vocab_size": vocab_size})


def build_llmflow(config: DecoderConfig, device: torch.device, compiled: bool) -> Contender:
    torch.manual_seed(0)
    model = Decoder(config).to(device)
    # The trainer's own optimizer builder, so the bench measures what a training run runs.
    optimizer = build_optimizer(
        model,
        PretrainConfig(lr=LR, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1]),
        device,
    )
    return Contender(
        "llmflow",
        compiled,
        model.flops_per_token(0),  # the seq_len term is added by the caller
        model.num_parameters(),
        torch.compile(model) if compiled else model,
        optimizer,
    )


def build_reference(config: DecoderConfig, device: torch.device, compiled: bool) -> Contender:
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(
            block_size=config.max_seq_len,
            vocab_size=config.vocab_size,
            n_layer=config.num_layers,
            n_head=config.num_heads,
            n_embd=config.hidden_size,
        )
    ).to(device)
    optimizer = model.configure_optimizers(WEIGHT_DECAY, LR, BETAS, device.type)
    return Contender(
        "nanoGPT",
        compiled,
        model.flops_per_token(0),
        sum(p.numel() for p in model.parameters()),
        torch.compile(model) if compiled else model,
        optimizer,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_bytes(c: Contender) -> int:
    """The contender's weights and optimizer state (exp_avg, exp_avg_sq, step), in bytes."""
    assert c.model is not None and c.optimizer is not None
    tensors = list(c.model.parameters())
    tensors += [t for s in c.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors)


def short_error(exc: BaseException) -> str:
    """The first line of the exception, for a table cell; the traceback goes to stderr."""
    traceback.print_exception(exc, file=sys.stderr)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:160]


def measure(
    contenders: list[Contender],
    batches: list[Batch],
    warmup: int,
    steps: int,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> None:
    """Warm each model up (compilation happens there), then time the steps, alternating models.

    A failure (say torch.compile without a compiler) is recorded on its contender, and the
    others go on."""
    for c in contenders:
        start = time.perf_counter()
        try:
            for i in range(warmup):
                train_step(c.model, c.optimizer, batches[i % len(batches)], autocast)
            sync(device)
        except Exception as exc:  # any failure becomes the row's error
            c.error = short_error(exc)
        c.warmup_s = time.perf_counter() - start
    for i in range(steps):
        batch = batches[(warmup + i) % len(batches)]
        for c in contenders:
            if c.error:
                continue
            try:
                sync(device)
                if device.type == "cuda":
                    own = resident_bytes(c)
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                start = time.perf_counter()
                train_step(c.model, c.optimizer, batch, autocast)
                sync(device)
                c.step_s.append(time.perf_counter() - start)
                if device.type == "cuda":
                    peak = own + torch.cuda.max_memory_allocated(device) - before
                    c.peak_bytes = max(c.peak_bytes or 0, peak)
            except Exception as exc:
                c.error = short_error(exc)


def profile(
    contenders: list[Contender],
    batch: Batch,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    steps: int = 3,
) -> dict[str, str]:
    """torch.profiler's operator table of a few (already warm) steps of each model: where the
    time goes when one model is slower."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU]
    sort = "self_cpu_time_total"
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        sort = "self_cuda_time_total"
    tables = {}
    for c in contenders:
        if c.error:
            continue
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                train_step(c.model, c.optimizer, batch, autocast)
            sync(device)
        tables[f"{c.name} compile={'on' if c.compiled else 'off'}"] = prof.key_averages().table(
            sort_by=sort, row_limit=18, max_name_column_width=48
        )
    return tables


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    return f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} threads)"


def summarise(c: Contender, tokens_per_step: int, peak: float | None) -> dict:
    row = {
        "model": c.name,
        "compile": "on" if c.compiled else "off",
        "params": c.params,
        "flops_per_token": c.flops_per_token,
        "warmup_s": round(c.warmup_s, 2),
        "error": c.error,
        "steps_measured": len(c.step_s),
        "step_s_median": None,
        "step_s_mean": None,
        "step_s_min": None,
        "tokens_per_s": None,
        "tokens_per_s_best": None,
        "model_flops_per_s": None,
        "mfu": None,
        "peak_memory_gib": None if c.peak_bytes is None else c.peak_bytes / GIB,
    }
    if c.step_s and not c.error:
        median = statistics.median(c.step_s)
        row["step_s_median"] = median
        row["step_s_mean"] = statistics.fmean(c.step_s)
        # The fastest step: on a shared machine, the nearest to what the device does unhindered.
        row["step_s_min"] = min(c.step_s)
        row["tokens_per_s"] = tokens_per_step / median
        row["tokens_per_s_best"] = tokens_per_step / row["step_s_min"]
        row["model_flops_per_s"] = row["tokens_per_s"] * c.flops_per_token
        if peak:
            row["mfu"] = row["tokens_per_s"] * c.flops_per_token / peak
    return row


def format_table(rows: list[dict]) -> str:
    """One line per compile mode, the two models side by side, ratio llmflow / nanoGPT, and each
    model's peak memory (n/a on a CPU)."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|---|" + "---:|" * (len(TABLE_COLUMNS) - 1)]

    def cell_tps(r: dict) -> str:
        return f"error: {r['error']}" if r["error"] else f"{r['tokens_per_s']:,.0f}"

    def cell_mfu(r: dict) -> str:
        return "n/a" if r["error"] or r["mfu"] is None else f"{100 * r['mfu']:.1f}%"

    def cell_memory(ours: dict, ref: dict) -> str:
        gib = (ours["peak_memory_gib"], ref["peak_memory_gib"])
        if None in gib:
            return "n/a"
        return f"{gib[0]:.2f} / {gib[1]:.2f} GiB"

    for mode in ("off", "on"):
        ours = next((r for r in rows if r["model"] == "llmflow" and r["compile"] == mode), None)
        ref = next((r for r in rows if r["model"] == "nanoGPT" and r["compile"] == mode), None)
        if ours is None or ref is None:
            continue
        ratio = "n/a"
        if ours["tokens_per_s"] and ref["tokens_per_s"]:
            ratio = f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x"
        lines.append(
            f"| {mode} | {cell_tps(ours)} | {cell_mfu(ours)} | {cell_tps(ref)} | {cell_mfu(ref)}"
            f" | {ratio} | {cell_memory(ours, ref)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=BENCH_PRESETS, default="tiny")
    parser.add_argument("--batch-size", type=int, help="sequences per step (tiny 8, gpt2 16)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (the preset's max)")
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps (compile)")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument("--vocab-size", type=int, help="override the preset's vocabulary")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables")
    parser.add_argument("--seed", type=int, default=1337, help="random token batches")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the results here")
    args = parser.parse_args(argv)

    config = decoder_config(args.preset, args.vocab_size)
    batch_size = args.batch_size or DEFAULT_BATCH[args.preset]
    seq_len = args.seq_len or config.max_seq_len
    for flag, value in (("--batch-size", batch_size), ("--steps", args.steps)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be 0 or more, got {args.warmup_steps}")
    if not 1 <= seq_len <= config.max_seq_len:
        parser.error(
            f"--seq-len {seq_len} must be between 1 and the preset's max_seq_len "
            f"{config.max_seq_len}"
        )
    if args.peak_flops is not None and args.peak_flops <= 0:
        parser.error(f"--peak-flops must be positive, got {args.peak_flops}")

    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    def autocast() -> contextlib.AbstractContextManager:
        if device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    peak = peak_flops(device, args.peak_flops)
    generator = torch.Generator().manual_seed(args.seed)
    batches = []
    for _ in range(4):
        ids = torch.randint(config.vocab_size, (batch_size, seq_len + 1), generator=generator)
        ids = ids.to(device)
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    tokens_per_step = batch_size * seq_len
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]

    header = (
        f"preset {args.preset}: {config.num_layers} layers, {config.num_heads} heads, width "
        f"{config.hidden_size}, vocab {config.vocab_size}; batch {batch_size} x seq {seq_len}; "
        f"device {device_name(device)}; torch {torch.__version__}; peak "
        f"{f'{peak:.3g} FLOP/s' if peak else 'unknown (MFU n/a)'}"
    )
    print(header, flush=True)
    rows: list[dict] = []
    profiles: dict[str, str] = {}
    for compiled in modes:
        contenders = []
        for build in (build_llmflow, build_reference):
            contender = build(config, device, compiled)
            contender.flops_per_token += 12 * config.num_layers * config.hidden_size * seq_len
            contenders.append(contender)
        measure(contenders, batches, args.warmup_steps, args.steps, device, autocast)
        if args.profile:
            profiles.update(profile(contenders, batches[0], device, autocast))
        for c in contenders:
            rows.append(summarise(c, tokens_per_step, peak))
            r = rows[-1]
            status = r["error"] or (
                f"{r['tokens_per_s']:,.0f} tokens/s median"
                f" (best step {r['tokens_per_s_best']:,.0f}),"
                f" {r['model_flops_per_s'] / 1e9:,.1f} GFLOP/s, {r['params'] / 1e6:.2f}M params"
            )
            print(
                f"  {c.name:8s} compile={r['compile']:3s} warmup {r['warmup_s']:.1f}s: {status}",
                flush=True,
            )
        # Free the models (and compiled graphs) before the next mode builds its own.
        del contenders
        gc.collect()
        torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    for title, table in profiles.items():
        print(f"\n### torch.profiler: {title}\n{table}")
    table = format_table(rows)
    print("\n" + table)
    result = {
        "header": header,
        "preset": args.preset,
        "model_config": config.model_dump(),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tokens_per_step": tokens_per_step,
        "warmup_steps": args.warmup_steps,
        "steps": args.steps,
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "peak_flops": peak,
        "settings": asdict(
            _Settings(
                autocast="bfloat16" if device.type == "cuda" else "float32",
                fused_adamw=device.type == "cuda",
                tf32=device.type == "cuda",
            )
        ),
        "rows": rows,
        "table": table,
    }
    if args.json:
        write_json_atomic(str(args.json), result)
    return result


@dataclass
class _Settings:
    autocast: str
    fused_adamw: bool
    tf32: bool
    lr: float = LR
    weight_decay: float = WEIGHT_DECAY
    betas: tuple[float, float] = BETAS
    grad_clip: float = GRAD_CLIP


if __name__ == "__main__":
    main()
