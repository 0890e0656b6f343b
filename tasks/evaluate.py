"""Benchmark evaluation: tasks read by :mod:`llmflow.tasks.benchmarks`, scored by
:mod:`llmflow.tasks.loglikelihood`, reported as lm-evaluation-harness reports them.

Per task, every metric is the mean over items with its standard error (lm-eval's
``stderr``: sample standard deviation over sqrt(n)); LAMBADA's perplexity is
``exp(-mean log-likelihood)`` of the last word, as lm-eval aggregates it. The results are one JSON
document that the CLI writes and the pipeline logs to MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmflow.tasks.benchmarks import TARGET_DELIMITER, TASKS, ChoiceItem, TaskData, load_task
from llmflow.tasks.loglikelihood import (
    LoglikelihoodScorer,
    Score,
    choice_metrics,
    mean_and_stderr,
)

# Where each task's file is looked for under a benchmarks folder, first match wins: the published
# layouts (what README tells users to download) and ../shared/data/benchmarks' layout.
BENCHMARK_FILES: dict[str, tuple[str, ...]] = {
    "hellaswag": (
        "hellaswag/hellaswag_val.jsonl",
        "hellaswag_val.jsonl",
        "hellaswag/hellaswag_val_full.txt.bz2",
        "hellaswag_val_full.txt.bz2",
    ),
    "arc_easy": ("arc_easy.jsonl", "llm-foundry/arc_easy.jsonl"),
    "arc_challenge": ("arc_challenge.jsonl", "llm-foundry/arc_challenge.jsonl"),
    # PIQA's original files keep choices' trailing spaces that the llm-foundry copy strips.
    "piqa": ("piqa/valid.jsonl", "piqa.jsonl", "llm-foundry/piqa.jsonl"),
    "winogrande": ("winogrande.jsonl", "llm-foundry/winogrande.jsonl"),
    "boolq": ("boolq.jsonl", "llm-foundry/boolq.jsonl"),
    "openbookqa": ("openbookqa.jsonl", "llm-foundry/openbook_qa.jsonl"),
    "copa": ("copa.jsonl", "llm-foundry/copa.jsonl"),
    "mmlu": ("mmlu",),
    "lambada": ("lambada_openai.jsonl", "llm-foundry/lambada_openai.jsonl"),
}


def find_benchmark(task: str, data_dir: str | Path) -> Path:
    """The file (or folder) of ``task`` under ``data_dir``; an error lists where it looked."""
    if task not in TASKS:
        raise ValueError(f"unknown benchmark task {task!r}; known: {', '.join(TASKS)}")
    root = Path(data_dir)
    for name in BENCHMARK_FILES[task]:
        if (root / name).exists():
            return root / name
    tried = ", ".join(BENCHMARK_FILES[task])
    raise ValueError(f"{task}: no benchmark file under {root} (looked for {tried})")


@dataclass
class TaskResult:
    """One task's scores: each metric's mean and standard error over ``items`` items."""

    task: str
    items: int
    num_fewshot: int
    source: str
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


# Items whose requests go to the scorer together: it sorts them by length and batches contexts.
_ITEMS_PER_CALL = 256


def _scored(
    scorer: LoglikelihoodScorer, items: list[ChoiceItem]
) -> Iterator[tuple[ChoiceItem, list[Score]]]:
    """Each item with its scores, the requests of several items scored in one call."""
    for start in range(0, len(items), _ITEMS_PER_CALL):
        chunk = items[start : start + _ITEMS_PER_CALL]
        requests = [r for item in chunk for r in item.requests()]
        scores = scorer.score([c for c, _ in requests], [c for _, c in requests])
        offset = 0
        for item in chunk:
            yield item, scores[offset : offset + item.num_options]
            offset += item.num_options


def evaluate_task(
    scorer: LoglikelihoodScorer,
    data: TaskData,
    on_item: Callable[[], None] | None = None,
) -> TaskResult:
    """Score every item of ``data``; ``on_item`` is called after each (progress)."""
    started = time.perf_counter()
    per_item: dict[str, list[float]] = {m: [] for m in data.metrics if m != "perplexity"}
    lambada_ll: list[float] = []
    for item, scores in _scored(scorer, data.items):
        if data.output_type == "loglikelihood":
            lambada_ll.append(scores[0].loglikelihood)
            per_item["acc"].append(float(scores[0].is_greedy))
        else:
            if item.contexts is not None:  # partial scoring: the contexts differ, one continuation
                texts = [item.choices[0].removeprefix(TARGET_DELIMITER)] * item.num_options
            else:
                texts = [c.removeprefix(TARGET_DELIMITER) for c in item.choices]
            values = choice_metrics([s.loglikelihood for s in scores], texts, item.gold)
            for metric in per_item:
                per_item[metric].append(values[metric])
        if on_item is not None:
            on_item()
    result = TaskResult(
        task=data.task,
        items=len(data.items),
        num_fewshot=data.num_fewshot,
        source=data.source,
        seconds=round(time.perf_counter() - started, 2),
        skipped=dict(data.skipped),
    )
    for metric, values in per_item.items():
        result.metrics[metric], result.stderr[metric] = mean_and_stderr(values)
    if lambada_ll:
        mean_ll, stderr_ll = mean_and_stderr(lambada_ll)
        result.metrics["perplexity"] = math.exp(-mean_ll)
        # by the delta method (d exp(-x) = exp(-x) dx); lm-eval bootstraps this one instead
        result.stderr["perplexity"] = math.exp(-mean_ll) * stderr_ll
    return result


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    data_dir: str | Path,
    limit: int | None = None,
    num_fewshot: int | None = None,
    on_task: Callable[[str, int], Callable[[], None] | None] | None = None,
) -> dict[str, Any]:
    """Every task on one model: ``{"results": {task: TaskResult as dict}, "config": …}``.

    ``on_task(task, items)`` may return a per-item callback (a progress bar for that task).
    """
    scorer = LoglikelihoodScorer(model, tokenizer)
    results: dict[str, Any] = {}
    for task in tasks:
        data = load_task(task, find_benchmark(task, data_dir), num_fewshot, limit)
        on_item = on_task(task, len(data.items)) if on_task is not None else None
        results[task] = asdict(evaluate_task(scorer, data, on_item))
    return {
        "results": results,
        "config": {
            "tasks": tasks,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "data_dir": str(data_dir),
            "max_length": scorer.max_length,
        },
    }
