"""The deployments llmflow serves, and their parameter presets.

One deployment per flow of :mod:`llmflow.flows.pipeline`, so that the Prefect UI shows each
phase's own runs, parameters and task runs:

- ``pipeline`` (the pipeline flow): every phase, crawl to evaluation, on demand;
- ``data-refresh`` (the data flow): crawl to the curated documents on a schedule, daily by
  default; each run is an incremental refresh that adds a new version of the documents
  (:mod:`llmflow.tasks.core.document_versions`), and one that finds the data still being written by
  another run fails at once, saying which (:mod:`llmflow.tasks.core.dataset_lock`);
- ``train`` (the train flow): the tokenizer, token shards, pretraining and SFT on the documents;
- ``evaluate`` (the evaluate flow): the evaluation of the SFT model (or of
  ``config.evaluate.model``);
- ``curation-ablation`` (:mod:`llmflow.flows.ablation`): every curation variant's documents,
  a proxy model per variant and seed, the variants ranked with 95% intervals.

Each deployment's parameters are the typed :class:`~llmflow.flows.config.PipelineConfig` (so the
Prefect UI shows a form with every field's default and description, and Prefect refuses a run
whose values break the schema, naming the field) and, where its flow takes them, the stages and
whether the run is a refresh. The stage sets are the stage graph's phases. ``llmflow serve`` serves
them from this process; ``prefect.yaml`` declares the same for work pools.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmflow.flows.config import PipelineConfig
from llmflow.tasks.registry import GRAPH

DEFAULT_REFRESH_CRON = "0 3 * * *"  # daily, 03:00 (the server's time zone: UTC by default)
DATA_STAGES: tuple[str, ...] = GRAPH.phase("data")


@dataclass(frozen=True)
class Preset:
    """What a deployment runs: its flow (``pipeline`` or a phase), the stages it runs, whether
    it runs on a schedule, and whether each run is an incremental refresh of the documents."""

    flow: str
    description: str
    scheduled: bool = False
    refresh: bool = False
    module: str = "pipeline"  # the flows/ module that defines the flow

    @property
    def stages(self) -> tuple[str, ...]:
        if self.module != "pipeline":
            return ()
        return GRAPH.names if self.flow == "pipeline" else GRAPH.phase(self.flow)  # type: ignore[arg-type]


PRESETS: dict[str, Preset] = {
    "pipeline": Preset("pipeline", "Every stage: crawl to an instruction-tuned, evaluated model."),
    "data-refresh": Preset(
        "data",
        "A new version of the documents from what changed on the web.",
        scheduled=True,
        refresh=True,
    ),
    "train": Preset("train", "Tokenizer, token shards, pretraining and SFT on the documents."),
    "evaluate": Preset("evaluate", "Benchmarks, held-out bits per byte and chat samples."),
    "curation-ablation": Preset(
        "curation_ablation",
        "Does curation help? A proxy model per variant and seed, ranked with 95% intervals.",
        module="ablation",
    ),
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
    parameters: dict[str, Any] = {"config": config.model_dump(mode="json")}
    if preset.flow in ("pipeline", "data", "train"):
        parameters["stages"] = None  # all of the flow's stages; the UI's form can pick fewer
    if preset.flow in ("pipeline", "data"):
        parameters["refresh"] = preset.refresh
    if preset.flow == "curation_ablation":
        from llmflow.flows.ablation_config import AblationConfig

        parameters["ablation"] = AblationConfig().model_dump(mode="json")
    return parameters


def build_deployments(
    config: PipelineConfig | None = None, refresh_cron: str = DEFAULT_REFRESH_CRON
) -> list[Any]:
    """The deployments as Prefect ``RunnerDeployment`` objects, ready for ``prefect.serve``.

    Each flow is referenced by module path (``llmflow.flows.pipeline.data``, ...), so the
    runner's flow-run processes import it from the installed package wherever they start.
    """
    from prefect.deployments.runner import EntrypointType

    from llmflow.flows.pipeline import FLOWS

    config = config or PipelineConfig()
    deployments = []
    for name, preset in PRESETS.items():
        deployments.append(
            FLOWS[preset.flow].to_deployment(
                name=name,
                description=preset.description,
                parameters=preset_parameters(name, config),
                cron=refresh_cron if preset.scheduled else None,
                tags=["llmflow"],
                entrypoint_type=EntrypointType.MODULE_PATH,
            )
        )
    return deployments
