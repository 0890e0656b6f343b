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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

# Only typer, rich, the standard library and modules that import nothing heavier load with this
# module: `llmflow --help` imports it, and the config (every stage's module, torch, Prefect,
# scikit-learn) costs seconds. Each command imports what it needs (tests/test_cli_startup.py).
from llmflow.flows.ablation_cli import ablate
from llmflow.flows.evaluate_cli import evaluate
from llmflow.flows.ui_servers import WORKDIR_DEFAULT, ui
from llmflow.tasks.stage_names import STAGE_NAMES

if TYPE_CHECKING:
    from llmflow.flows.config import PipelineConfig

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


def fail(error: object, code: int = 2) -> typer.Exit:
    """Print ``error`` as ``Error: …`` lines (a config error has one per problem) and return
    the exit to raise; the text is printed as it is, never read as rich markup."""
    for line in str(error).splitlines() or [""]:
        err.print(f"[bold red]Error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    return typer.Exit(code=code)


def given(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave option ``name``. ``--workdir`` shows its default in the help, but a
    config file's ``workdir:`` wins over that default: only a given ``--workdir`` overrides it."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


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
    from llmflow.flows.config import ConfigError, DataLayout, stage_inputs
    from llmflow.tasks.core import shards
    from llmflow.tasks.core.document_versions import DOCUMENTS
    from llmflow.tasks.registry import GRAPH

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
    ctx: typer.Context,
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
            # ", " lets the help wrap between names at 80 columns instead of cutting one
            help="Comma-separated subset of the stages, in pipeline order:"
            f" {', '.join(STAGE_NAMES)} (e.g. --stages crawl,normalize); the others' outputs are"
            " read from disk."
        ),
    ] = None,
    workdir: Annotated[
        str, typer.Option(help="Holds the datasets, the MLflow store and Prefect's database.")
    ] = WORKDIR_DEFAULT,
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
    from llmflow.flows.config import ConfigError, load_config, resolve_stages

    try:
        config = load_config(config_file, overrides, workdir if given(ctx, "workdir") else None)
        selected = resolve_stages(stages)
        if refresh and "crawl" not in selected:
            raise ConfigError(f"--refresh starts with a new crawl; --stages {stages} has none")
        _check_inputs(config, selected)
    except ConfigError as error:
        raise fail(error) from None

    def start() -> dict[str, Any]:
        from llmflow.flows.pipeline import run_pipeline

        return run_pipeline(config, selected, refresh)

    from llmflow.flows.run_summary import print_summary

    # a run whose data came to nothing stopped early: its summary says where and why; exit 1
    result = run_flow(config, start)
    raise typer.Exit(code=print_summary(result, Path(config.workdir).absolute(), out))


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
        raise fail(error, code=3) from None
    except UIServerError as error:
        raise fail(error, code=1) from None


def _note(message: str) -> None:
    err.print(message, highlight=False, soft_wrap=True)


@app.command()
def serve(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML file of the config the deployments start with."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one field of that config: KEY=VALUE."),
    ] = None,
    workdir: Annotated[
        str, typer.Option(help="The deployments' workdir (datasets, MLflow store).")
    ] = WORKDIR_DEFAULT,
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
    """Serve the deployments to the Prefect server in $PREFECT_API_URL; Ctrl-C stops.

    The deployments are pipeline, data-refresh, train, evaluate and curation-ablation; their runs
    execute here.

    A run's parameters come from whoever creates it: runs are refused when they name a path
    outside the workdir, this config's own locations and --allow-root, or a dask_address not
    allowed (llmflow.flows.deployment_guard)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise fail(
            "llmflow serve needs a Prefect server: set PREFECT_API_URL"
            " (e.g. http://127.0.0.1:4200/api, the server `prefect server start` runs)"
        )
    from llmflow.flows.config import ConfigError, load_config

    try:
        config = load_config(config_file, overrides, workdir if given(ctx, "workdir") else None)
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=refresh_cron)
        except ValidationError:
            raise ConfigError(
                f"--refresh-cron {refresh_cron!r}: not a valid cron expression"
            ) from None
    except ConfigError as error:
        raise fail(error) from None
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
    # typer would read "[default: …]" in a help text as rich markup and drop it: show_default
    hours: Annotated[
        float | None, typer.Option(help="Wall-clock budget.", show_default="1.0")
    ] = None,
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
        typer.Option(help="Vocabulary size.", show_default="the manifest's, else 32768"),
    ] = None,
    depth: Annotated[
        int | None, typer.Option(help="Fix the depth (layers); the planner sizes the rest.")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Fix the sequence length.")] = None,
    mfu: Annotated[
        float | None, typer.Option(help="Assumed MFU on the GPU.", show_default="0.40")
    ] = None,
    memory_gb: Annotated[
        float | None, typer.Option(help="Memory per device in GiB (default: the GPU's; CPU 16).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Size a pretraining run to the data, the hardware and a budget.

    Prints the model, batch and steps, and why (times and MFU are predictions)."""
    from llmflow.tasks.train.planner import PlanError, hardware, plan_run

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
app.command()(evaluate)

if __name__ == "__main__":
    app()
