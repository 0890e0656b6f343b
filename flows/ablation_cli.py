"""``llmflow ablate``: the curation ablation flow from the command line, with its ranking."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

# Only typer and rich with this module: `llmflow --help` imports it for the `ablate` command, and
# the configs import every stage (torch, Prefect); the command imports them when it runs.
from llmflow.flows.ui_servers import WORKDIR_DEFAULT


def ablate(
    ctx: typer.Context,
    config_file: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="YAML file of the base pipeline config."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override one field of the base config: KEY=VALUE."),
    ] = None,
    ablation_file: Annotated[
        Path | None,
        typer.Option(
            "--ablation",
            help="YAML file of the ablation: variants (name, stages, set), seeds, proxy,"
            " heldout, heldout_fraction (docs/ablation.md). Default: raw, heuristics,"
            " heuristics+dedup, full, full+classifier over 3 seeds.",
        ),
    ] = None,
    variants: Annotated[
        str | None, typer.Option(help="Comma-separated variant names: compare only these.")
    ] = None,
    seeds: Annotated[
        str | None, typer.Option(help="Comma-separated seeds, e.g. 0,1,2 (two at least).")
    ] = None,
    workdir: Annotated[
        str, typer.Option(help="Holds the datasets and the MLflow store.")
    ] = WORKDIR_DEFAULT,
) -> None:
    """Compare curation variants: does each step lower held-out bits per byte?

    Builds each variant's documents, trains the same proxy model on each for several seeds, and
    ranks the variants by held-out bits per byte with 95% intervals."""
    from llmflow.flows.ablation_config import load_ablation, variant_config
    from llmflow.flows.cli import fail, given, run_flow
    from llmflow.flows.config import ConfigError, load_config

    try:
        config = load_config(config_file, overrides, workdir if given(ctx, "workdir") else None)
        ablation = load_ablation(ablation_file, seeds, variants)
        for variant in ablation.variants:  # a bad override stops here, before any work
            variant_config(config, ablation, variant)
    except ConfigError as error:
        raise fail(error) from None

    def start() -> dict[str, Any]:
        from llmflow.flows.ablation import curation_ablation

        try:
            return curation_ablation(config=config, ablation=ablation)
        except ValueError as error:  # what the data cannot give (no held-out documents)
            raise fail(error, code=1) from None

    _print_ranking(run_flow(config, start))


def _print_ranking(result: dict[str, Any]) -> None:
    from llmflow.flows.ablation_report import HELDOUT
    from llmflow.flows.cli import out

    rows = {(r["variant"], r["metric"]): r for r in result["rows"]}
    facts = result["facts"]
    table = Table(title="llmflow curation ablation (lower bits per byte is better)")
    for column in ("rank", "variant", "held-out bits/byte", "± 95%", "documents", "epochs"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for rank, variant in enumerate(result["ranking"], 1):
        row = rows[(variant, HELDOUT)]
        data = facts["variants"][variant]
        table.add_row(
            str(rank),
            variant,
            f"{row['mean']:.4f}",
            f"{row['ci95']:.4f}",
            f"{data['documents']:,}",
            f"{data['epochs']:.2f}",
        )
    out.print(table)
    for a, b in result["ties"]:
        out.print(f"{a} and {b}: within each other's interval (not told apart)", highlight=False)
    if not result["ties"]:
        out.print("No two variants' intervals overlap.")
    out.print(
        f"MLflow run: {result['mlflow_run_id']} ({result['mlflow_tracking_uri']})",
        highlight=False,
        soft_wrap=True,
    )
