"""The deployments llmflow serves, and their parameter presets.

One flow (:func:`llmflow.flows.pipeline.pipeline`), four ways to run it from the Prefect UI:

- ``pipeline``: every stage, crawl to evaluation, on demand;
- ``data-refresh``: the data stages (crawl to token shards) on a schedule, daily by default; each
  run is an incremental refresh that adds a new version of the documents
  (:mod:`llmflow.tasks.core.document_versions`), and one that finds the data still being written by
  another run fails at once, saying which (:mod:`llmflow.tasks.core.dataset_lock`);
- ``train``: the tokenizer, token shards, pretraining and SFT on the data already curated;
- ``evaluate``: the evaluation of the SFT model (or of ``config.evaluate.model``).

Each deployment's parameters are the typed :class:`~llmflow.flows.config.PipelineConfig` (so the
Prefect UI shows a form with every field's default and description, and Prefect refuses a run
whose values break the schema, naming the field) and the list of stages. ``llmflow serve`` serves
them from this process; ``prefect.yaml`` declares the same for work pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmflow.flows.config import STAGES, PipelineConfig

DEFAULT_REFRESH_CRON = "0 3 * * *"  # daily, 03:00 (the server's time zone: UTC by default)
DATA_STAGES: tuple[str, ...] = STAGES[: STAGES.index("tokenize") + 1]


@dataclass(frozen=True)
class Preset:
    """What a deployment runs: its stages (None: all), whether it runs on a schedule, and whether
    each run is an incremental refresh of the documents."""

    description: str
    stages: tuple[str, ...] | None
    scheduled: bool = False
    refresh: bool = False


PRESETS: dict[str, Preset] = {
    "pipeline": Preset("Every stage: crawl to an instruction-tuned, evaluated model.", None),
    "data-refresh": Preset(
        "A new version of the documents from what changed on the web, then token shards.",
        DATA_STAGES,
        scheduled=True,
        refresh=True,
    ),
    "train": Preset(
        "Tokenizer, token shards, pretraining and SFT on the curated documents.",
        ("tokenizer", "tokenize", "pretrain", "sft"),
    ),
    "evaluate": Preset("Benchmarks, held-out bits per byte and chat samples.", ("evaluate",)),
}


def preset_parameters(name: str, config: PipelineConfig) -> dict[str, Any]:
    """The flow parameters a deployment starts with (the UI's form shows them, editable).

    Deployment runs crawl the open web on someone's say-so: unless the serving config says
    otherwise, their crawl refuses hosts that resolve to private, loopback or link-local
    addresses (flows/deployment_guard.py refuses a run that turns it back on).
    """
    preset = PRESETS[name]
    if "allow_private_addresses" not in config.crawl.model_fields_set:
        crawl = config.crawl.model_copy(update={"allow_private_addresses": False})
        config = config.model_copy(update={"crawl": crawl})
    return {
        "config": config.model_dump(mode="json"),
        "stages": list(preset.stages) if preset.stages is not None else None,
        "refresh": preset.refresh,
    }


def build_deployments(
    config: PipelineConfig | None = None, refresh_cron: str = DEFAULT_REFRESH_CRON
) -> list[Any]:
    """The four deployments as Prefect ``RunnerDeployment`` objects, ready for ``prefect.serve``.

    The flow is referenced by module path (``llmflow.flows.pipeline:pipeline``), so the runner's
    flow-run processes import it from the installed package wherever they start.
    """
    from prefect.deployments.runner import EntrypointType

    from llmflow.flows.pipeline import pipeline

    config = config or PipelineConfig()
    deployments = []
    for name, preset in PRESETS.items():
        deployments.append(
            pipeline.to_deployment(
                name=name,
                description=preset.description,
                parameters=preset_parameters(name, config),
                cron=refresh_cron if preset.scheduled else None,
                tags=["llmflow"],
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments
