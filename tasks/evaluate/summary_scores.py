"""Scores derived from an evaluation after the fact: the clean subset and the CORE number.

**Clean subset.** GPT-3 reported each benchmark on all items and on the items none of its training
text overlapped. The evaluate stage stores every item's score (``item_values``), so the clean
score is the same metric over the items the model's training text did not hold
(:func:`clean_result`); which those are comes from the data lineage
(:func:`~llmflow.tasks.curate.decontaminate.training_contamination`).

**CORE.** One number to compare models by, as DCLM and nanochat do: each task's accuracy centred
on its chance level, ``(accuracy - chance) / (1 - chance)``, averaged over the tasks (0 is
guessing, 1 is every item right, below 0 worse than guessing). llmflow's CORE uses, per task, the
metric its headline reports (``acc_norm`` where the task has it, else ``acc``) at the task's own
shot count (lm-evaluation-harness's: 0, MMLU 5), and each task's exact chance (the mean of
1/options over its items: 0.25 for HellaSwag, 0.5 for PIQA, 0 for LAMBADA). nanochat's CORE is
DCLM's 22 tasks at DCLM's shot counts with its own chance table (BoolQ at the majority class, 62%,
where llmflow uses 50%); they share ARC, HellaSwag, PIQA, WinoGrande, BoolQ, COPA, OpenBookQA and
LAMBADA, not MMLU, so the two numbers are the same kind of number, not the same number.
"""

from __future__ import annotations

from typing import Any

from llmflow.tasks.evaluate.loglikelihood import mean_and_stderr

ACCURACY_METRICS = ("acc_norm", "acc")


def headline_metric(metrics: dict[str, float]) -> str | None:
    """The accuracy a task is summarised by: ``acc_norm`` where it has one, else ``acc``."""
    return next((m for m in ACCURACY_METRICS if m in metrics), None)


def centred(accuracy: float, chance: float) -> float:
    """Accuracy on a scale where guessing is 0 and every item right is 1."""
    return (accuracy - chance) / (1.0 - chance)


def core_score(results: dict[str, dict[str, Any]]) -> tuple[float, dict[str, float]]:
    """CORE over the tasks of an evaluation (``outcome["results"]``): the mean of each task's
    centred accuracy, and those per task. NaN when no task has an accuracy."""
    per_task = {}
    for task, result in results.items():
        metric = headline_metric(result["metrics"])
        if metric is not None:
            per_task[task] = centred(result["metrics"][metric], result.get("chance", 0.0))
    core = sum(per_task.values()) / len(per_task) if per_task else float("nan")
    return core, per_task


def clean_result(result: dict[str, Any], contaminated: set[str]) -> dict[str, Any]:
    """A task's scores over its items outside ``contaminated`` (item ids): each per-item metric's
    mean and standard error, and the counts of items kept and left out."""
    ids = result.get("item_ids", [])
    clean = [i for i, item_id in enumerate(ids) if item_id not in contaminated]
    metrics: dict[str, float] = {}
    stderr: dict[str, float] = {}
    for metric, values in result.get("item_values", {}).items():
        metrics[metric], stderr[metric] = mean_and_stderr([values[i] for i in clean])
    return {
        "items": len(clean),
        "contaminated": len(ids) - len(clean),
        "metrics": metrics,
        "stderr": stderr,
    }
