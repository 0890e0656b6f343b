"""The GPU check's pretraining legs and its report (``bench/gpu_check.sh`` runs them), by mode:

``--mode data``: token shards made offline by llmflow's real tokenizer and tokenize stages from
text that ships with Python (the language reference in ``pydoc_data.topics`` and the standard
library's sources); ``--mode pretrain`` reuses them.

``--mode pretrain``: one pretraining leg through llmflow's real pretrain stage on those shards:
the stage's own job planning (``pretrain.plan_job``) and launcher (``pretrain.launch``) run the
trainer with ``pretrain.parallelism=<leg>``. A leg whose parallelism the config rejects is
reported as skipped. tokens/s and MFU are the trainer's own (``metrics.jsonl``), the first logged
interval (compilation) left out; peak memory is ``torch.cuda.max_memory_allocated``.

``--mode report``: the markdown of the whole check from the JSON the steps wrote: the throughput
of llmflow's decoder against nanoGPT's GPT (``bench/train_throughput.py --json``: its header line
and table, with tokens/s, MFU, the ratio llmflow / nanoGPT and each model's peak memory), the
pretraining legs, and the planner's prediction (``llmflow plan``) beside what was measured.

The throughput itself is ``bench/train_throughput.py``'s, not measured here. On a CPU every mode
runs at tiny sizes, which is how ``GPU_CHECK_CPU_SMOKE=1 bench/gpu_check.sh`` tries the check::

    python bench/gpu_throughput.py --mode data --text-mb 0 --vocab-size 512
    python bench/gpu_throughput.py --mode pretrain --device cpu --preset tiny --micro-batch 2 \
        --seq-len 64 --no-compile --dtype float32 --accumulation 1 --text-mb 0 --vocab-size 512 \
        --steps 3 --json leg.json
    python bench/gpu_throughput.py --mode report --results throughput.json leg.json --md out.md
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import shutil
import sys
import sysconfig
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from llmflow.models.decoder import PRESETS
from llmflow.tasks.train.train_config import PretrainConfig

GIB = 1024**3


# --------------------------------------------------------------------------------------------
# What the modes share.
# --------------------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (a CPU build, or no driver)")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return name


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """GPU memory allocated at the peak since the last reset; None on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    return None


def host_rss_gib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def fmt_int(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def fmt_pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def fmt_gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GiB"


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Modes data and pretrain: pretraining through llmflow's pretrain stage.
# --------------------------------------------------------------------------------------------


def source_texts(text_mb: float, chunk: int = 1500) -> list[tuple[str, str]]:
    """(url, text) documents that need no network: the Python language reference (always), then
    standard-library sources until ``text_mb`` MB of text."""
    import pydoc_data.topics

    docs = []
    for name, text in sorted(pydoc_data.topics.topics.items()):
        for start in range(0, len(text), chunk):
            docs.append((f"pydoc-topic://{name}/{start}", text[start : start + chunk]))
    budget = int(text_mb * 1e6) - sum(len(t) for _, t in docs)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        if budget <= 0:
            break
        if "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append((f"file://{path}", text))
            budget -= len(text)
    return docs


def build_token_data(data_dir: Path, text_mb: float, vocab_size: int) -> tuple[str, str]:
    """(tokenize dir, tokenizer dir) made by the real tokenizer and tokenize stages, as in a
    pipeline run; reused when ``data_dir`` already holds them for the same settings."""
    from llmflow.tasks.core.documents import Document
    from llmflow.tasks.core.manifests import finalize_stage
    from llmflow.tasks.core.stage import StageConfig, StageSpec, WorkUnit, run_unit, unit_key
    from llmflow.tasks.core.unit_output import documents_result
    from llmflow.tasks.train import bpe_tokenizer, tokenize

    tokens_dir, tokenizer_dir = str(data_dir / "tokenize"), str(data_dir / "tokenizer")
    settings = {"text_mb": text_mb, "vocab_size": vocab_size}
    stamp = data_dir / "gpu_check_data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == settings:
        return tokens_dir, tokenizer_dir
    shutil.rmtree(data_dir, ignore_errors=True)
    started = time.perf_counter()
    when = datetime(2026, 1, 1, tzinfo=UTC)
    docs = [Document(url, text, "gpu-check", when) for url, text in source_texts(text_mb)]
    source_dir, spec, config = str(data_dir / "documents"), StageSpec("source", "1"), StageConfig()
    records = []
    parts = 8

    def shard(part: list[Document]) -> Callable[[Any], Any]:
        return lambda _output: documents_result(part)

    for s in range(parts):
        part = docs[s::parts]
        unit = WorkUnit(f"part-{s:05d}", unit_key(spec, config, f"gpu-check:{s}:{len(part)}"), {})
        records.append(run_unit(source_dir, unit, shard(part)))
    finalize_stage(source_dir, spec, config, records, None)
    bpe_tokenizer.train_tokenizer(
        source_dir, tokenizer_dir, bpe_tokenizer.TokenizerConfig(vocab_size=vocab_size), 0.05
    )
    tok_config = tokenize.TokenizeConfig(val_fraction=0.05)
    units, digest = tokenize.plan_tokenize_units(tok_config, source_dir, tokenizer_dir)
    done = [tokenize.tokenize_shard.fn(u, tok_config, tokens_dir) for u in units]
    tokenize.finish(units, tok_config, tokens_dir, done, digest)
    stamp.write_text(json.dumps(settings))
    chars = sum(len(d.text) for d in docs)
    print(
        f"token data: {len(docs)} documents, {chars / 1e6:.1f} MB of text, tokenizer and"
        f" shards made in {time.perf_counter() - started:.0f} s",
        flush=True,
    )
    return tokens_dir, tokenizer_dir


def steady_rate(rows: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    """(tokens/s, MFU) over the logged intervals after the first (which holds compilation):
    total tokens over total time, as intervals are equal in steps. All rows if only one."""
    timed = [r for r in rows if r.get("tokens_per_s")]
    if len(timed) > 1:
        timed = timed[1:]
    if not timed:
        return None, None
    tokens_per_s = len(timed) / sum(1 / r["tokens_per_s"] for r in timed)
    mfu = None
    if all("mfu" in r for r in timed):
        mfu = tokens_per_s * timed[0]["mfu"] / timed[0]["tokens_per_s"]
    return tokens_per_s, mfu


def pretrain_fields(args: argparse.Namespace, device: torch.device, max_steps: int) -> dict:
    seq_len = args.seq_len or PRESETS[args.preset].max_seq_len
    return {
        "preset": args.preset,
        "seq_len": seq_len,
        "micro_batch_size": args.micro_batch,
        "batch_tokens": args.micro_batch * seq_len * args.accumulation,
        "max_steps": max_steps,
        "lr": 6e-4 if args.preset != "tiny" else 3e-3,
        "warmup_steps": max(1, min(50, max_steps // 10)),
        "device": device.type,
        "nproc_per_node": 1,
        "dtype": resolve_dtype(args.dtype, device),
        "compile": args.compile,
        "log_interval": max(1, max_steps // 20),
        "eval_interval": max_steps,
        "eval_batches": 4,
        "checkpoint_interval": max_steps,
        "keep_checkpoints": 1,
        "sample_tokens": 16,
    }


def run_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    from pydantic import ValidationError

    from llmflow.tasks.train.pretrain import launch, plan_job, processes
    from llmflow.tasks.train.train_metrics import read_metrics

    leg = args.parallelism
    device = pick_device(args.device)
    out: dict[str, Any] = {"kind": "pretrain", "leg": leg, "device": device_name(device)}
    seq_len = args.seq_len or PRESETS[args.preset].max_seq_len
    batch_tokens = args.micro_batch * seq_len * args.accumulation
    if args.steps:
        max_steps = args.steps
    else:
        max_steps = max(30, round(args.train_seconds * args.expect_tokens_per_s / batch_tokens))
    fields = pretrain_fields(args, device, max_steps)
    try:
        config = PretrainConfig.model_validate(fields | {"parallelism": leg})
        out["parallelism"] = f"pretrain.parallelism={leg}"
    except ValidationError as error:
        ours = [e for e in error.errors() if e["loc"] and e["loc"][0] == "parallelism"]
        if len(ours) != len(error.errors()):
            raise
        why = "unknown field" if ours[0]["type"] == "extra_forbidden" else ours[0]["msg"]
        if leg != "ddp":
            out |= {"status": "skipped", "reason": f"PretrainConfig rejects parallelism={leg!r}"}
            out["reason"] += f" ({why}): this llmflow has no {leg} path yet"
            print(f"pretrain {leg}: skipped: {out['reason']}", flush=True)
            return out
        # DDP is what the trainer has always done with several processes: run it without the field
        config = PretrainConfig.model_validate(fields)
        out["parallelism"] = f"no pretrain.parallelism field ({why}): the trainer's default"
    tokens_dir, tokenizer_dir = build_token_data(args.data_dir, args.text_mb, args.vocab_size)
    stage_dir = args.work_dir / f"pretrain-{leg}"
    shutil.rmtree(stage_dir, ignore_errors=True)  # a fresh run, never a resumed or skipped one
    job, _ = plan_job(config, tokens_dir, tokenizer_dir, str(stage_dir))
    nproc = processes(job.config)
    print(
        f"pretrain {leg}: {args.preset} (vocab {job.decoder.vocab_size}), {max_steps} steps of"
        f" {batch_tokens:,} tokens, {nproc} process(es), {out['parallelism']}",
        flush=True,
    )
    reset_peak_memory(device)
    started = time.perf_counter()
    result = launch(job, nproc)
    wall = time.perf_counter() - started
    memory = peak_memory_gib(device) if nproc == 1 else None
    rows = [r for r in read_metrics(job.run_dir) if "tokens_per_s" in r]
    tokens_per_s, mfu = steady_rate(rows)
    out |= {
        "status": "ok",
        "preset": args.preset,
        "vocab_size": job.decoder.vocab_size,
        "parameters": result["parameters"],
        "processes": nproc,
        "max_steps": max_steps,
        "steps": result["steps"],
        "batch_tokens": batch_tokens,
        "micro_batch": args.micro_batch,
        "seq_len": seq_len,
        "tokens_trained": result["steps"] * batch_tokens,
        "train_tokens_in_data": result["train_tokens"],
        "tokens_per_s": tokens_per_s,
        "mfu": mfu,
        "peak_memory_gib": memory,
        "host_rss_gib": host_rss_gib(),
        "final_loss": result["final_loss"],
        "val_loss": result["val_loss"],
        "wall_s": wall,
        "compile": args.compile,
        "dtype": fields["dtype"],
        "run_dir": job.run_dir,
    }
    print(
        f"pretrain {leg}: {fmt_int(tokens_per_s)} tokens/s, MFU {fmt_pct(mfu)}, final loss"
        f" {fmt_float(out['final_loss'])}, {wall:.0f} s",
        flush=True,
    )
    return out


# --------------------------------------------------------------------------------------------
# Mode report.
# --------------------------------------------------------------------------------------------


def parse_planner(text: str) -> dict[str, Any]:
    """What ``llmflow plan`` predicts: tokens/s, MFU (and whether it was assumed), memory per
    device (GiB) and its micro batch, and its readable text. From ``--json`` output
    (``predicted_tokens_per_second``, ``predicted_mfu``, ``memory_bytes``, ``text``), else from
    the text: the number before "tokens/s" on the "predicted" line (or anywhere) and the
    percentage next to "MFU"."""
    plan: dict[str, Any] = {
        "tokens_per_s": None,
        "mfu": None,
        "mfu_assumed": "assumed" in text,
        "memory_gib": None,
        "micro_batch": None,
        "text": text,
    }
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict):
            tps = data.get("predicted_tokens_per_second", data.get("tokens_per_s"))
            mfu = data.get("predicted_mfu", data.get("mfu"))
            memory = data.get("memory_bytes")
            plan |= {
                "tokens_per_s": float(tps) if tps is not None else None,
                "mfu": float(mfu) if mfu is not None else None,
                "memory_gib": memory / GIB if memory is not None else None,
                "micro_batch": data.get("micro_batch_size"),
                "text": str(data.get("text") or text),
            }
            return plan
    predicted = next((ln for ln in text.splitlines() if ln.strip().startswith("predicted")), text)
    for where in (predicted, text):
        match = re.search(r"(\d[\d,]*(?:\.\d+)?)\s*([kKM]?)\s*tokens?/s\b", where)
        if match:
            scale = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6}[match.group(2)]
            plan["tokens_per_s"] = float(match.group(1).replace(",", "")) * scale
            break
    match = re.search(r"MFU\D{0,20}?(\d+(?:\.\d+)?)\s*%", predicted) or re.search(
        r"(\d+(?:\.\d+)?)\s*%\s*MFU", text
    )
    if match:
        plan["mfu"] = float(match.group(1)) / 100
    return plan


def load_results(paths: list[Path]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        # the pretraining legs say so; train_throughput.py's JSON has no "kind"
        pretrain = data.get("kind") == "pretrain"
        results[f"pretrain-{data['leg']}" if pretrain else "throughput"] = data
    return results


def pretrain_table(legs: list[dict[str, Any]]) -> str:
    lines = [
        "| leg | status | model | steps x tokens | tokens/s | MFU | peak memory | final loss"
        " | val loss | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for leg in legs:
        if leg.get("status") != "ok":
            reason = leg.get("reason") or leg.get("error") or "no result"
            lines.append(f"| {leg['leg']} | {leg.get('status', 'failed')}: {reason} |" + " |" * 8)
            continue
        lines.append(
            f"| {leg['leg']} | ok ({leg['parallelism']}) | {leg['preset']}, vocab"
            f" {leg['vocab_size']}, {leg['parameters'] / 1e6:.1f}M params, {leg['dtype']},"
            f" compile {'on' if leg['compile'] else 'off'} | {leg['steps']} x"
            f" {leg['batch_tokens']:,} | {fmt_int(leg['tokens_per_s'])} | {fmt_pct(leg['mfu'])}"
            f" | {fmt_gib(leg['peak_memory_gib'])} | {fmt_float(leg['final_loss'])}"
            f" | {fmt_float(leg['val_loss'])} | {leg['wall_s']:.0f} |"
        )
    return "\n".join(lines)


def run_report(args: argparse.Namespace) -> str:
    results = load_results(args.results)
    parts = [f"# GPU check ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)", ""]
    throughput = results.get("throughput")
    parts += ["## 1. Throughput: llmflow's decoder against nanoGPT's GPT", ""]
    if throughput:
        settings = throughput["settings"]
        parts += [
            f"`bench/train_throughput.py`: {throughput['header']}; {throughput['warmup_steps']}"
            f" warm-up + {throughput['steps']} timed steps per model; autocast"
            f" {settings['autocast']}, TF32 {'on' if settings['tf32'] else 'off'}",
            "",
            throughput["table"],
            "",
        ]
    else:
        parts += ["not measured (no result: see the log above)", ""]
    legs = [
        results.get(f"pretrain-{leg}") or {"leg": leg, "status": "failed"}
        for leg in ("ddp", "fsdp")
    ]
    parts += ["## 2. Pretraining through llmflow's pretrain stage", ""]
    parts += [pretrain_table(legs), ""]
    parts += ["## 3. The planner's prediction beside the measurements", ""]
    planner_text = (
        args.planner.read_text().strip() if args.planner and args.planner.exists() else ""
    )
    if not planner_text or planner_text.startswith("planner not available"):
        parts += [planner_text or "planner not available", ""]
    else:
        plan = parse_planner(planner_text)
        rows = []
        # llmflow's last row: compiled, when the bench ran both ways
        ours = [r for r in throughput["rows"] if r["model"] == "llmflow"] if throughput else []
        if ours and ours[-1].get("tokens_per_s"):
            r = ours[-1]
            rows.append(
                (
                    f"measured: throughput, llmflow (micro batch {throughput['batch_size']},"
                    f" compile {r['compile']})",
                    r["tokens_per_s"],
                    fmt_pct(r["mfu"]),
                    fmt_gib(r["peak_memory_gib"]),
                )
            )
        for leg in legs:
            if leg.get("status") == "ok":
                name = (
                    f"measured: pretrain {leg['leg']} (micro batch {leg.get('micro_batch', '?')})"
                )
                rows.append(
                    (
                        name,
                        leg["tokens_per_s"],
                        fmt_pct(leg["mfu"]),
                        fmt_gib(leg["peak_memory_gib"]),
                    )
                )
        mfu = fmt_pct(plan["mfu"]) + (" (assumed)" if plan["mfu_assumed"] else "")
        memory = "n/a" if plan["memory_gib"] is None else f"{plan['memory_gib']:.2f} GiB"
        if plan["micro_batch"] is not None:
            memory += f" (micro batch {plan['micro_batch']})"
        parts += ["| source | tokens/s | MFU | memory per device |", "|---|---:|---:|---:|"]
        parts += [
            f"| predicted: `{args.planner_command}` | {fmt_int(plan['tokens_per_s'])} | {mfu}"
            f" | {memory} |"
        ]
        parts += [f"| {name} | {fmt_int(t)} | {m} | {g} |" for name, t, m, g in rows]
        parts += ["", "The planner's output:", "", "```", plan["text"], "```", ""]
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("data", "pretrain", "report"), required=True)
    parser.add_argument("--preset", choices=("tiny", "gpt2-small"), default="gpt2-small")
    parser.add_argument(
        "--steps",
        type=int,
        help="pretrain: max_steps (default: sized to --train-seconds)",
    )
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per micro-batch")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (the preset's max)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="autocast dtype; auto: bfloat16 on CUDA, float32 on the CPU",
    )
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--md", type=Path, help="write the markdown here")
    pretrain = parser.add_argument_group("--mode pretrain (and data)")
    pretrain.add_argument("--parallelism", default="ddp", help="pretrain.parallelism of the leg")
    pretrain.add_argument("--data-dir", type=Path, default=Path("gpu-check-work/data"))
    pretrain.add_argument("--work-dir", type=Path, default=Path("gpu-check-work"))
    pretrain.add_argument("--text-mb", type=float, default=16.0, help="text to tokenize (MB)")
    pretrain.add_argument("--vocab-size", type=int, default=50304, help="tokenizer vocabulary")
    pretrain.add_argument("--accumulation", type=int, default=4, help="micro-batches per step")
    pretrain.add_argument(
        "--train-seconds",
        type=float,
        default=60.0,
        help="size max_steps to about this long (after compilation)",
    )
    pretrain.add_argument(
        "--expect-tokens-per-s",
        type=float,
        default=300_000.0,
        help="the rate max_steps is sized by (train_throughput.py's, for llmflow)",
    )
    report = parser.add_argument_group("--mode report")
    report.add_argument("--results", type=Path, nargs="*", default=[])
    report.add_argument("--planner", type=Path, help="llmflow plan's output, saved")
    report.add_argument("--planner-command", default="llmflow plan")
    args = parser.parse_args(argv)
    for flag in ("steps", "micro_batch", "seq_len", "accumulation"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "report":
        text = run_report(args)
        print(text)
        if args.md:
            args.md.parent.mkdir(parents=True, exist_ok=True)
            args.md.write_text(text + "\n")
        return 0
    if args.mode == "data":
        build_token_data(args.data_dir, args.text_mb, args.vocab_size)
        return 0
    try:
        result = run_pretrain(args)
    except Exception as error:  # the report says the leg failed and why; the log has the trace
        traceback.print_exc()
        first = (str(error).strip().splitlines() or [""])[0]
        result = {"kind": "pretrain", "leg": args.parallelism, "status": "failed"}
        result["error"] = f"{type(error).__name__}: {first}"[:300]
    write_json(args.json, result)
    return 0 if result["status"] in ("ok", "skipped") else 1


if __name__ == "__main__":
    sys.exit(main())
