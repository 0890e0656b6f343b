"""AdamW or Muon for pretraining: final validation loss and seconds per step, same data and steps.

Trains the ``tiny`` preset on the CPU with each optimizer (``pretrain.optimizer``) for the same
steps on the same token shards, for each seed, interleaved so both see the same machine load: the
Python language reference that ships with CPython, through the real tokenizer and tokenize stages
(``tests/document_datasets.build_token_dirs``, what the training tests read). Every setting but the
optimizer is PretrainConfig's default (lr 3e-3, warmup 20, cosine to 10%, 4,096 tokens a step);
Muon takes ``muon_lr`` for the blocks' matrices. It also times ``optimizer.step()`` alone on the
same model. Writes ``bench/optimizers.md``.

    python bench/optimizers.py [--steps 100] [--seeds 0,1] [--vocab 1024] [--threads 1]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from document_datasets import build_token_dirs  # noqa: E402

from llmflow.models.decoder import Decoder  # noqa: E402
from llmflow.tasks.train import pretrain  # noqa: E402
from llmflow.tasks.train.optimizers import build_optimizer  # noqa: E402
from llmflow.tasks.train.train_config import PretrainConfig  # noqa: E402
from llmflow.tasks.train.trainer import train  # noqa: E402

OPTIMIZERS = ("adamw", "muon")


def run(dirs: tuple[str, str], run_root: Path, optimizer: str, seed: int, args: Any) -> dict:
    """One training run; its result with the seconds per step of steps 2..N-1 (the last one
    also evaluates and saves, the first warms up)."""
    config = PretrainConfig(
        preset="tiny",
        optimizer=optimizer,  # type: ignore[arg-type]
        muon_lr=args.muon_lr,
        seed=seed,
        max_steps=args.steps,
        eval_interval=args.steps,
        checkpoint_interval=args.steps,
        keep_checkpoints=1,
        log_interval=10,
        sample_tokens=8,
        device="cpu",
    )
    job, _ = pretrain.plan_job(config, dirs[0], dirs[1], str(run_root / f"{optimizer}-{seed}"))
    stamps: dict[int, float] = {}
    result = train(job, on_step=lambda step, total: stamps.setdefault(step, time.perf_counter()))
    first, last = 1, args.steps - 1
    result["s_per_step"] = (stamps[last] - stamps[first]) / (last - first)
    return result


def step_time(optimizer: str, vocab: int, repeats: int = 30) -> float:
    """Milliseconds of one ``optimizer.step()`` on the tiny preset with random gradients."""
    config = PretrainConfig(preset="tiny", optimizer=optimizer)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = Decoder(config.decoder_config(vocab_size=vocab))
    opt = build_optimizer(model, config, torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()  # the state is made on the first step
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    return 1000 * (time.perf_counter() - start) / repeats


def mean_sd(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--vocab", type=int, default=1024, help="the BPE tokenizer's vocabulary")
    parser.add_argument("--muon-lr", type=float, default=PretrainConfig().muon_lr)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: no spinning on a busy machine)"
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=str(HERE / "optimizers.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-optimizers-"))
    data = work / "data"
    if not (data / "tokenize").exists():
        build_token_dirs(data, vocab_size=args.vocab)
    dirs = (str(data / "tokenize"), str(data / "tokenizer"))

    started = time.perf_counter()
    results: dict[str, list[dict]] = {name: [] for name in OPTIMIZERS}
    for seed in seeds:
        for name in OPTIMIZERS:
            result = run(dirs, work / "runs", name, seed, args)
            results[name].append(result)
            print(
                f"{name} seed {seed}: val loss {result['val_loss']:.4f},"
                f" {result['s_per_step']:.3f} s/step",
                flush=True,
            )
    step_ms = {name: step_time(name, args.vocab) for name in OPTIMIZERS}
    wall = (time.perf_counter() - started) / 60

    first = results[OPTIMIZERS[0]][0]
    command = (
        f"python bench/optimizers.py --steps {args.steps} --seeds {args.seeds}"
        f" --vocab {args.vocab} --muon-lr {args.muon_lr} --threads {args.threads}"
    )
    lines = [
        "# AdamW or Muon for pretraining",
        "",
        f"    {command}",
        "",
        f"The `tiny` preset ({first['parameters']:,} parameters, vocabulary {args.vocab}) trained"
        f" on the CPU for {args.steps} steps of 4,096 tokens on the same token shards (the Python"
        f" language reference shipped with CPython, {first['train_tokens']:,} training tokens,"
        " through the real tokenizer and tokenize stages; a run reads them"
        f" {args.steps * 4096 / first['train_tokens']:.1f} times), seeds"
        f" {', '.join(map(str, seeds))}. Every setting but the optimizer is PretrainConfig's"
        " default: AdamW lr 3e-3 (betas 0.9/0.95, weight decay 0.1 on matrices), warmup 20"
        " steps, cosine to 10%. Muon (torch.optim.Muon, Nesterov momentum 0.95, 5 Newton–Schulz"
        f" steps, no weight decay) takes the blocks' matrices at muon_lr {args.muon_lr}, scaled"
        " by sqrt(max(1, rows/cols)); embeddings, head and norms stay on that AdamW.",
        "",
        f"Machine: {os.cpu_count()} CPU cores (AVX2, no native bfloat16 matmul), shared with other"
        f" jobs (the seconds vary with their load; both optimizers ran interleaved); torch"
        f" {torch.__version__} on {args.threads} thread(s). Wall {wall:.1f} min.",
        "",
        "| optimizer | final validation loss | validation bits per byte | s per step |"
        " optimizer.step() ms | per seed (val loss, s per step) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name in OPTIMIZERS:
        rows = results[name]
        val = [r["val_loss"] for r in rows]
        per_seed = "; ".join(f"{r['val_loss']:.4f}, {r['s_per_step']:.3f}" for r in rows)
        lines.append(
            f"| {name} | {mean_sd(val, 4)} | {mean_sd([r['val_bpb'] for r in rows], 4)} |"
            f" {mean_sd([r['s_per_step'] for r in rows], 3)} | {step_ms[name]:.1f} |"
            f" {per_seed} |"
        )
    lines += [
        "",
        "Mean ± standard deviation over the seeds. Seconds per step: steps 2 to N-1 (the last"
        " also evaluates and saves), forward, backward and optimizer. optimizer.step() alone:"
        " the mean of 30 steps on the same model with random gradients.",
        "",
        "A tiny model for a few hundred thousand tokens on two CPU cores says little about GPU"
        " scale: Muon's Newton–Schulz iterations are bfloat16 matmuls, cheap on a GPU's tensor"
        " cores and slow on a CPU, and Muon's reported gains (modded-nanogpt, nanochat, Moonshot)"
        " are in tokens to a target loss for models of 100M parameters and more. Neither"
        " learning rate was tuned for this setting.",
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
