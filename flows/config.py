"""The pipeline's config: every stage's config composed into one typed object.

The same object is the CLI's ``--config``/``--set``, the Prefect flow's parameters (and so the
Prefect UI's form) and the params logged to MLflow. Errors name the key and what is wrong.
"""

from __future__ import annotations

import difflib
import json
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmflow.tasks.core.document_versions import DOCUMENTS, version_name, working_version
from llmflow.tasks.curate.decontaminate import DecontaminateConfig
from llmflow.tasks.curate.dedup import DedupConfig
from llmflow.tasks.curate.normalize import NormalizeConfig
from llmflow.tasks.curate.pii import PiiConfig
from llmflow.tasks.curate.quality import QualityConfig
from llmflow.tasks.curate.quality_model import QualityModelConfig
from llmflow.tasks.curate.toxicity import ToxicityConfig
from llmflow.tasks.evaluate.evaluate_config import EvaluateConfig
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.registry import GRAPH
from llmflow.tasks.train.bpe_tokenizer import TokenizerConfig
from llmflow.tasks.train.tokenize import TokenizeConfig
from llmflow.tasks.train.train_config import PretrainConfig, SftConfig

# The pipeline's stages, in order, as the registry declares them (llmflow.tasks.registry).
STAGES: tuple[str, ...] = GRAPH.names
# The stages that make the curated documents (the data phase); each refresh runs them over what
# is new, and their final output joins the versioned documents (tasks/core/document_versions.py).
DOCUMENT_STAGES: tuple[str, ...] = GRAPH.document_stages


def stage_inputs(stage: str) -> tuple[str, ...]:
    """The datasets ``stage`` reads: earlier stages, or the versioned documents."""
    return GRAPH[stage].inputs


class PipelineConfig(BaseModel):
    """Everything one run of the pipeline needs."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    workdir: str = Field(
        "llmflow-work",
        min_length=1,
        description="Holds the datasets, the default MLflow store and the Prefect database.",
    )
    data_root: str | None = Field(
        None,
        description=(
            "Where datasets live: a local path or an fsspec URL (s3://…, memory://…)."
            " Default: <workdir>/data."
        ),
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description=(
            "MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else a SQLite file"
            " <workdir>/mlflow.db with artifacts in <workdir>/mlartifacts."
        ),
    )
    experiment: str = Field(
        "llmflow", min_length=1, description="MLflow experiment the runs go to."
    )
    max_workers: int = Field(
        2, ge=1, description="Units of work (shards, files) a stage processes at once."
    )
    units_per_task: int | None = Field(
        None,
        ge=1,
        description=(
            "Units of work (shards, files) per Prefect task run. None: chosen per stage, one"
            " unit per task run up to 256 units, then batches that keep a stage at most"
            " max(256, 4 x max_workers) task runs (flows/unit_batches.py). Changes no output."
        ),
    )
    runner: Literal["threads", "processes", "dask"] = Field(
        "threads",
        description=(
            "Where the data stages' units run: threads or processes on this machine, or a Dask"
            " cluster (prefect-dask): a local one with max_workers worker processes, or the"
            " scheduler at dask_address."
        ),
    )
    dask_address: str | None = Field(
        None, description="runner=dask: a running Dask scheduler (tcp://host:8786). None: local."
    )
    crawl: CrawlConfig = Field(default_factory=CrawlConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    quality_model: QualityModelConfig = Field(default_factory=QualityModelConfig)
    toxicity: ToxicityConfig = Field(default_factory=ToxicityConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SftConfig = Field(default_factory=SftConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    def dataset_root(self) -> str:
        return self.data_root or str(Path(self.workdir).absolute() / "data")


class StageLayout(Protocol):
    """Where each dataset of a run lives, as the stage runner asks: the pipeline's
    :class:`DataLayout`, or a curation ablation's variant (:mod:`llmflow.flows.ablation_layout`),
    whose stages live outside the documents versions."""

    @property
    def versioned(self) -> bool:
        """Whether the document stages write into a documents version."""
        ...

    def stage_dir(self, stage: str) -> str: ...


@dataclass(frozen=True)
class DataLayout:
    """Where each dataset of a run lives: the data root and the documents version the data
    phase writes into. Reading that version is the one piece of I/O, done once in :meth:`of`,
    so the config itself never touches the disk."""

    root: str
    version: int
    versioned: bool = True

    @classmethod
    def of(cls, config: PipelineConfig) -> DataLayout:
        """The layout of ``config``'s data root as it is now (the newest documents version
        begun, 1 before any)."""
        root = config.dataset_root().rstrip("/")
        return cls(root, working_version(f"{root}/{DOCUMENTS}"))

    def stage_dir(self, stage: str) -> str:
        """Where a stage's dataset lives; ``documents`` is the versioned curated documents.

        The document stages write into the version being made, so a refresh never touches an
        older version's files.
        """
        if stage == DOCUMENTS:
            return f"{self.root}/{DOCUMENTS}"
        if stage in GRAPH.document_stages:
            return f"{self.root}/{DOCUMENTS}/{version_name(self.version)}/{stage}"
        return f"{self.root}/{stage}"


class ConfigError(ValueError):
    """A config the pipeline cannot run with; the message names the key and the problem."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=VALUE`` → (["a", "b"], value); the value is JSON if it parses, else a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. crawl.max_pages=50")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def _check_key(path: list[str]) -> None:
    """Fail on a key the config does not have, suggesting the nearest one."""
    model: type[BaseModel] = PipelineConfig
    for depth, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            where = ".".join(path[:depth]) or "the pipeline config"
            near = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean {'.'.join([*path[:depth], near[0]])!r}?)" if near else ""
            raise ConfigError(
                f"unknown key {'.'.join(path)!r}: {where} has no field {part!r}{hint}"
            )
        annotation = fields[part].annotation
        if typing.get_origin(annotation) is dict:
            return  # free-form keys (pretrain.model): the model's own validator checks them
        nested = (
            annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel)
            else None
        )
        if depth < len(path) - 1 and nested is None:
            raise ConfigError(
                f"unknown key {'.'.join(path)!r}: {'.'.join(path[: depth + 1])!r} has no fields"
            )
        if nested is not None:
            model = nested


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[path[-1]] = value


def describe_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown key {key!r}")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "invalid config: " + "; ".join(lines)


def with_overrides(config: PipelineConfig, overrides: list[str], what: str) -> PipelineConfig:
    """``config`` with ``KEY=VALUE`` overrides applied (as ``--set`` applies them); ``what``
    names where they come from in an error (an ablation's variant)."""
    tree = config.model_dump(mode="json")
    try:
        for item in overrides:
            path, value = parse_override(item)
            _check_key(path)
            _set(tree, path, value)
        return PipelineConfig.model_validate(tree)
    except ConfigError as error:
        raise ConfigError(f"{what}: {error}") from error
    except ValidationError as error:
        raise ConfigError(f"{what}: {describe_validation_error(error)}") from error


def load_config(
    config_file: Path | None = None,
    overrides: list[str] | None = None,
    workdir: str | None = None,
) -> PipelineConfig:
    """Build the config from an optional YAML file, then ``--set`` overrides, then ``--workdir``."""
    tree: dict[str, Any] = {}
    if config_file is not None:
        try:
            loaded = yaml.safe_load(Path(config_file).read_text(encoding="utf-8"))
        except OSError as error:
            raise ConfigError(f"config file {config_file}: cannot read it ({error})") from error
        except UnicodeDecodeError as error:
            raise ConfigError(
                f"config file {config_file}: not UTF-8 text (byte {error.start}:"
                f" {error.reason}); save it as UTF-8"
            ) from error
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {config_file}: not valid YAML ({error})") from error
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                f"config file {config_file}: expected a mapping of keys,"
                f" got {type(loaded).__name__}"
            )
        tree = loaded
    for item in overrides or []:
        path, value = parse_override(item)
        _check_key(path)
        _set(tree, path, value)
    if workdir is not None:
        tree["workdir"] = workdir
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error)) from error


def resolve_stages(names: str | None) -> list[str]:
    """``--stages crawl,normalize`` → the stages in pipeline order; unknown names are errors."""
    if not names:
        return list(GRAPH.names)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in GRAPH.names]
    if unknown or not wanted:
        raise ConfigError(
            f"--stages {names!r}: unknown stage(s) {', '.join(unknown) or '(none given)'};"
            f" known: {', '.join(GRAPH.names)}"
        )
    return [s for s in GRAPH.names if s in wanted]
