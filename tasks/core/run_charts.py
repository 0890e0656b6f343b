"""PNG charts logged to MLflow: the data funnel of a pipeline run and a training run's curves.

MLflow plots any metric, but only one run at a time and one metric per chart: the funnel across
stages (documents in and kept per stage, removed per reason) and loss against validation loss on
one set of axes are what a reader wants at a glance, so they are drawn once and kept as
artifacts beside the numbers. matplotlib comes with mlflow; the Agg backend needs no display.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from matplotlib.figure import Figure  # noqa: E402

_NAMED_REASONS = 9


def data_funnel(stages: Sequence[dict[str, Any]]) -> Figure | None:
    """Documents in and kept per document stage (their ``docs_in``/``kept`` counts), with the
    removed ones split by reason; None when no stage counted documents."""
    rows = [s for s in stages if s.get("docs_in")]
    if not rows:
        return None
    names = [s["stage"] for s in rows]
    figure, axes = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)) + 3.0, 4.5))
    x = range(len(rows))
    axes.bar(x, [s["kept"] for s in rows], color="#2b7bb9", label="kept")
    bottoms = [float(s["kept"]) for s in rows]
    # the most frequent reasons by name, the long tail (quality has twenty rules) as one bar
    totals: dict[str, int] = {}
    for stage in rows:
        for reason, n in stage.get("rejected_by_reason", {}).items():
            totals[reason] = totals.get(reason, 0) + n
    named = sorted(totals, key=lambda r: -totals[r])[:_NAMED_REASONS]
    groups = [(r, [r]) for r in named]
    if len(totals) > len(named):
        groups.append(("other reasons", [r for r in totals if r not in named]))
    palette = plt.get_cmap("tab20")
    for i, (label, members) in enumerate(groups):
        heights = [sum(s.get("rejected_by_reason", {}).get(r, 0) for r in members) for s in rows]
        axes.bar(x, heights, bottom=bottoms, color=palette(i + 2), label=f"removed: {label}")
        bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
    axes.set_xticks(list(x), names, rotation=30, ha="right")
    axes.set_ylabel("documents")
    axes.set_title("Data funnel: documents kept and removed per stage")
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    return figure


def training_curves(rows: Sequence[dict[str, Any]], title: str) -> Figure | None:
    """Training loss per step and validation loss per evaluation (``metrics.jsonl`` rows), with
    the learning rate on a second axis; None when there is no step to draw."""
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    if not steps:
        return None
    figure, axes = plt.subplots(figsize=(7.0, 4.5))
    axes.plot(*zip(*steps, strict=True), color="#2b7bb9", linewidth=1, label="training loss")
    evals = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    if evals:
        axes.plot(*zip(*evals, strict=True), "o-", color="#d95f02", label="validation loss")
    entropy = next((r["unigram_entropy"] for r in rows if "unigram_entropy" in r), None)
    if entropy is not None:
        axes.axhline(entropy, color="grey", linestyle="--", linewidth=1, label="unigram entropy")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("nats per token")
    axes.set_title(title)
    rates = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    if rates:
        lr_axes = axes.twinx()
        lr_axes.plot(*zip(*rates, strict=True), color="#1b9e77", linewidth=0.8, alpha=0.6)
        lr_axes.set_ylabel("learning rate", color="#1b9e77")
    axes.legend(fontsize=8, loc="upper right")
    figure.tight_layout()
    return figure


def close(figure: Figure) -> None:
    plt.close(figure)
