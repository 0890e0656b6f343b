"""The curation ablation: its statistics, its folders (a shared prefix is one folder), its config
errors, and `llmflow ablate` end to end through a real Prefect server and MLflow."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import LLMFLOW, run_llmflow
from document_datasets import junk_texts, prose_texts
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from scipy import stats

from llmflow.flows.ablation_config import (
    AblationConfig,
    Variant,
    load_ablation,
    variant_config,
    variant_layout,
)
from llmflow.flows.ablation_report import Interval, interval, ranking, ties
from llmflow.flows.config import ConfigError, PipelineConfig, with_overrides
from llmflow.tasks.core.document_versions import DOCUMENTS

# --- statistics ----------------------------------------------------------------------------------


def test_interval_is_students_t_over_the_seeds() -> None:
    values = [2.0, 2.5, 3.5]
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    got = interval(values)
    assert got.mean == pytest.approx(mean)
    assert got.half_width == pytest.approx(4.302652729911275 * sd / math.sqrt(3))
    assert got.n == 3
    assert math.isinf(interval([1.0]).half_width)  # one seed says nothing about the spread


def test_ranking_and_which_variants_the_seeds_cannot_tell_apart() -> None:
    summary = {
        "a": {"heldout_bpb": Interval(2.0, 0.1, 3)},
        "b": {"heldout_bpb": Interval(2.15, 0.1, 3)},  # overlaps a (1.9-2.1 vs 2.05-2.25)
        "c": {"heldout_bpb": Interval(1.5, 0.1, 3)},
    }
    assert ranking(summary) == ["c", "a", "b"]
    assert ties(summary) == [("a", "b")]


# --- folders and config --------------------------------------------------------------------------


def test_variants_share_the_folders_of_their_common_prefix(tmp_path: Path) -> None:
    base = PipelineConfig(workdir=str(tmp_path))
    ablation = AblationConfig()
    root = str(tmp_path / "ablation")
    variants = {v.name: v for v in ablation.variants}
    layouts = {
        name: variant_layout(root, variant_config(base, ablation, v), v.stages)
        for name, v in variants.items()
    }
    raw, heuristics, full = layouts["raw"], layouts["heuristics"], layouts["full"]
    for stage in ("crawl", "normalize"):
        assert raw.stage_dir(stage) == heuristics.stage_dir(stage) == full.stage_dir(stage)
    assert heuristics.stage_dir("quality") == full.stage_dir("quality")
    # a stage a variant leaves out hands its input on
    assert raw.stage_dir("quality") == raw.stage_dir("pii") == raw.stage_dir("normalize")
    assert raw.stage_dir(DOCUMENTS) == raw.stage_dir("normalize")
    assert full.stage_dir(DOCUMENTS) == full.stage_dir("decontaminate")
    assert raw.stage_dir("tokenize") != full.stage_dir("tokenize")
    assert raw.stage_dir("tokenizer") == full.stage_dir("tokenizer")
    assert raw.with_seed(0).stage_dir("pretrain") != raw.with_seed(1).stage_dir("pretrain")

    # a changed quality setting moves quality and every later folder, never the earlier ones
    stricter = with_overrides(
        variant_config(base, ablation, variants["full"]), ["quality.gopher_min_words=80"], "test"
    )
    moved = variant_layout(root, stricter, variants["full"].stages)
    assert moved.stage_dir("normalize") == full.stage_dir("normalize")
    for stage in ("quality", "dedup", "pii"):
        assert moved.stage_dir(stage) != full.stage_dir(stage)


def test_every_variant_holds_out_the_same_documents_and_keeps_no_index(tmp_path: Path) -> None:
    base = PipelineConfig(workdir=str(tmp_path))
    ablation = AblationConfig(heldout_fraction=0.25)
    for variant in ablation.variants:
        config = variant_config(base, ablation, variant)
        assert config.tokenize.val_fraction == 0.25
        assert config.dedup.incremental is False


def test_bad_ablations_are_refused_with_the_key(tmp_path: Path) -> None:
    def refused(tree: object, **kwargs: str) -> str:
        path = tmp_path / "ablation.yaml"
        path.write_text(yaml.safe_dump(tree))
        with pytest.raises(ConfigError) as error:
            load_ablation(path, **kwargs)
        return str(error.value)

    assert "seeds" in refused({"seeds": [1]})
    assert "repeat" in refused({"seeds": [1, 1]})
    assert "unknown document stage" in refused(
        {"variants": [{"name": "a", "stages": ["crawl", "tokenize"]}, {"name": "b", "stages": []}]}
    )
    assert "starts with crawl" in refused(
        {"variants": [{"name": "a", "stages": ["normalize"]}, {"name": "b", "stages": ["crawl"]}]}
    )
    assert "unknown: nope" in refused({}, variants="raw,nope")
    assert "--seeds" in refused({}, seeds="one,two")
    with pytest.raises(ConfigError, match="quality.nope"):
        variant_config(
            PipelineConfig(),
            AblationConfig(),
            Variant(name="x", stages=["crawl"], set=["quality.nope=1"]),
        )
    chosen = load_ablation(None, seeds="3,4", variants="full,raw")
    assert [v.name for v in chosen.variants] == ["full", "raw"] and chosen.seeds == [3, 4]


# --- end to end ----------------------------------------------------------------------------------

SEEDS = [0, 1, 2]
PROXY = [
    'pretrain.model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_seq_len": 32}',
    "pretrain.micro_batch_size=2",
    "pretrain.batch_tokens=64",
    "pretrain.max_steps=3",
    "pretrain.checkpoint_interval=3",
    "pretrain.eval_interval=3",
    "pretrain.sample_prompts=[]",
    "evaluate.limit=2",
    'evaluate.tasks=["arc_easy"]',
]


@pytest.mark.server
def test_llmflow_ablate_ranks_variants_over_seeds_in_mlflow_and_prefect(
    prefect_api: str, tmp_path: Path
) -> None:
    good = prose_texts(40, 1)
    corpus = [*good, *junk_texts(10, 2), *(t + " Again." for t in good[:6])]
    for part in range(2):
        lines = [json.dumps({"text": t}) for t in corpus[part::2]]
        (tmp_path / f"part-{part}.jsonl").write_text("\n".join(lines) + "\n")
    ablation = {
        "seeds": SEEDS,
        "heldout_fraction": 0.3,
        "proxy": PROXY,
        "variants": [
            {"name": "raw", "stages": ["crawl", "normalize"]},
            {"name": "heuristics", "stages": ["crawl", "normalize", "quality"]},
        ],
    }
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(ablation))
    workdir = tmp_path / "work"
    seeds = json.dumps([str(tmp_path / "part-0.jsonl"), str(tmp_path / "part-1.jsonl")])
    args = ["--workdir", str(workdir), "--ablation", str(tmp_path / "ablation.yaml")]
    args += ["--set", f"crawl.seeds={seeds}", "--set", "tokenizer.vocab_size=300"]
    result = run_llmflow(args, prefect_api, command="ablate")
    assert "within each other's interval" in result.stdout or "intervals overlap" in result.stdout

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("llmflow.kind") == "curation-ablation"]
    children = [r for r in runs if r.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent.info.run_id]
    trained = [r for r in children if "llmflow.ablation.seed" in r.data.tags]

    # one child per variant and seed, every one trained on the same number of tokens
    pairs = sorted(
        (r.data.tags["llmflow.ablation.variant"], int(r.data.tags["llmflow.ablation.seed"]))
        for r in trained
    )
    assert pairs == sorted((v, s) for v in ("raw", "heuristics") for s in SEEDS)
    budgets = {r.data.metrics["ablation/train_tokens"] for r in trained}
    assert budgets == {3 * 64}
    # what each trainer logged it saw: the same tokens, though the datasets differ in size
    assert {r.data.metrics["tokens_seen"] for r in trained} == {3 * 64}
    epochs = {
        r.data.tags["llmflow.ablation.variant"]: r.data.metrics["ablation/epochs"] for r in trained
    }
    assert epochs["heuristics"] > epochs["raw"]
    # the shared prefix (crawl, normalize) ran once; each stage's folder has one MLflow run
    stage_runs = [r.data.tags.get("llmflow.stage") for r in children]
    assert stage_runs.count("crawl") == stage_runs.count("normalize") == 1
    assert stage_runs.count("quality") == 1 and stage_runs.count("tokenizer") == 1
    assert stage_runs.count("tokenize") == 2 and stage_runs.count("pretrain") == 6

    # the parent's interval is Student's t over the children's held-out bits per byte
    for variant in ("raw", "heuristics"):
        values = [
            r.data.metrics["heldout_bpb"]
            for r in trained
            if r.data.tags["llmflow.ablation.variant"] == variant
        ]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        half = stats.t.ppf(0.975, len(values) - 1) * sd / math.sqrt(len(values))
        assert parent.data.metrics[f"{variant}/heldout_bpb/mean"] == pytest.approx(mean)
        assert parent.data.metrics[f"{variant}/heldout_bpb/ci95"] == pytest.approx(half)
        assert len(set(values)) == len(values)  # the seeds made different models
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "charts")}
    assert "charts/ablation.png" in artifacts
    report = json.loads(
        Path(
            client.download_artifacts(parent.info.run_id, "ablation/report.json", str(tmp_path))
        ).read_text()
    )
    assert report["markdown"].startswith("# Curation ablation")


def test_llmflow_ablate_refuses_a_bad_variant_before_any_work(tmp_path: Path) -> None:
    bad = tmp_path / "ablation.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "variants": [
                    {"name": "a", "stages": ["crawl", "normalize"]},
                    {"name": "b", "stages": ["crawl"], "set": ["quality.nope=1"]},
                ]
            }
        )
    )
    workdir = tmp_path / "work"
    result = subprocess.run(
        [LLMFLOW, "ablate", "--ablation", str(bad), "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "ablation variant 'b'" in result.stderr and "quality.nope" in result.stderr
    assert not workdir.exists()
