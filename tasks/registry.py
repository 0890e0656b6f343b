"""The pipeline's stages, in order: the graph, declared once.

Each line names a stage, its phase, the datasets it reads and how it runs (its module's task and
planner, or its step). Planning, MLflow lineage, the CLI's pre-check, the deployments' stage sets
and the documents version all read :data:`GRAPH`; a new stage is one module plus one line here.
"""

from __future__ import annotations

from llmflow.tasks.core import document_versions, shards
from llmflow.tasks.core.graph import DOCUMENTS, Stage, StageContext, StageGraph, TaskMapper
from llmflow.tasks.core.stage import WorkUnit, plan_shard_units
from llmflow.tasks.curate import (
    decontaminate,
    dedup,
    normalize,
    pii,
    quality,
    quality_model,
    toxicity,
)
from llmflow.tasks.evaluate import evaluate_stage
from llmflow.tasks.evaluate.evaluate_config import EvaluateConfig
from llmflow.tasks.ingest import crawl
from llmflow.tasks.ingest.crawl_config import CrawlConfig
from llmflow.tasks.train import bpe_tokenizer, pretrain, sft, tokenize
from llmflow.tasks.train.train_config import PretrainConfig, SftConfig

Planned = tuple[list[WorkUnit], str | None]


def plan_shards(ctx: StageContext) -> Planned:
    """One unit per shard of the stage's (first) input, keyed by the shard and the config."""
    stage = GRAPH[ctx.name]
    return plan_shard_units(stage.spec, ctx.settings, ctx.stage_dir(stage.inputs[0]))


def _plan_crawl(ctx: StageContext) -> Planned:
    """A refresh plans only what may be new: the web again, files that changed."""
    return crawl.plan_crawl_units(ctx.settings, crawl.previous_crawl(ctx.dir)), None


def _dedup_index(ctx: StageContext, config: dedup.DedupConfig) -> dedup.DedupConfig:
    """dedup's index defaults to one folder shared by every version of the documents, so each
    refresh is checked against all that was kept."""
    if config.index_dir is not None:
        return config
    index_dir = shards.join(ctx.stage_dir(DOCUMENTS), document_versions.INDEX_DIR)
    return config.model_copy(update={"index_dir": index_dir})


def _plan_dedup(ctx: StageContext) -> Planned:
    """Checked against the shared index, less the documents this version withdraws."""
    withdrawn = shards.join(ctx.stage_dir("crawl"), document_versions.WITHDRAWN_NAME)
    return dedup.plan_dedup_units(
        ctx.settings, ctx.stage_dir("quality"), ctx.dir, withdrawn=withdrawn
    )


def _prepare_dedup(
    units: list[WorkUnit], config: dedup.DedupConfig, stage_dir: str, map_task: TaskMapper
) -> None:
    """dedup's steps over the whole input: signatures per shard (mapped), then one resolve."""
    if dedup.all_complete(units, stage_dir):
        return
    reused = map_task(dedup.signatures_shard, units, "dedup: signatures")
    dedup.resolve_task(units, config, stage_dir, sum(bool(r) for r in reused))


def _plan_quality_model(ctx: StageContext) -> Planned:
    """Keyed by the model it trains: its negatives are sampled from the normalized crawl (all of
    it, before any rule removed a document, as DCLM sampled raw web text)."""
    return quality_model.plan_units(
        ctx.settings, ctx.stage_dir("dedup"), ctx.stage_dir("normalize"), ctx.dir
    )


def _plan_toxicity(ctx: StageContext) -> Planned:
    """A detoxify checkpoint that is not on disk is an error before any work is fanned out."""
    if ctx.settings.backend == "detoxify":
        toxicity.resolve_detoxify_checkpoint(ctx.settings)
    return plan_shards(ctx)


def _evaluated_benchmarks(
    ctx: StageContext, config: decontaminate.DecontaminateConfig
) -> decontaminate.DecontaminateConfig:
    """decontaminate looks for the items the evaluate stage will score, and keeps its indexes
    in the data root, shared by every run and documents version there."""
    index_dir = shards.join(ctx.config.dataset_root(), decontaminate.INDEX_DIR)
    return decontaminate.with_evaluated_tasks(config, ctx.stage_config("evaluate"), index_dir)


def _plan_decontaminate(ctx: StageContext) -> Planned:
    return decontaminate.plan_units(ctx.settings, ctx.stage_dir("pii"))


def _plan_tokenize(ctx: StageContext) -> Planned:
    """Token shards are cut from the documents' newest version with the tokenizer trained on it."""
    return tokenize.plan_tokenize_units(
        ctx.settings, ctx.stage_dir(DOCUMENTS), ctx.stage_dir("tokenizer")
    )


GRAPH = StageGraph(
    (
        Stage("crawl", "data", (), CrawlConfig, crawl.STAGE, _plan_crawl, crawl.crawl_unit,
              finish=crawl.finish),
        Stage("normalize", "data", ("crawl",), normalize.NormalizeConfig, normalize.STAGE,
              plan_shards, normalize.normalize_shard),
        Stage("quality", "data", ("normalize",), quality.QualityConfig, quality.STAGE,
              plan_shards, quality.quality_shard),
        Stage("dedup", "data", ("quality",), dedup.DedupConfig, dedup.STAGE, _plan_dedup,
              dedup.dedup_shard, prepare=_prepare_dedup, finish=dedup.finish,
              configure=_dedup_index, side_inputs=("crawl",)),
        Stage("quality_model", "data", ("dedup",), quality_model.QualityModelConfig,
              quality_model.STAGE, _plan_quality_model, quality_model.quality_model_shard,
              prepare=quality_model.prepare, report=quality_model.report,
              side_inputs=("normalize",)),
        Stage("toxicity", "data", ("quality_model",), toxicity.ToxicityConfig, toxicity.STAGE,
              _plan_toxicity, toxicity.toxicity_shard),
        Stage("pii", "data", ("toxicity",), pii.PiiConfig, pii.STAGE, plan_shards,
              pii.pii_shard),
        Stage("decontaminate", "data", ("pii",), decontaminate.DecontaminateConfig,
              decontaminate.STAGE, _plan_decontaminate, decontaminate.decontaminate_shard,
              finish=decontaminate.finish, report=decontaminate.report,
              configure=_evaluated_benchmarks),
        Stage("tokenizer", "train", (DOCUMENTS,), bpe_tokenizer.TokenizerConfig,
              bpe_tokenizer.STAGE, step=bpe_tokenizer.tokenizer_step),
        Stage("tokenize", "train", (DOCUMENTS, "tokenizer"), tokenize.TokenizeConfig,
              tokenize.STAGE, _plan_tokenize, tokenize.tokenize_shard, finish=tokenize.finish),
        Stage("pretrain", "train", ("tokenize", "tokenizer"), PretrainConfig, pretrain.STAGE,
              step=pretrain.pretrain_step),
        Stage("sft", "train", ("pretrain", "tokenizer"), SftConfig, sft.STAGE,
              step=sft.sft_step),
        Stage("evaluate", "evaluate", ("sft", "tokenize", "tokenizer"), EvaluateConfig,
              evaluate_stage.STAGE, step=evaluate_stage.evaluate_step),
    )
)  # fmt: skip
