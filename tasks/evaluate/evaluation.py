"""Benchmark evaluation: tasks read by :mod:`llmflow.tasks.evaluate.benchmarks`, scored by
:mod:`llmflow.tasks.evaluate.loglikelihood`, reported as lm-evaluation-harness reports them.

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

import torch

from llmflow.tasks.core.stage import StageSpec
from llmflow.tasks.evaluate.benchmark_items import TARGET_DELIMITER, ChoiceItem
from llmflow.tasks.evaluate.benchmarks import TASKS, TaskData, load_task
from llmflow.tasks.evaluate.evaluate_config import EvaluateConfig
from llmflow.tasks.evaluate.loglikelihood import (
    LoglikelihoodScorer,
    Score,
    choice_metrics,
    mean_and_stderr,
)
from llmflow.tasks.evaluate.model_loading import load_causal_lm, resolve_device
from llmflow.tasks.ingest.embedded_data import BENCHMARKS_DIR

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
    """One task's scores: each metric's mean and standard error over ``items`` items.

    ``item_ids`` and ``item_values`` (each metric per item, in item order) let a subset be
    scored after the fact (the clean items, :mod:`~llmflow.tasks.evaluate.summary_scores`);
    ``chance`` is the score of guessing (the mean of 1/options; 0 for LAMBADA), which CORE
    centres on.
    """

    task: str
    items: int
    num_fewshot: int
    source: str
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    stderr: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    chance: float = 0.0
    item_ids: list[str] = field(default_factory=list)
    item_values: dict[str, list[float]] = field(default_factory=dict)


# Items whose requests go to the scorer together: it sorts them by length and batches contexts.
_ITEMS_PER_CALL = 256


def _scored(
    scorer: LoglikelihoodScorer,
    items: list[ChoiceItem],
    on_item: Callable[[], None] | None = None,
) -> Iterator[tuple[ChoiceItem, list[Score]]]:
    """Each item with its scores, the requests of several items scored in one call.

    ``on_item`` is called once per item as soon as the forward pass that scores its last
    request ends: a chunk is every item of a shipped subset, so counting items only when the
    chunk returns would hold a progress bar at 0 until the task is over.
    """
    for start in range(0, len(items), _ITEMS_PER_CALL):
        chunk = items[start : start + _ITEMS_PER_CALL]
        requests = [r for item in chunk for r in item.requests()]
        owner = [k for k, item in enumerate(chunk) for _ in range(item.num_options)]
        pending = [item.num_options for item in chunk]

        def scored(
            finished: list[int], owner: list[int] = owner, pending: list[int] = pending
        ) -> None:
            for request in finished:
                pending[owner[request]] -= 1
                if pending[owner[request]] == 0 and on_item is not None:
                    on_item()

        scores = scorer.score([c for c, _ in requests], [c for _, c in requests], scored)
        offset = 0
        for item in chunk:
            yield item, scores[offset : offset + item.num_options]
            offset += item.num_options


def evaluate_task(
    scorer: LoglikelihoodScorer,
    data: TaskData,
    on_item: Callable[[], None] | None = None,
) -> TaskResult:
    """Score every item of ``data``; ``on_item`` is called as each is scored (progress)."""
    started = time.perf_counter()
    per_item: dict[str, list[float]] = {m: [] for m in data.metrics if m != "perplexity"}
    lambada_ll: list[float] = []
    for item, scores in _scored(scorer, data.items, on_item):
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
    result = TaskResult(
        task=data.task,
        items=len(data.items),
        num_fewshot=data.num_fewshot,
        source=data.source,
        seconds=round(time.perf_counter() - started, 2),
        skipped=dict(data.skipped),
        item_ids=[item.id for item in data.items],
        item_values=per_item,
    )
    if data.output_type != "loglikelihood" and data.items:
        result.chance = sum(1 / item.num_options for item in data.items) / len(data.items)
    for metric, metric_values in per_item.items():
        result.metrics[metric], result.stderr[metric] = mean_and_stderr(metric_values)
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
    batch_size: int = 8,
) -> dict[str, Any]:
    """Every task on one model: ``{"results": {task: TaskResult as dict}, "config": …}``.

    ``on_task(task, items)`` may return a per-item callback (a progress bar for that task).
    """
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size)
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


# --- the pipeline's evaluate stage ------------------------------------------------------------

STAGE = StageSpec(name="evaluate", version="1", libraries=("torch", "transformers"))


class _HFLogits(torch.nn.Module):
    """A transformers causal LM as the trainer's evaluation expects a model: ids in, logits out."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def heldout_bits_per_byte(
    model: Any, tokenizer_dir: str, val_shards: list[str], windows: int
) -> dict[str, float] | None:
    """Loss and bits per byte of ``model`` on the first windows of our held-out token split,
    measured exactly as the trainer measures ``val_bpb`` (the same function), so the number is
    comparable with pretraining's curve. None when the split is empty."""
    from llmflow.tasks.train.bpe_tokenizer import load_tokenizer, token_byte_lengths
    from llmflow.tasks.train.parallelize import Distributed
    from llmflow.tasks.train.token_shards import TokenStream
    from llmflow.tasks.train.train_data import Batch, eval_windows, validation_loss

    seq_len = int(model.config.max_position_embeddings)
    rows = eval_windows(TokenStream(val_shards), seq_len, windows) if val_shards else []
    if not rows:
        return None
    lengths = token_byte_lengths(load_tokenizer(tokenizer_dir))
    device = next(model.parameters()).device  # validation_loss works where token_bytes is
    token_bytes = torch.zeros(int(model.config.vocab_size), dtype=torch.int64, device=device)
    token_bytes[: len(lengths)] = torch.tensor(lengths, dtype=torch.int64)
    batches = []
    for row in rows:
        ids = torch.from_numpy(row.astype("int64"))[None].to(device)
        batches.append(Batch(ids[:, :-1], ids[:, 1:]))
    loss, bpb = validation_loss(_HFLogits(model), batches, token_bytes, Distributed(0, 0, 1))
    return {"loss": loss, "bpb": bpb, "windows": len(rows), "seq_len": seq_len}


@torch.no_grad()
def chat_samples(
    model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int
) -> list[dict[str, str]]:
    """Greedy replies to each prompt as a user message, through transformers' own chat path
    (``apply_chat_template`` with the template in the tokenizer's config, ``generate`` stopping
    at ``<|end|>``): what a user of the exported model gets."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    end_id = tokenizer.convert_tokens_to_ids("<|end|>")
    samples = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"].to(model.device)
        room = int(model.config.max_position_embeddings) - ids.shape[1]
        if room <= 0:
            samples.append({"prompt": prompt, "reply": "", "note": "prompt fills the context"})
            continue
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=min(max_new_tokens, room),
            do_sample=False,
            eos_token_id=end_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "reply": reply})
    return samples


def run_evaluation(
    config: EvaluateConfig,
    model_path: str,
    tokenizer_dir: str | None,
    val_shards: list[str],
    on_task: Callable[[str, int], Callable[[], None] | None] | None = None,
) -> dict[str, Any]:
    """Benchmarks, held-out bits per byte (when the model shares our tokenizer) and chat
    samples for one model: the document the stage records."""
    device = resolve_device(config.device)
    model, tokenizer = load_causal_lm(model_path, device)
    data_dir = config.data_dir or str(BENCHMARKS_DIR)
    outcome = evaluate_model(
        model,
        tokenizer,
        config.tasks,
        data_dir,
        config.limit,
        config.num_fewshot,
        on_task,
        batch_size=config.batch_size,
    )
    outcome["config"]["model"] = model_path
    outcome["config"]["device"] = device
    if tokenizer_dir is not None and config.heldout_windows:
        outcome["heldout"] = heldout_bits_per_byte(
            model, tokenizer_dir, val_shards, config.heldout_windows
        )
    outcome["samples"] = chat_samples(model, tokenizer, config.chat_prompts, config.max_new_tokens)
    return outcome


def results_rows(outcome: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task and metric (the CLI's table, MLflow's metrics and table, the Prefect
    markdown); ``stderr`` is None where there is none (a single item gives NaN)."""
    rows = []
    for task, result in outcome["results"].items():
        for metric, value in result["metrics"].items():
            stderr = result["stderr"].get(metric)
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "stderr": None if stderr is None or math.isnan(stderr) else stderr,
                    "items": result["items"],
                    "shots": result["num_fewshot"],
                }
            )
    return rows


# MLflow draws one chart section per metric-name prefix (up to the first "/"): the standard
# errors get a section of their own instead of a chart each between the scores.
METRIC_PREFIX = "eval"
STDERR_PREFIX = "eval_stderr"


def results_metrics(outcome: dict[str, Any]) -> dict[str, float]:
    """The scores as MLflow metrics, named alike by the evaluate stage and ``llmflow evaluate``:
    ``eval/<task>/<metric>``, its standard error as ``eval_stderr/<task>/<metric>``, and
    ``eval/core`` when the outcome has CORE."""
    metrics: dict[str, float] = {}
    if outcome.get("core"):
        metrics[f"{METRIC_PREFIX}/core"] = outcome["core"]["value"]
    for row in results_rows(outcome):
        name = f"{row['task']}/{row['metric']}"
        metrics[f"{METRIC_PREFIX}/{name}"] = row["value"]
        if row["stderr"] is not None:
            metrics[f"{STDERR_PREFIX}/{name}"] = row["stderr"]
    return metrics


def results_markdown(outcome: dict[str, Any], run_id: str) -> str:
    lines = [
        f"# Evaluation of `{outcome['config']['model']}`",
        "",
        "| task | metric | value | ± stderr | items | shots |",
        "|---|---|---|---|---|---|",
    ]
    for row in results_rows(outcome):
        stderr = "" if row["stderr"] is None else f"{row['stderr']:.4f}"
        lines.append(
            f"| {row['task']} | {row['metric']} | {row['value']:.4f} | {stderr} |"
            f" {row['items']} | {row['shots']} |"
        )
    core = outcome.get("core")
    if core:
        lines += [
            "",
            f"**CORE {core['value']:.4f}**: accuracy centred on chance, averaged over"
            f" {', '.join(core['tasks'])}.",
        ]
    if outcome.get("clean"):
        lines += [
            "",
            "| task | contaminated items | clean items | metric on clean items |",
            "|---|---|---|---|",
        ]
        for task, clean in outcome["clean"].items():
            shown = ", ".join(f"{m} {v:.4f}" for m, v in clean["metrics"].items())
            lines.append(f"| {task} | {clean['contaminated']} | {clean['items']} | {shown} |")
    heldout = outcome.get("heldout")
    if heldout:
        lines += [
            "",
            f"Held-out split of our corpus: **{heldout['bpb']:.4f} bits per byte**"
            f" ({heldout['loss']:.4f} nats/token over {heldout['windows']} windows).",
        ]
    if outcome.get("samples"):
        lines += ["", "## Chat samples (greedy)", ""]
        for sample in outcome["samples"]:
            reply = sample["reply"].replace("\n", " ")
            lines.append(f"- **{sample['prompt']}** → {reply}")
    lines += ["", f"MLflow run `{run_id}`."]
    return "\n".join(lines)
