"""The pipeline's config: every stage's config composed into one typed object.

The same object is the CLI's ``--config``/``--set``, the Prefect flow's parameters (and so the
Prefect UI's form) and the params logged to MLflow. Errors name the key and what is wrong.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
from llmflow.tasks.train.train_config import PretrainConfig, SftConfig, sft_batch_problem

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

    @model_validator(mode="after")
    def _sft_batch_fits(self) -> PipelineConfig:
        """SFT's sequences default to the pretrained model's context, which only the whole
        config knows; a batch the trainer cannot split is refused here, before any stage runs."""
        problem = sft_batch_problem(self.pretrain, self.sft)
        if problem:
            raise ValueError(f"sft.batch_tokens: {problem}")
        return self

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


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config class a field holds (``Model``, ``Model | None``, ``list[Model]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def _is_free_form(annotation: Any) -> bool:
    """A dict field (``pretrain.model``): its keys are the field's own validator's to check."""
    return typing.get_origin(annotation) is dict or any(
        typing.get_origin(arg) is dict for arg in typing.get_args(annotation)
    )


def unknown_key(
    shown: Sequence[str], root: type[BaseModel] = PipelineConfig, what: str = "the pipeline config"
) -> str | None:
    """Why the key path ``shown`` names no field of ``root``, with the nearest field as a hint;
    None if it names one. Its parts may carry list indexes (``variants[0]``); ``what`` names
    ``root`` in the message."""
    path = [re.sub(r"(\[\d+\])+$", "", part) for part in shown]
    key = ".".join(shown)
    model = root
    for depth, part in enumerate(path):
        fields = model.model_fields
        if part not in fields:
            near = difflib.get_close_matches(part, list(fields), n=1)
            if near:
                hint = f"did you mean {'.'.join([*shown[:depth], near[0]])!r}?"
            elif depth:
                hint = f"{'.'.join(shown[:depth])!r} has no field {part!r}"
            else:
                hint = f"{what} has no field {part!r}"
            return f"{key}: unknown key ({hint})"
        annotation = fields[part].annotation
        if _is_free_form(annotation):
            return None
        nested = _model_of(annotation)
        if nested is None:
            if depth < len(path) - 1:
                return f"{key}: unknown key ({'.'.join(shown[: depth + 1])!r} has no fields)"
            return None
        model = nested
    return None


def _check_key(path: list[str]) -> None:
    """Fail on a key the config does not have, suggesting the nearest one."""
    problem = unknown_key(path)
    if problem:
        raise ConfigError(problem)


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        child = tree.get(part)
        if not isinstance(child, dict):
            child = tree[part] = {}
        tree = child
    tree[path[-1]] = value


def _key_path(
    loc: Sequence[str | int], root: type[BaseModel]
) -> tuple[list[str], type[BaseModel] | None]:
    """The user's key path of an error's location (``pretrain.sample_prompts[0]``), without the
    union members' tags pydantic puts in it, and the config class at that path (None past one)."""
    parts: list[str] = []
    model: type[BaseModel] | None = root
    free = False
    for part in loc:
        if isinstance(part, int):
            if parts:
                parts[-1] += f"[{part}]"
            continue
        if free:
            parts.append(part)
        elif model is not None and part in model.model_fields:
            parts.append(part)
            annotation = model.model_fields[part].annotation
            free, model = _is_free_form(annotation), _model_of(annotation)
        # anything else is a tag: which member of a union failed
    return parts, model


def _got(value: Any) -> str:
    """The offending value, short; never a whole section of the config (a model's input)."""
    if isinstance(value, dict):
        return ""
    text = repr(value)
    return f" (got {text if len(text) <= 80 else text[:77] + '...'})"


def _validator_message(key: str, model: type[BaseModel] | None, message: str) -> str:
    """A validator's own message under its key path: ``batch_tokens: …`` raised by the pretrain
    section's validator reads ``pretrain.batch_tokens: …``; a message that names its key in full
    already is kept as it is."""
    named = re.match(r"([A-Za-z_]\w*(?:\.\w+)*): (.*)", message, re.S)
    if named and model is not None and named[1].split(".")[0] in model.model_fields:
        return f"{'.'.join(filter(None, [key, named[1]]))}: {named[2]}"
    if not key or message.startswith((f"{key}:", f"{key}.")):
        return message
    return f"{key}: {message}"


def describe_validation_error(
    error: ValidationError,
    root: type[BaseModel] = PipelineConfig,
    what: str = "the pipeline config",
) -> str:
    """One line per problem, each ``<key path>: <what is wrong>``: a misspelt key gets the
    nearest real one, a validator's message loses pydantic's "Value error, " prefix, and the
    input is shown only when it is one value (not a whole section of the config)."""
    problems: dict[str, list[str]] = {}
    inputs: dict[str, Any] = {}
    lines: list[str] = []
    for item in error.errors():
        parts, model = _key_path(item["loc"], root)
        key = ".".join(parts)
        if item["type"] == "extra_forbidden":
            # the unknown key itself is no field, so it is not in the walked path
            shown = [*_key_path(item["loc"][:-1], root)[0], str(item["loc"][-1])]
            lines.append(unknown_key(shown, root, what) or f"{'.'.join(shown)}: unknown key")
        elif item["type"] in ("value_error", "assertion_error"):
            cause = (item.get("ctx") or {}).get("error")
            message = str(cause) if cause is not None else item["msg"]
            lines.append(_validator_message(key, model, message))
        else:
            # a union's members each fail: one line for the key, their messages joined
            if key not in problems:
                problems[key], inputs[key] = [], item.get("input")
                lines.append(key)
            problems[key].append(item["msg"])
    return "\n".join(
        f"{line}: {' or '.join(problems[line])}{_got(inputs[line])}" if line in problems else line
        for line in lines
    )


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
        raise ConfigError(_each_line(what, str(error))) from error
    except ValidationError as error:
        raise ConfigError(_each_line(what, describe_validation_error(error))) from error


def _each_line(what: str, message: str) -> str:
    return "\n".join(f"{what}: {line}" for line in message.splitlines())


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
