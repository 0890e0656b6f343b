"""The stage graph, declared once: what reads it, and a new stage added with nothing else changed.

The registry (tasks/registry.py) is the one list of stages; the flows, the CLI's checks, the
deployments' stage sets and the documents version all follow it. The last test adds a trivial
stage (one module's worth of code, here in the test, plus one line that inserts it into the
graph) and runs the real data flow through a real Prefect server: the stage runs, gets its MLflow
run with its input's lineage, and, as the data phase's new last stage, becomes what the
documents version publishes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from mlflow.tracking import MlflowClient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL, temporary_settings
from test_crash_resume import QUALITY_OFF, prose

from llmflow.deployments.pipeline_deployments import DATA_STAGES, PRESETS
from llmflow.flows.config import DOCUMENT_STAGES, STAGES, DataLayout, load_config, stage_inputs
from llmflow.tasks.core import shards
from llmflow.tasks.core.graph import Stage, StageGraph
from llmflow.tasks.core.stage import (
    Rejection,
    StageConfig,
    StageSpec,
    UnitRecord,
    WorkUnit,
    put_column,
    read_unit_input,
    route,
    run_unit,
)
from llmflow.tasks.core.unit_output import ShardResult
from llmflow.tasks.curate.normalize import NormalizeConfig
from llmflow.tasks.registry import GRAPH, plan_shards


def test_everything_that_lists_stages_reads_the_registry() -> None:
    assert GRAPH.names == STAGES
    assert DOCUMENT_STAGES == GRAPH.phase("data") == DATA_STAGES
    assert PRESETS["train"].stages == GRAPH.phase("train")
    assert stage_inputs("evaluate") == ("sft", "tokenize", "tokenizer")
    assert stage_inputs("normalize") == ("crawl",)
    # the side edge: dedup reads the crawl's withdrawn ids, so its lineage names the crawl
    assert GRAPH["dedup"].side_inputs == ("crawl",)


def test_a_graph_that_reads_what_no_earlier_stage_makes_is_refused() -> None:
    spec = StageSpec("late", "1")
    late = Stage("late", "data", ("nowhere",), NormalizeConfig, spec, step=lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match=r"late reads \['nowhere'\]"):
        StageGraph((late,))
    early = Stage("early", "train", (), NormalizeConfig, spec, step=lambda ctx: None)  # type: ignore[arg-type,return-value]
    data = Stage("data", "data", (), NormalizeConfig, spec, step=lambda ctx: None)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="phase by phase"):
        StageGraph((early, data))
    with pytest.raises(ValueError, match="either plan and task, or step"):
        Stage("neither", "data", (), NormalizeConfig, spec)


# --- a trivial new stage: its whole module ------------------------------------------------------


class WordsConfig(StageConfig):
    """Documents with fewer words than this are removed."""

    min_words: int = 3


WORDS = StageSpec("words", "1")


def count_words(table: pa.Table, config: WordsConfig) -> ShardResult:
    """Each document's word count as a column; too short ones rejected with the count."""
    counts = [len(text.split()) for text in table.column("text").to_pylist()]
    table = put_column(table, pa.field("words", pa.int64()), pa.array(counts, pa.int64()))
    decisions = [
        None if n >= config.min_words else Rejection("too_few_words", f"{n} words") for n in counts
    ]
    return route(table, decisions)


@task(name="words-shard", cache_policy=NO_CACHE, persist_result=False)
def words_shard(unit: WorkUnit, config: WordsConfig, stage_dir: str) -> UnitRecord:
    return run_unit(stage_dir, unit, lambda _: count_words(read_unit_input(unit), config))


# --- and its one line in the registry -----------------------------------------------------------


@pytest.fixture
def words_stage() -> Iterator[Stage]:
    stage = Stage("words", "data", ("decontaminate",), WordsConfig, WORDS, plan_shards, words_shard)
    GRAPH.insert(stage, after="decontaminate")
    try:
        yield stage
    finally:
        GRAPH.remove("words")


@pytest.mark.server
def test_a_new_stage_is_a_module_and_a_line_in_the_registry(
    words_stage: Stage, prefect_api: str, tmp_path: Path
) -> None:
    from llmflow.flows.pipeline import run_pipeline

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"doc-{i}.txt")
        paths[-1].write_text(prose(i) + "\n")
    overrides = [*QUALITY_OFF[1::2], f"crawl.seeds={json.dumps([str(p) for p in paths])}"]
    config = load_config(overrides=overrides, workdir=str(tmp_path / "work"))
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        result = run_pipeline(config, stages=[*DATA_STAGES, "words"])

    reports = {r["stage"]: r for r in result["stages"]}
    assert list(reports) == [*DATA_STAGES, "words"]
    assert reports["words"]["docs_in"] == reports["decontaminate"]["kept"] == 4
    assert reports["words"]["kept"] == 4
    # the data phase's last stage is now "words": the documents version is its output
    documents = list(shards.iter_documents(DataLayout.of(config).stage_dir("documents")))
    assert len(documents) == 4
    assert all(d["words"] == len(d["text"].split()) for d in documents)

    client = MlflowClient(tracking_uri=result["mlflow_tracking_uri"])
    run = client.get_run(reports["words"]["mlflow_run_id"])
    assert run.data.tags["llmflow.stage"] == "words"
    assert run.data.metrics["counts/docs_kept"] == 4
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == ["decontaminate"]
    assert run.data.params["min_words"] == "3"
