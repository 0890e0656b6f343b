"""A curation ablation's config, and where each variant's datasets live.

A variant is a name, the document stages it runs and config overrides on the base config. Its
stages live under the ablation's root in folders named by a hash of the chain that made them
(each stage's name and output config, and those of every stage before it), so two variants that
share a prefix of stages and settings share its folders and the prefix runs once; a stage a
variant leaves out hands its input on (its folder is the previous stage's).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from llmflow.flows.config import (
    ConfigError,
    PipelineConfig,
    describe_validation_error,
    with_overrides,
)
from llmflow.tasks.core.document_versions import DOCUMENTS
from llmflow.tasks.registry import GRAPH

ABLATION_DIR = "ablation"

# The proxy of the embedded default, per variant and seed: the tiny preset for 40 steps of 4,096
# tokens (~20 s on two CPU cores) and the first 20 items of each benchmark, so that 5 variants x
# 3 seeds fit in 15 minutes. On a GPU, raise them (pretrain.preset, max_steps, evaluate.limit).
DEFAULT_PROXY = [
    "pretrain.max_steps=40",
    "pretrain.batch_tokens=4096",
    "pretrain.warmup_steps=8",
    "pretrain.eval_interval=40",
    "pretrain.checkpoint_interval=40",
    "pretrain.keep_checkpoints=1",
    "pretrain.sample_prompts=[]",
    "evaluate.limit=20",
]


class Variant(BaseModel):
    """One way of curating the documents."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$",
        description="Shown in the report and MLflow: letters, digits and _ . + -",
    )
    stages: list[str] = Field(
        description="The document stages it runs, the first (crawl) included; one left out"
        " passes its input on."
    )
    set: list[str] = Field(
        default_factory=list, description="Overrides (KEY=VALUE, as --set) on the base config."
    )

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: list[str]) -> list[str]:
        known = GRAPH.document_stages
        unknown = [s for s in stages if s not in known]
        if unknown:
            raise ValueError(f"unknown document stage(s) {unknown}; known: {', '.join(known)}")
        if known[0] not in stages:
            raise ValueError(f"a variant starts with {known[0]}: add it to stages")
        return [s for s in known if s in stages]


def default_variants() -> list[Variant]:
    """raw (normalized text only), the heuristics, + dedup, every curation stage, + the
    classifier keeping the best-scored half (DCLM kept its top 10% of a far bigger pool)."""
    stages = list(GRAPH.document_stages)
    base = stages[: stages.index("normalize") + 1]
    full = [s for s in stages if s != "quality_model"]
    return [
        Variant(name="raw", stages=base),
        Variant(name="heuristics", stages=[*base, "quality"]),
        Variant(name="heuristics+dedup", stages=[*base, "quality", "dedup"]),
        Variant(name="full", stages=full),
        Variant(
            name="full+classifier",
            stages=stages,
            set=["quality_model.keep=top_fraction", "quality_model.top_fraction=0.5"],
        ),
    ]


class AblationConfig(BaseModel):
    """What the ablation compares and how: variants, seeds, the proxy and the held-out set."""

    model_config = ConfigDict(extra="forbid")

    variants: list[Variant] = Field(default_factory=default_variants, min_length=2)
    seeds: list[int] = Field(
        default_factory=lambda: [0, 1, 2],
        min_length=2,
        description="One proxy model per variant and seed; the interval needs two at least.",
    )
    proxy: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROXY),
        description="Overrides for every variant's proxy training and evaluation (pretrain.*,"
        " evaluate.*), applied after the base config and before the variant's own.",
    )
    heldout: str | None = Field(
        None,
        description="Clean texts scored in bits per byte (documents or instruction files in any"
        " format quality_model.reference reads); keep them out of the crawl. None: the"
        " held-out share of the documents every variant kept.",
    )
    heldout_fraction: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="Share of documents (by a hash of the id) that no variant trains on: every"
        " variant's token validation split, and the default held-out set.",
    )

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat: {seeds}")
        return seeds

    @model_validator(mode="after")
    def _distinct_names(self) -> AblationConfig:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names repeat: {names}")
        return self


def variant_config(
    base: PipelineConfig, ablation: AblationConfig, variant: Variant
) -> PipelineConfig:
    """The pipeline config one variant runs: the base, the proxy, the variant's overrides, then
    what every variant must share: no dedup index across runs (each variant is deduplicated on
    its own) and the held-out split no variant trains on."""
    forced = [
        "dedup.incremental=false",
        f"tokenize.val_fraction={ablation.heldout_fraction}",
    ]
    return with_overrides(
        base, [*ablation.proxy, *variant.set, *forced], f"ablation variant {variant.name!r}"
    )


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class VariantLayout:
    """Where one variant's datasets live (the stage runner's layout): document stages by chain,
    the shared tokenizer, the variant's token shards by its documents, pretraining by seed."""

    root: str
    dirs: dict[str, str] = field(default_factory=dict)
    versioned: bool = False

    def stage_dir(self, stage: str) -> str:
        return self.dirs.get(stage) or f"{self.root}/{stage}"

    def with_seed(self, seed: int) -> VariantLayout:
        tokens = self.dirs["tokenize"].rsplit("/", 1)[-1]
        pretrain = f"{self.root}/pretrain/{tokens}-seed{seed}"
        return VariantLayout(self.root, self.dirs | {"pretrain": pretrain})


def variant_layout(root: str, config: PipelineConfig, stages: list[str]) -> VariantLayout:
    """The folders of a variant that runs ``stages`` with ``config``; ``documents`` is its last
    stage's output."""
    dirs: dict[str, str] = {}
    chain: list[object] = []
    current = ""
    for stage in GRAPH.document_stages:
        if stage in stages:
            chain.append([stage, getattr(config, stage).output_hash()])
            current = f"{root}/data/{stage}-{_digest(chain)}"
        dirs[stage] = current
    dirs[DOCUMENTS] = current
    dirs["tokenizer"] = f"{root}/tokenizer"
    dirs["tokenize"] = f"{root}/tokens/{_digest(current, config.tokenize.output_hash())}"
    return VariantLayout(root, dirs)


def load_ablation(
    path: Path | None, seeds: str | None = None, variants: str | None = None
) -> AblationConfig:
    """The ablation from an optional YAML file, then ``--seeds 0,1,2`` and ``--variants
    raw,full`` (a subset of its variants, by name)."""
    tree: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"ablation file {path}: cannot read it ({error})") from error
        if not isinstance(loaded, dict | None):
            raise ConfigError(f"ablation file {path}: expected a mapping of keys")
        tree = loaded or {}
    if seeds is not None:
        try:
            tree["seeds"] = [int(s) for s in seeds.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"--seeds {seeds!r}: expected integers, e.g. 0,1,2") from None
    try:
        ablation = AblationConfig.model_validate(tree)
    except ValidationError as error:
        where = f"ablation file {path}" if path is not None else "ablation"
        lines = describe_validation_error(error, AblationConfig, "the ablation").splitlines()
        raise ConfigError("\n".join(f"{where}: {line}" for line in lines)) from error
    if variants is None:
        return ablation
    wanted = [v.strip() for v in variants.split(",") if v.strip()]
    known = {v.name: v for v in ablation.variants}
    unknown = [w for w in wanted if w not in known]
    if unknown or len(wanted) < 2:
        raise ConfigError(
            f"--variants {variants!r}: name two or more of {', '.join(known)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    return ablation.model_copy(update={"variants": [known[w] for w in wanted]})
