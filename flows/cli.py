"""The ``llmflow`` command.

Prefect reads its settings once, when it is first imported; this module therefore decides where
Prefect keeps its database (the workdir, unless the user points elsewhere) before anything imports
prefect, and imports the flow only once the config has been checked. A bad config exits with code
2 before a single file is written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from llmflow.flows.ablation_cli import ablate
from llmflow.flows.config import (
    STAGES,
    ConfigError,
    DataLayout,
    PipelineConfig,
    load_config,
    resolve_stages,
    stage_inputs,
)
from llmflow.flows.ui_servers import ui
from llmflow.tasks.core.document_versions import DOCUMENTS
from llmflow.tasks.registry import GRAPH

app = typer.Typer(
    help="llmflow: from raw web text to a trained, instruction-tuned, evaluated language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
# Piped into a file or a CI log, rich would lay tables out in 80 columns and cut the stage
# names ("quality…" reads as two stages at once); a log has room for the whole table.
out = Console() if sys.stdout.isatty() else Console(width=120)


@app.callback()
def main() -> None:
    """Prefect flows over Parquet datasets, every run recorded in MLflow."""


def _prefect_environment(workdir: Path) -> dict[str, str]:
    """Where Prefect keeps its state: the workdir, unless PREFECT_HOME or PREFECT_API_URL say else.

    Keeping it in the workdir puts each project's flow runs beside its data, and lets the summary
    print the one command that opens them in the Prefect UI.
    """
    env: dict[str, str] = {}
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        env["PREFECT_HOME"] = str(workdir / "prefect")
    # The temporary server's telemetry heartbeat races its own first database migration on
    # SQLite and prints a "database is locked" traceback; an offline default should not phone
    # home anyway.
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return {k: v for k, v in env.items() if k not in os.environ}


def _check_inputs(config: PipelineConfig, stages: list[str]) -> None:
    """A stage run without the one before it reads that stage's dataset: it must be there."""
    from llmflow.tasks.core import shards

    layout = DataLayout.of(config)
    for stage in stages:
        for previous in stage_inputs(stage):
            if previous in stages or (
                previous == DOCUMENTS and GRAPH.document_stages[-1] in stages
            ):
                continue
            manifest = shards.join(layout.stage_dir(previous), shards.MANIFEST_NAME)
            if not shards.exists(manifest):
                first = ",".join(GRAPH.document_stages) if previous == DOCUMENTS else previous
                raise ConfigError(
                    f"--stages {','.join(stages)}: stage {stage!r} reads the {previous!r}"
                    f" output, but {manifest} does not exist; run --stages {first} first"
                )


@app.command()
def run(
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML file of the pipeline config (see README)."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="Override one field: KEY=VALUE, e.g. crawl.max_pages=50 or"
            " 'crawl.seeds=[\"https://example.org/\"]'. VALUE is parsed as JSON, else a string.",
        ),
    ] = None,
    stages: Annotated[
        str | None,
        typer.Option(
            help=f"Comma-separated subset of stages ({','.join(STAGES)}); the others' outputs"
            " are read from disk."
        ),
    ] = None,
    workdir: Annotated[
        str | None,
        typer.Option(
            help="Holds the datasets, the MLflow store and Prefect's database."
            " [default: ./llmflow-work]"
        ),
    ] = None,
    refresh: Annotated[
        bool,
        typer.Option(
            "--refresh",
            help="Make a new version of the documents from what is new or changed since the"
            " last: conditional re-crawl, only new documents processed, the dedup index kept.",
        ),
    ] = False,
) -> None:
    """Run the pipeline (crawl to an evaluated model) and print what each stage did."""
    try:
        config = load_config(config_file, overrides, workdir)
        selected = resolve_stages(stages)
        if refresh and "crawl" not in selected:
            raise ConfigError(f"--refresh starts with a new crawl; --stages {stages} has none")
        _check_inputs(config, selected)
    except ConfigError as error:
        err.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None

    def start() -> dict[str, Any]:
        from llmflow.flows.pipeline import run_pipeline

        return run_pipeline(config, selected, refresh)

    _print_summary(run_flow(config, start), Path(config.workdir).absolute())


def run_flow(config: PipelineConfig, start: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``start()`` a flow with Prefect's state in the workdir and, unless PREFECT_API_URL names
    a server, a temporary Prefect API for the run; a busy dataset exits with code 3."""
    workdir_path = Path(config.workdir).absolute()
    os.environ.update(_prefect_environment(workdir_path))
    workdir_path.mkdir(parents=True, exist_ok=True)

    from llmflow.flows.prefect_api import temporary_api
    from llmflow.flows.ui_servers import UIServerError
    from llmflow.tasks.core.dataset_lock import DatasetBusyError

    own_api = not os.environ.get("PREFECT_API_URL")
    try:
        with temporary_api(workdir_path, _note) if own_api else contextlib.nullcontext():
            return start()
    except DatasetBusyError as error:
        err.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=3) from None
    except UIServerError as error:
        err.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=1) from None


def _note(message: str) -> None:
    err.print(message, highlight=False, soft_wrap=True)


@app.command()
def serve(
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML file of the config the deployments start with."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one field of that config: KEY=VALUE."),
    ] = None,
    workdir: Annotated[
        str | None,
        typer.Option(
            help="The deployments' workdir (datasets, MLflow store). [default: ./llmflow-work]"
        ),
    ] = None,
    refresh_cron: Annotated[
        str, typer.Option(help="When the data-refresh deployment runs (cron, server time zone).")
    ] = "0 3 * * *",
    allow_roots: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-root",
            help="A folder (or fsspec URL prefix) a run's paths may also name, besides the"
            " workdir and the locations this config names; repeatable.",
        ),
    ] = None,
    allow_dask_addresses: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-dask-address",
            help="A Dask scheduler (tcp://host:8786) a run may name as dask_address; repeatable.",
        ),
    ] = None,
) -> None:
    """Serve the deployments (pipeline, data-refresh, train, evaluate, curation-ablation) to the
    Prefect server in $PREFECT_API_URL; their runs execute here. Ctrl-C stops serving.

    A run's parameters come from whoever creates it: runs are refused when they name a path
    outside the workdir, this config's own locations and --allow-root, or a dask_address not
    allowed (llmflow.flows.deployment_guard)."""
    if not os.environ.get("PREFECT_API_URL"):
        err.print(
            "[bold red]Error:[/] llmflow serve needs a Prefect server: set PREFECT_API_URL"
            " (e.g. http://127.0.0.1:4200/api, the server `prefect server start` runs)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=2)
    try:
        config = load_config(config_file, overrides, workdir)
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=refresh_cron)
        except ValidationError:
            raise ConfigError(
                f"--refresh-cron {refresh_cron!r}: not a valid cron expression"
            ) from None
    except ConfigError as error:
        err.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    config = config.model_copy(update={"workdir": str(Path(config.workdir).absolute())})
    from llmflow.flows.deployment_guard import serve_environment

    # The flow runs are this process's children: they inherit the allow-lists, which no run's
    # parameters can change.
    guard = serve_environment(config, allow_roots or [], allow_dask_addresses or [])
    os.environ.update(guard)
    out.print(
        f"Deployment runs may name paths under: {guard['LLMFLOW_ALLOWED_ROOTS']}"
        f" (--allow-root adds one)",
        highlight=False,
        soft_wrap=True,
    )
    from prefect import serve as prefect_serve

    from llmflow.deployments.pipeline_deployments import build_deployments

    prefect_serve(*build_deployments(config, refresh_cron))


@app.command()
def evaluate(
    model: Annotated[
        Path,
        typer.Option(
            help="A Hugging Face model directory, a .gguf file, an llmflow run folder"
            " (data/pretrain/runs/<key>, data/sft/runs/<key>) or one of its checkpoints."
        ),
    ],
    tasks: Annotated[
        str, typer.Option(help="Comma-separated benchmark tasks, e.g. hellaswag,arc_easy,piqa.")
    ],
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder holding the benchmark files in their published formats (default: the"
            " 200-item subsets shipped with llmflow, for a quick offline look)."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score only the first N items of each task.")
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
    output: Annotated[
        Path, typer.Option(help="Where the JSON results (scores and standard errors) go.")
    ] = Path("eval-results.json"),
) -> None:
    """Score a model on benchmarks as lm-evaluation-harness does; print and save the results."""
    from llmflow.tasks.evaluate.benchmarks import TASKS

    wanted = [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in wanted if t not in TASKS]
    if unknown or not wanted:
        err.print(
            f"[bold red]Error:[/] --tasks {tasks!r}: unknown task(s)"
            f" {', '.join(unknown) or '(none given)'}; known: {', '.join(TASKS)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(code=2)
    from llmflow.tasks.core.progress import progress_per_task
    from llmflow.tasks.evaluate.evaluation import evaluate_model, find_benchmark, results_rows
    from llmflow.tasks.evaluate.model_loading import load_causal_lm
    from llmflow.tasks.evaluate.summary_scores import core_score
    from llmflow.tasks.ingest.embedded_data import BENCHMARKS_DIR

    data_dir = data_dir or BENCHMARKS_DIR
    try:
        for task in wanted:
            find_benchmark(task, data_dir)
        lm, tokenizer = load_causal_lm(model)
    except (ValueError, OSError) as error:
        err.print(f"[bold red]Error:[/] {error}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None

    with progress_per_task("evaluate") as on_task:
        results = evaluate_model(
            lm, tokenizer, wanted, data_dir, limit, num_fewshot, on_task, batch_size=batch_size
        )
    results["config"]["model"] = str(model)
    output.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
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
    core, centred = core_score(results["results"])
    out.print(
        f"CORE {core:.4f} (accuracy centred on chance, mean over {', '.join(centred)})",
        highlight=False,
        soft_wrap=True,
    )
    out.print(f"results: {output}", highlight=False, soft_wrap=True)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _tool(name: str) -> str:
    """The console script beside this interpreter, so the printed command works as is."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        return name
    try:
        return str(candidate.relative_to(Path.cwd()))
    except ValueError:
        return str(candidate)


def _print_documents_version(documents: dict[str, Any]) -> None:
    """The version of the documents the run published, and what its refresh found."""
    refresh = documents["refresh"]
    removed = ", ".join(f"{k} {v}" for k, v in refresh["removed_by_reason"].items())
    out.print(
        f"documents v{documents['version']:04d}: {documents['kept']} documents;"
        f" this version fetched {refresh['fetched']}, unchanged {refresh['unchanged']},"
        f" added {refresh['added']}, removed {refresh['removed']}"
        + (f" ({removed})" if removed else ""),
        highlight=False,
        soft_wrap=True,
    )


def _print_summary(result: dict[str, Any], workdir: Path) -> None:
    table = Table(title="llmflow pipeline")
    columns = ("stage", "in", "kept", "rejected", "fetch failures", "size", "time", "units run")
    for column in columns:
        # a narrow terminal wraps the headers, never a stage's name
        left = column == "stage"
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    for s in result["stages"]:
        table.add_row(
            s["stage"],
            str(s["docs_in"]),
            str(s["kept"]),
            str(s["rejected"]),
            str(s["fetch_failures"]),
            _human_bytes(s["bytes"]),
            f"{s['seconds']:.1f} s",
            f"{s['units'] - s['units_skipped']}/{s['units']}",
        )
    out.print(table)
    for s in result["stages"]:
        out.print(f"{s['stage']}: {s['path']}", highlight=False, soft_wrap=True)
        if s.get("summary"):
            out.print(f"  {s['summary']}", highlight=False, soft_wrap=True)
        if s["rejected_by_reason"]:
            reasons = ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items())
            out.print(f"  rejected: {reasons}", highlight=False, soft_wrap=True)
        if s["stage"] == GRAPH.document_stages[-1] and result.get("documents"):
            _print_documents_version(result["documents"])
    if all(s["units_skipped"] == s["units"] for s in result["stages"]):
        out.print("Nothing to do: every unit of work was already complete.")
    uri = result["mlflow_tracking_uri"]
    out.print(f"MLflow run: {result['mlflow_run_id']} ({uri})", highlight=False, soft_wrap=True)
    out.print(f"Prefect flow run: {result['prefect_flow_run_id']}", highlight=False)
    if os.environ.get("PREFECT_API_URL"):
        prefect_url = os.environ["PREFECT_API_URL"].removesuffix("/api")
        out.print(f"Prefect UI:  open {prefect_url}", highlight=False, soft_wrap=True)
    if uri.startswith("sqlite:"):
        mlflow_cmd = f"{_tool('mlflow')} ui --backend-store-uri {shlex.quote(uri)}"
    else:
        mlflow_cmd = f"open {uri}"
    out.print(f"MLflow UI:   {mlflow_cmd}", highlight=False, soft_wrap=True)
    # llmflow ui, not a bare `prefect server start`: it puts the API behind the workdir's auth
    # string and limits CORS to its own UI (README, Security).
    workdir_arg = shlex.quote(str(workdir))
    out.print(f"Both UIs:    {_tool('llmflow')} ui --workdir {workdir_arg}", highlight=False)


@app.command()
def plan(
    tokens: Annotated[
        str | None,
        typer.Option(help="Training tokens of the dataset, e.g. 2e9 or 40_925."),
    ] = None,
    workdir: Annotated[
        Path | None,
        typer.Option(
            help="Read the training tokens and the vocabulary from this workdir's"
            " data/tokenize/manifest.json instead of --tokens."
        ),
    ] = None,
    gpu: Annotated[
        str | None, typer.Option(help="GPU model: H100, H200, A100, L4, RTX 4090, …")
    ] = None,
    gpus: Annotated[int, typer.Option(help="How many of them (one machine).")] = 1,
    cpu: Annotated[bool, typer.Option("--cpu", help="Plan for this CPU (the default).")] = False,
    hours: Annotated[float | None, typer.Option(help="Wall-clock budget. [default: 1.0]")] = None,
    budget_usd: Annotated[
        float | None, typer.Option(help="Budget in dollars instead of --hours.")
    ] = None,
    usd_per_gpu_hour: Annotated[
        float | None, typer.Option(help="Price of one GPU-hour (with --budget-usd).")
    ] = None,
    tokens_per_param: Annotated[
        float, typer.Option(help="Training tokens per parameter: 10.5 (nanochat), 20 (Chinchilla).")
    ] = 10.5,
    max_epochs: Annotated[
        float, typer.Option(help="Passes over the data before a smaller model is preferred.")
    ] = 4.0,
    vocab_size: Annotated[
        int | None,
        typer.Option(help="Vocabulary size. [default: the manifest's, else 32768]"),
    ] = None,
    depth: Annotated[
        int | None, typer.Option(help="Fix the depth (layers); the planner sizes the rest.")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Fix the sequence length.")] = None,
    mfu: Annotated[
        float | None, typer.Option(help="Assumed MFU on the GPU. [default: 0.40]")
    ] = None,
    memory_gb: Annotated[
        float | None, typer.Option(help="Memory per device in GiB (default: the GPU's; CPU 16).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Size the model, batch and steps to the data, the hardware and a budget; print the plan and
    why (times and MFU are predictions)."""
    from llmflow.tasks.train.planner import PlanError, hardware, plan_run

    def fail(message: str) -> typer.Exit:
        err.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True)
        return typer.Exit(code=2)

    if (tokens is None) == (workdir is None):
        raise fail("give one of --tokens N and --workdir DIR (the tokenized data to plan for)")
    if gpu is not None and cpu:
        raise fail("--gpu and --cpu: plan for one of them")
    vocab = vocab_size
    if workdir is not None:
        manifest_path = workdir / "data" / "tokenize" / "manifest.json"
        try:
            manifest = json.loads(manifest_path.read_text())
            data_tokens = int(manifest["tokens"]["train"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            message = f"--workdir {workdir}: no tokenize manifest at {manifest_path} ({error})"
            raise fail(message) from None
        vocab = vocab or int((manifest.get("tokenizer") or {}).get("vocab_size") or 32768)
    else:
        try:
            data_tokens = int(float(str(tokens).replace("_", "").replace(",", "")))
        except ValueError:
            raise fail(f"--tokens {tokens!r}: not a number") from None
    try:
        planned = plan_run(
            data_tokens,
            hardware(gpu or "cpu", gpus, mfu=mfu, memory_gib=memory_gb),
            hours=hours,
            budget_usd=budget_usd,
            usd_per_gpu_hour=usd_per_gpu_hour,
            tokens_per_param=tokens_per_param,
            max_epochs=max_epochs,
            vocab_size=vocab or 32768,
            seq_len=seq_len,
            depth=depth,
        )
    except PlanError as error:
        raise fail(str(error)) from None
    if as_json:
        out.print_json(data=planned.model_dump(mode="json") | {"text": planned.text()})
    else:
        out.print(planned.text(), highlight=False, soft_wrap=True)


app.command()(ui)
app.command()(ablate)

if __name__ == "__main__":
    app()
