"""``llmflow evaluate``: score any model on the benchmarks, outside the pipeline.

The results go where the pipeline's go: a JSON file under the workdir (``evaluations/``, never
the folder the command happens to start in) and a run in the workdir's MLflow store, experiment
``llmflow``, with the metric names the evaluate stage logs, so a model scored here sits beside
the pipeline's in the same charts.

Only typer, rich and the standard library are imported with this module: ``llmflow --help``
imports it, and torch, transformers and MLflow cost seconds; the command imports them when it
runs.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from llmflow.flows.ui_servers import WORKDIR_DEFAULT

# The pipeline's default experiment (flows/config.py's PipelineConfig), repeated here so that the
# command's help imports no config module.
EXPERIMENT = "llmflow"

err = Console(stderr=True)
# Piped into a log, rich would lay tables out in 80 columns and wrap them; a log has room.
out = Console() if sys.stdout.isatty() else Console(width=120)


def _fail(message: str) -> typer.Exit:
    """Print a usage error (what was given and what is wrong) and return the exit to raise."""
    err.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def model_name(model: Path) -> str:
    """A short, file-name-safe name for a model path: the GGUF file's stem, the run folder of
    an ``hf/`` export, else the folder's own name."""
    path = model.absolute()
    if path.suffix == ".gguf":
        name = path.stem
    elif path.name == "hf":
        name = path.parent.name
    else:
        name = path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def print_task_list() -> None:
    """Every task the evaluator knows, what it is, how lm-eval scores it and whether llmflow
    ships a subset of it (usable with no --data-dir)."""
    from llmflow.tasks.evaluate.benchmarks import DESCRIPTIONS, METRICS, TASKS, default_shots
    from llmflow.tasks.ingest.embedded_data import EMBEDDED_TASKS

    table = Table(title="llmflow evaluate: known tasks", box=box.SIMPLE, title_justify="left")
    for column in ("task", "what it is", "metrics", "shots", "shipped subset"):
        table.add_column(column, justify="right" if column == "shots" else "left")
    for task in TASKS:
        shipped = "yes" if task in EMBEDDED_TASKS else "no"
        row = (DESCRIPTIONS[task], ", ".join(METRICS[task]), str(default_shots(task)), shipped)
        table.add_row(task, *row)
    out.print(table)
    out.print(
        "shipped subset: 200 items (MMLU: four subjects) inside llmflow, used when --data-dir"
        " is not given; the others need --data-dir with the published files.",
        highlight=False,
        soft_wrap=True,
    )


def _print_results(model: Path, results: dict[str, Any]) -> None:
    from llmflow.tasks.evaluate.evaluation import results_rows

    table = Table(title=f"llmflow evaluate: {model}")
    for column in ("task", "metric", "value", "± stderr", "items", "shots", "time"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in results_rows(results):
        table.add_row(
            row["task"],
            row["metric"],
            f"{row['value']:.4f}",
            "" if row["stderr"] is None else f"{row['stderr']:.4f}",
            str(row["items"]),
            str(row["shots"]),
            f"{results['results'][row['task']]['seconds']:.1f} s",
        )
    out.print(table)
    core = results["core"]
    out.print(
        f"CORE {core['value']:.4f} (accuracy centred on chance, mean over"
        f" {', '.join(core['tasks'])})",
        highlight=False,
        soft_wrap=True,
    )


def evaluate(
    tasks: Annotated[
        str,
        typer.Option(
            help="Comma-separated benchmark tasks, e.g. hellaswag,arc_easy,piqa; 'list' prints"
            " the known tasks."
        ),
    ],
    model: Annotated[
        Path | None,
        typer.Option(
            help="A Hugging Face model directory, a .gguf file, an llmflow run folder"
            " (data/pretrain/runs/<key>, data/sft/runs/<key>) or one of its checkpoints."
        ),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding the benchmark files in their published formats (default: the"
            " 200-item subsets shipped with llmflow, for a quick offline look)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score only the first N items of each task (N >= 1).")
    ] = None,
    num_fewshot: Annotated[
        int | None,
        typer.Option(help="Solved examples before each item (default: the task's, 5 for MMLU)."),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            min=1,
            help="Rows of up to 256 tokens per forward pass (requests sharing a prefix share it).",
        ),
    ] = 8,
    device: Annotated[
        str,
        typer.Option(
            help="Where the model runs: auto (CUDA when this machine has it, else the CPU), cpu,"
            " cuda, cuda:N or mps."
        ),
    ] = "auto",
    workdir: Annotated[
        str,
        typer.Option(
            help="Holds evaluations/ (the results files) and the MLflow store that records"
            " the run, as for `llmflow run`."
        ),
    ] = WORKDIR_DEFAULT,
    output: Annotated[
        Path | None,
        typer.Option(
            help="Where the JSON results (scores and standard errors) go.",
            show_default="<workdir>/evaluations/<model name>-<UTC time>.json",
        ),
    ] = None,
) -> None:
    """Score a model on benchmarks as lm-evaluation-harness does.

    Prints the results, saves them under the workdir and records them as a run in its MLflow
    store."""
    if tasks.strip() == "list":
        print_task_list()
        return
    if model is None:
        raise _fail("--model is required: the model to evaluate (`--tasks list` needs none)")
    if limit is not None and limit < 1:
        raise _fail(f"--limit {limit}: must be 1 or more (the items scored per task)")
    if num_fewshot is not None and num_fewshot < 0:
        raise _fail(f"--num-fewshot {num_fewshot}: must be 0 or more")
    from llmflow.tasks.evaluate.benchmarks import TASKS

    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TASKS]
    if unknown or not wanted:
        raise _fail(
            f"--tasks {tasks!r}: unknown task(s) {', '.join(unknown) or '(none given)'};"
            f" known: {', '.join(TASKS)} (`--tasks list` describes them)"
        )
    from llmflow.tasks.evaluate.evaluation import find_benchmark
    from llmflow.tasks.evaluate.model_loading import load_causal_lm, resolve_device
    from llmflow.tasks.ingest.embedded_data import BENCHMARKS_DIR

    try:
        resolved = resolve_device(device)
    except ValueError as error:
        raise _fail(f"--{error}") from None
    data_dir = data_dir or BENCHMARKS_DIR
    try:
        for task in wanted:
            find_benchmark(task, data_dir)
        lm, tokenizer = load_causal_lm(model, resolved)
    except (ValueError, OSError) as error:
        raise _fail(str(error)) from None

    root = Path(workdir)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    output = output or root / "evaluations" / f"{model_name(model)}-{stamp}.json"
    params = {
        "model": str(model),
        "tasks": ",".join(wanted),
        "data_dir": str(data_dir),
        "limit": str(limit),
        "num_fewshot": str(num_fewshot),
        "device": resolved,
        "batch_size": str(batch_size),
    }
    tracker, run_id = _start_run(root, model, params)
    try:
        results = _score(lm, tokenizer, wanted, data_dir, limit, num_fewshot, batch_size)
    except ValueError as error:  # a benchmark file with no usable record
        tracker.finish(run_id, ok=False)
        raise _fail(str(error)) from None
    except BaseException:
        tracker.finish(run_id, ok=False)
        raise
    results["config"] |= {"model": str(model), "device": resolved}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    _record(tracker, run_id, results, output)
    _print_results(model, results)
    out.print(f"results: {output.absolute()}", highlight=False, soft_wrap=True)
    out.print(
        f"MLflow run {run_id} (experiment {EXPERIMENT}, {tracker.tracking_uri})",
        highlight=False,
        soft_wrap=True,
    )
    if tracker.tracking_uri.startswith("sqlite:"):
        workdir_arg = shlex.quote(str(root.absolute()))
        out.print(f"MLflow UI: llmflow ui --workdir {workdir_arg}", highlight=False, soft_wrap=True)


def _score(
    lm: Any,
    tokenizer: Any,
    tasks: list[str],
    data_dir: Path,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
) -> dict[str, Any]:
    """The evaluation with a progress bar per task, and its CORE score."""
    from llmflow.tasks.core.progress import progress_per_task
    from llmflow.tasks.evaluate.evaluation import evaluate_model
    from llmflow.tasks.evaluate.summary_scores import core_score

    with progress_per_task("evaluate") as on_task:
        results = evaluate_model(
            lm, tokenizer, tasks, data_dir, limit, num_fewshot, on_task, batch_size=batch_size
        )
    core, centred = core_score(results["results"])
    results["core"] = {"value": core, "tasks": centred}
    return results


def _start_run(root: Path, model: Path, params: dict[str, str]) -> tuple[Any, str]:
    """A run named ``evaluate-<model name>`` in the workdir's MLflow store (the store and
    experiment ``llmflow run`` uses; $MLFLOW_TRACKING_URI overrides it as it does there)."""
    from llmflow.flows.tracking import PipelineTracker, resolve_tracking_uri

    root.mkdir(parents=True, exist_ok=True)  # the SQLite store's folder
    tracker = PipelineTracker(resolve_tracking_uri(None, str(root)), EXPERIMENT, str(root))
    tags = {"llmflow.command": "evaluate", "llmflow.model": str(model)}
    return tracker, tracker.start_parent(f"evaluate-{model_name(model)}", tags, params)


def _record(tracker: Any, run_id: str, results: dict[str, Any], output: Path) -> None:
    """The scores as the evaluate stage names them, the results file as an artifact."""
    from llmflow.tasks.evaluate.evaluation import results_metrics

    tracker.log(run_id, metrics=results_metrics(results))
    tracker.log_artifacts(run_id, output, "")
    tracker.finish(run_id, ok=True)
