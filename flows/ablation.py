"""The curation ablation flow: does each curation step make a better model?

For every variant (a set of document stages and overrides, :mod:`llmflow.flows.ablation_config`)
it builds the documents through the pipeline's own stages, each distinct stage folder once (a
prefix two variants share runs once; a re-run skips what is complete), then:

1. trains one tokenizer on a neutral sample, the normalized crawl before any curation decision,
   so that no variant's tokenizer makes its bits per byte look better;
2. cuts each variant's token shards with it, holding out the same share of documents (by id)
   in every variant;
3. trains the same proxy model on each variant for every seed, on the same number of tokens:
   max_steps × batch_tokens, a smaller dataset repeated (the run records how many epochs);
4. scores each model on one held-out set (the held-out documents every variant kept, or the
   user's clean texts) in bits per byte, and on the benchmarks.

The MLflow parent run holds the ranking table, the chart and the summary metrics; each proxy
training is a child run tagged with its variant and seed, holding its curves and its scores.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from llmflow.flows import ablation_report
from llmflow.flows.ablation_config import (
    ABLATION_DIR,
    AblationConfig,
    Variant,
    VariantLayout,
    variant_config,
    variant_layout,
)
from llmflow.flows.config import PipelineConfig, with_overrides
from llmflow.flows.deployment_guard import check_deployment_run
from llmflow.flows.stage_runner import run_stage
from llmflow.flows.tracking import PipelineTracker, flatten, link_flow_run, resolve_tracking_uri
from llmflow.tasks.core import progress, shards
from llmflow.tasks.core.dataset_lock import exclusive_writer
from llmflow.tasks.core.document_versions import DOCUMENTS
from llmflow.tasks.core.heldout_split import is_validation
from llmflow.tasks.registry import GRAPH

HELDOUT_CHARS = 10**9  # a held-out text is scored whole


@dataclass
class _Variant:
    spec: Variant
    config: PipelineConfig
    layout: VariantLayout


class _Stages:
    """Runs each distinct stage folder once per ablation, and counts what ran."""

    def __init__(self, tracker: PipelineTracker) -> None:
        self.tracker = tracker
        self.ran: dict[str, Any] = {}

    def run(self, stage: str, config: PipelineConfig, layout: VariantLayout) -> Any:
        folder = layout.stage_dir(stage)
        if folder not in self.ran:
            self.ran[folder] = run_stage(stage, config, self.tracker, layout)
        return self.ran[folder]


def _neutral(config: PipelineConfig, ablation: AblationConfig, root: str) -> _Variant:
    """The documents the tokenizer learns from and the default held-out set's texts come from:
    the base config's crawl and normalize, before any curation decision."""
    stages = list(GRAPH.document_stages[: GRAPH.document_stages.index("normalize") + 1])
    spec = Variant(name="neutral", stages=stages)
    cfg = variant_config(config, ablation, spec)
    layout = variant_layout(root, cfg, stages)
    documents = layout.stage_dir("normalize")
    return _Variant(spec, cfg, VariantLayout(root, layout.dirs | {DOCUMENTS: documents}))


def _ids(dataset: str) -> set[str]:
    return {d["id"] for d in shards.iter_documents(dataset, ["id"])}


def _heldout_texts(
    ablation: AblationConfig, variants: list[_Variant], neutral: _Variant
) -> tuple[list[str], str]:
    """The held-out texts and what they are. Default: the documents in the held-out split that
    every variant kept (so every filter of every variant let them through), as normalized."""
    if ablation.heldout is not None:
        from llmflow.tasks.curate.quality_model_labels import reference_texts

        texts, _ = reference_texts(ablation.heldout, HELDOUT_CHARS)
        return texts, f"{len(texts):,} texts from {ablation.heldout}"
    kept = set.intersection(*(_ids(v.layout.stage_dir(DOCUMENTS)) for v in variants))
    texts = []
    for doc in shards.iter_documents(neutral.layout.stage_dir(DOCUMENTS), ["id", "text"]):
        if doc["id"] in kept and is_validation([doc["id"]], ablation.heldout_fraction)[0]:
            texts.append(doc["text"])
    what = (
        f"{len(texts):,} documents every variant kept, none trained on"
        f" (the {ablation.heldout_fraction:.0%} held out by id)"
    )
    return texts, what


def _heldout_shard(texts: list[str], tokenizer_dir: str, root: str) -> str:
    """The held-out texts as one token shard (documents ended by ``<|eos|>``), named by its
    content, for :func:`~llmflow.tasks.evaluate.evaluation.heldout_bits_per_byte`."""
    from llmflow.tasks.train.bpe_tokenizer import EOS, load_tokenizer
    from llmflow.tasks.train.token_shards import token_dtype, write_token_shard

    if not texts:
        raise ValueError(
            "ablation: the held-out set is empty (no held-out document was kept by every"
            " variant); give ablation.heldout, raise ablation.heldout_fraction or crawl more"
        )
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.token_to_id(EOS)
    pieces = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        pieces += [np.array(encoding.ids, dtype=np.int64), np.array([eos], dtype=np.int64)]
    tokens = np.concatenate(pieces)
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    path = shards.join(root, f"heldout/{digest}.tokens")
    if not shards.exists(path):
        write_token_shard(path, tokens, token_dtype(tokenizer.get_vocab_size(True)))
    return path


def _scores(config: PipelineConfig, layout: VariantLayout, heldout: str) -> dict[str, float]:
    """The proxy's held-out bits per byte and benchmark scores, cached beside its run folder by
    the model, the held-out set and the evaluation config."""
    from llmflow.tasks.evaluate.evaluation import evaluate_model, heldout_bits_per_byte
    from llmflow.tasks.evaluate.model_loading import load_causal_lm
    from llmflow.tasks.ingest.embedded_data import BENCHMARKS_DIR
    from llmflow.tasks.train.pretrain import manifest_run_dir

    pretrain_dir = layout.stage_dir("pretrain")
    manifest = shards.read_manifest(pretrain_dir)
    key = hashlib.sha256(
        json.dumps(
            [shards.manifest_sha256(pretrain_dir), heldout, config.evaluate.output_hash()]
        ).encode()
    ).hexdigest()[:16]
    cached = shards.join(pretrain_dir, f"ablation-scores/{key}.json")
    if shards.exists(cached):
        return dict(shards.read_json(cached))
    evaluate = config.evaluate
    model, tokenizer = load_causal_lm(manifest_run_dir(pretrain_dir, manifest) / "hf")
    scores: dict[str, float] = {}
    bpb = heldout_bits_per_byte(
        model, layout.stage_dir("tokenizer"), [heldout], evaluate.heldout_windows or 64
    )
    if bpb is None:
        raise ValueError("ablation: the held-out set is shorter than one window of the proxy")
    scores[ablation_report.HELDOUT] = bpb["bpb"]
    if evaluate.tasks:
        outcome = evaluate_model(
            model,
            tokenizer,
            evaluate.tasks,
            evaluate.data_dir or str(BENCHMARKS_DIR),
            evaluate.limit,
            evaluate.num_fewshot,
            batch_size=evaluate.batch_size,
        )
        for task, result in outcome["results"].items():
            scores |= {f"eval/{task}/{m}": v for m, v in result["metrics"].items()}
    shards.write_json_atomic(cached, scores)
    return scores


def _kept(dataset: str) -> int:
    return int(shards.read_manifest(dataset)["counts"]["kept"])


def _train_tokens(layout: VariantLayout) -> int:
    return int(shards.read_manifest(layout.stage_dir("tokenize"))["stats"]["tokens_train"])


def _run(
    config: PipelineConfig, ablation: AblationConfig, root: str, tracker: PipelineTracker
) -> tuple[dict[str, list[dict[str, float]]], dict[str, Any], _Stages]:
    variants = []
    for spec in ablation.variants:
        cfg = variant_config(config, ablation, spec)
        variants.append(_Variant(spec, cfg, variant_layout(root, cfg, spec.stages)))
    stages = _Stages(tracker)
    for v in variants:
        for stage in v.spec.stages:
            stages.run(stage, v.config, v.layout)
    neutral = _neutral(config, ablation, root)
    for stage in neutral.spec.stages:
        stages.run(stage, neutral.config, neutral.layout)
    stages.run("tokenizer", neutral.config, neutral.layout)
    texts, heldout_what = _heldout_texts(ablation, variants, neutral)
    heldout = _heldout_shard(texts, neutral.layout.stage_dir("tokenizer"), root)

    budget = neutral.config.pretrain  # the proxy: the base config with ablation.proxy applied
    per_seed: dict[str, list[dict[str, float]]] = {}
    facts: dict[str, Any] = {"seeds": ablation.seeds, "heldout": heldout_what, "variants": {}}
    for v in variants:
        stages.run("tokenize", v.config, v.layout)
        train_tokens = _train_tokens(v.layout)
        if train_tokens == 0:
            raise ValueError(
                f"ablation variant {v.spec.name!r}: no training tokens (every document it kept"
                " is held out, or it kept none); crawl more or lower ablation.heldout_fraction"
            )
        tokens = v.config.pretrain.max_steps * v.config.pretrain.batch_tokens
        facts["variants"][v.spec.name] = {
            "documents": _kept(v.layout.stage_dir(DOCUMENTS)),
            "train_tokens": train_tokens,
            "epochs": tokens / train_tokens,
            "stages": v.spec.stages,
            "folder": v.layout.stage_dir(DOCUMENTS),
        }
        per_seed[v.spec.name] = []
        for seed in ablation.seeds:
            seeded = with_overrides(v.config, [f"pretrain.seed={seed}"], f"seed {seed}")
            layout = v.layout.with_seed(seed)
            report = run_stage("pretrain", seeded, tracker, layout)
            scores = _scores(seeded, layout, heldout)
            tracker.log(
                report.mlflow_run_id,
                metrics=scores
                | {"ablation/train_tokens": tokens, "ablation/epochs": tokens / train_tokens},
                tags={
                    "llmflow.ablation.variant": v.spec.name,
                    "llmflow.ablation.seed": str(seed),
                    "mlflow.runName": f"{v.spec.name} seed {seed}",
                },
            )
            per_seed[v.spec.name].append(scores)
    facts["train_tokens"] = budget.max_steps * budget.batch_tokens
    facts["proxy"] = (
        f"preset {budget.preset}, {budget.max_steps} steps of {budget.batch_tokens:,} tokens"
    )
    return per_seed, facts, stages


@flow(
    name="llmflow-curation-ablation",
    log_prints=True,
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]
)
def curation_ablation(
    config: PipelineConfig, ablation: AblationConfig | None = None
) -> dict[str, Any]:
    """Build every variant's documents, train the same proxy on each for every seed, and rank
    the variants by held-out bits per byte with 95% intervals (see the module's docstring)."""
    ablation = ablation or AblationConfig()
    extra = [("ablation.heldout", ablation.heldout)] if ablation.heldout else []
    check_deployment_run(config, extra)
    for spec in ablation.variants:  # a variant's overrides may name paths too
        check_deployment_run(variant_config(config, ablation, spec))
    root = shards.join(config.dataset_root(), ABLATION_DIR)
    with exclusive_writer(root, f"flow run {flow_run.name} ({flow_run.id})"):
        tracker = PipelineTracker(
            resolve_tracking_uri(config.mlflow_tracking_uri, config.workdir),
            config.experiment,
            config.workdir,
            data_root=root,
        )
        tracker.close_abandoned_runs()
        parent = tracker.start_parent(
            f"ablation-{flow_run.name}",
            tags={"prefect.flow_run_id": str(flow_run.id), "llmflow.kind": "curation-ablation"},
            params=flatten({"ablation": ablation.model_dump(mode="json")})
            | flatten(config.model_dump(mode="json")),
        )
        link_flow_run(tracker, parent)
        try:
            per_seed, facts, stages = _run(config, ablation, root, tracker)
            result = _report(tracker, parent, per_seed, facts)
        except BaseException:
            tracker.finish(parent, ok=False)
            raise
        tracker.finish(parent, ok=True)
    result["stage_runs"] = {folder: report.stage for folder, report in stages.ran.items()}
    return result


def _report(
    tracker: PipelineTracker,
    parent: str,
    per_seed: dict[str, list[dict[str, float]]],
    facts: dict[str, Any],
) -> dict[str, Any]:
    """The ranking in MLflow (table, chart, metrics) and as a Prefect markdown artifact."""
    summary = ablation_report.summarize(per_seed)
    rows = ablation_report.table_rows(summary)
    metrics = {}
    for row in rows:
        name = f"{row['variant']}/{row['metric']}".replace("+", "_plus_")
        metrics[f"{name}/mean"] = row["mean"]
        if np.isfinite(row["ci95"]):
            metrics[f"{name}/ci95"] = row["ci95"]
    tracker.log(parent, metrics=metrics)
    tracker.log_table(parent, rows, "ablation/summary.json")
    tracker.log_dict(parent, {"facts": facts, "per_seed": per_seed}, "ablation/runs.json")
    tracker.log_figure(parent, ablation_report.chart(summary), "charts/ablation.png")
    text = ablation_report.markdown(summary, facts, tracker.run_url(parent))
    tracker.log_dict(parent, {"markdown": text}, "ablation/report.json")
    create_markdown_artifact(
        key="curation-ablation",
        markdown=text,
        description="Variants ranked by held-out bits per byte, with 95% intervals over seeds",
    )
    progress.run_logger().info("curation ablation:\n%s", text)
    return {
        "mlflow_run_id": parent,
        "mlflow_tracking_uri": tracker.tracking_uri,
        "prefect_flow_run_id": str(flow_run.id),
        "ranking": ablation_report.ranking(summary),
        "ties": ablation_report.ties(summary),
        "rows": rows,
        "facts": facts,
        "per_seed": per_seed,
        "markdown": text,
    }
