"""What a curation ablation reports: per variant, the mean and 95% interval of every metric over
its seeds, a ranking by held-out bits per byte, which variants the seeds cannot tell apart, and a
chart.

The interval is Student's t over the seeds (mean ± t(0.975, n-1) · sd / √n): with three seeds
t is 4.30, so only a clear difference shows. Two variants whose intervals overlap are reported
as not told apart; that is the honest reading of a handful of seeds, not a test of equality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

HELDOUT = "heldout_bpb"


@dataclass(frozen=True)
class Interval:
    """A metric's mean over seeds and its 95% confidence interval's half-width."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high

    def __str__(self) -> str:
        if abs(self.mean) >= 1000:  # a perplexity: its size, not its decimals
            return f"{self.mean:.3g} ± {self.half_width:.2g}"
        return f"{self.mean:.4f} ± {self.half_width:.4f}"


def interval(values: Sequence[float]) -> Interval:
    """Mean ± the 95% t-interval's half-width; a single value has an unbounded interval."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.inf, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, float(stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n), n)


def summarize(per_seed: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, Interval]]:
    """{variant: {metric: interval}} from {variant: [one dict of metrics per seed]}; a metric
    is summarized over the seeds that have it."""
    summary: dict[str, dict[str, Interval]] = {}
    for variant, runs in per_seed.items():
        metrics = sorted({m for run in runs for m in run})
        summary[variant] = {m: interval([r[m] for r in runs if m in r]) for m in metrics}
    return summary


def ranking(summary: dict[str, dict[str, Interval]]) -> list[str]:
    """Variants from the lowest held-out bits per byte (the best) to the highest."""
    return sorted(summary, key=lambda v: summary[v][HELDOUT].mean)


def ties(summary: dict[str, dict[str, Interval]], metric: str = HELDOUT) -> list[tuple[str, str]]:
    """Pairs of variants (in ranking order) whose intervals of ``metric`` overlap."""
    order = ranking(summary)
    return [
        (a, b)
        for i, a in enumerate(order)
        for b in order[i + 1 :]
        if summary[a][metric].overlaps(summary[b][metric])
    ]


def table_rows(summary: dict[str, dict[str, Interval]]) -> list[dict[str, Any]]:
    """One row per variant and metric: the MLflow table and the JSON result."""
    return [
        {
            "variant": variant,
            "metric": metric,
            "mean": iv.mean,
            "ci95": iv.half_width,
            "low": iv.low,
            "high": iv.high,
            "seeds": iv.n,
        }
        for variant in ranking(summary)
        for metric, iv in summary[variant].items()
    ]


def _benchmark_metrics(summary: dict[str, dict[str, Interval]]) -> list[str]:
    """The benchmark metrics every variant has (``eval/<task>/<metric>``), sorted."""
    shared = set.intersection(*(set(m) for m in summary.values()))
    return sorted(m for m in shared if m.startswith("eval/"))


def markdown(
    summary: dict[str, dict[str, Interval]], facts: dict[str, Any], run_url: str | None
) -> str:
    """The Prefect artifact: the ranking, the plain reading of the intervals, the benchmarks."""
    order = ranking(summary)
    seeds = facts["seeds"]
    lines = [
        "# Curation ablation",
        "",
        f"Each variant's documents trained the same proxy model ({facts['proxy']}) for"
        f" {facts['train_tokens']:,} tokens (smaller datasets are repeated), with one tokenizer,"
        f" for {len(seeds)} seeds ({', '.join(map(str, seeds))}). Held-out set:"
        f" {facts['heldout']}. Mean ± 95% interval over the seeds; lower bits per byte is better.",
        "",
        "| rank | variant | held-out bits per byte | documents | epochs |",
        "|---:|---|---:|---:|---:|",
    ]
    for rank, variant in enumerate(order, 1):
        data = facts["variants"][variant]
        lines.append(
            f"| {rank} | {variant} | {summary[variant][HELDOUT]} | {data['documents']:,}"
            f" | {data['epochs']:.2f} |"
        )
    lines.append("")
    tied = ties(summary)
    if tied:
        lines.append("Within each other's interval (the seeds do not tell them apart):")
        lines += [f"- {a} and {b}" for a, b in tied]
    else:
        lines.append("No two variants' intervals overlap: the ranking holds at 95%.")
    benchmarks = _benchmark_metrics(summary)
    if benchmarks:
        lines += ["", "| variant | " + " | ".join(benchmarks) + " |"]
        lines.append("|---|" + "---:|" * len(benchmarks))
        for variant in order:
            cells = " | ".join(str(summary[variant][m]) for m in benchmarks)
            lines.append(f"| {variant} | {cells} |")
    if run_url:
        lines += ["", f"MLflow: [{run_url}]({run_url})"]
    return "\n".join(lines) + "\n"


def chart(summary: dict[str, dict[str, Interval]]) -> Any:
    """Held-out bits per byte and each benchmark metric per variant, with the 95% intervals."""
    from llmflow.tasks.core.run_charts import plt

    metrics = [HELDOUT, *_benchmark_metrics(summary)]
    order = ranking(summary)
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(3.6 * len(metrics), 0.5 * len(order) + 1.8), squeeze=False
    )
    for ax, metric in zip(axes[0], metrics, strict=True):
        means = [summary[v][metric].mean for v in order]
        errors = [min(summary[v][metric].half_width, 1e9) for v in order]
        ax.errorbar(means, range(len(order)), xerr=errors, fmt="o", capsize=4)
        ax.set_yticks(range(len(order)), order if ax is axes[0][0] else [""] * len(order))
        ax.invert_yaxis()
        ax.set_title(metric.removeprefix("eval/"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    figure.suptitle("curation ablation: mean and 95% interval over seeds", fontsize=10)
    figure.tight_layout()
    return figure
