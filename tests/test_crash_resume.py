"""Crash-safe: `llmflow run` killed with SIGKILL in the middle of a data stage and in the middle of
pretraining, then run again, ends with the outputs of a run that was never interrupted: the same
shard bytes, and the same training losses step for step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import LLMFLOW, llmflow_env

from llmflow.tasks.registry import GRAPH

pytestmark = pytest.mark.server  # a Prefect server and `llmflow run`

STAGES = ",".join([*GRAPH.document_stages, "tokenizer", "tokenize", "pretrain"])
DATA_FILES = ("*.parquet", "*.bin", "tokenizer.json")


NOUNS = [
    "harbour",
    "market",
    "village",
    "teacher",
    "baker",
    "river",
    "mountain",
    "garden",
    "library",
    "window",
    "kitchen",
    "road",
    "bridge",
    "forest",
    "meadow",
    "lantern",
    "orchard",
    "castle",
    "island",
    "station",
    "letter",
    "painter",
    "farmer",
    "sailor",
    "doctor",
    "student",
    "bicycle",
    "festival",
    "kettle",
    "blanket",
    "chapel",
    "valley",
    "candle",
    "basket",
    "ladder",
]
VERBS = [
    "visits",
    "paints",
    "carries",
    "repairs",
    "watches",
    "follows",
    "builds",
    "crosses",
    "opens",
    "remembers",
    "finds",
    "describes",
    "cleans",
    "reaches",
    "guards",
    "leaves",
    "greets",
    "measures",
]
ADJECTIVES = [
    "quiet",
    "busy",
    "narrow",
    "golden",
    "ancient",
    "gentle",
    "crowded",
    "distant",
    "bright",
    "muddy",
    "careful",
    "patient",
    "wooden",
    "famous",
    "tired",
    "clever",
]


def prose(seed: int, sentences: int = 24) -> str:
    """Plain English sentences, different in every document: text that passes the quality
    rules and is no near-duplicate of its neighbours."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        a, b = rng.sample(NOUNS, 2)
        out.append(
            f"The {rng.choice(ADJECTIVES)} {a} {rng.choice(VERBS)} the {rng.choice(ADJECTIVES)}"
            f" {b} in the morning, and then it {rng.choice(VERBS)} a {rng.choice(NOUNS)}."
        )
    return " ".join(out)


def write_inputs(folder: Path, count: int = 40) -> list[str]:
    """One document per file: forty units of work in every data stage."""
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"doc-{i:03d}.txt"
        path.write_text(prose(i) + "\n")
        paths.append(str(path))
    return paths


# The generated prose repeats its sentence frame: the repetition rules would remove all of it,
# and they are not what these tests are about.
QUALITY_OFF = [
    "--set",
    "quality.rep_top_ngram_sizes=[]",
    "--set",
    "quality.rep_top_ngram_max_char_frac=[]",
    "--set",
    "quality.rep_dup_ngram_sizes=[]",
    "--set",
    "quality.rep_dup_ngram_max_char_frac=[]",
]


def arguments(workdir: Path, seeds: list[str]) -> list[str]:
    settings = {
        "crawl.seeds": json.dumps(seeds),
        "tokenizer.vocab_size": "512",
        "tokenize.val_fraction": "0.1",
        "pretrain.model": '{"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 64}',
        "pretrain.seq_len": "64",
        "pretrain.micro_batch_size": "4",
        "pretrain.batch_tokens": "256",
        "pretrain.max_steps": "300",
        "pretrain.checkpoint_interval": "25",
        "pretrain.eval_interval": "100",
        "pretrain.sample_tokens": "4",
        "max_workers": "1",
    }
    args = ["run", "--workdir", str(workdir), "--stages", STAGES, *QUALITY_OFF]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    return args


def start(args: list[str], prefect_api: str, log: Path) -> subprocess.Popen:
    env = llmflow_env(prefect_api)
    return subprocess.Popen(
        [LLMFLOW, *args],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_when(process: subprocess.Popen, ready: Callable[[], bool], log: Path) -> None:
    """SIGKILL the run's whole process group as soon as ``ready()``; fail if it ends first."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"finished before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def finish(args: list[str], prefect_api: str, log: Path) -> None:
    process = start(args, prefect_api, log)
    assert process.wait(timeout=600) == 0, log.read_text()[-5000:]


def data_files(workdir: Path) -> dict[str, bytes]:
    root = workdir / "data"
    found = {}
    for pattern in DATA_FILES:
        for path in root.rglob(pattern):
            relative = path.relative_to(root)
            if "pretrain" in relative.parts or any(p.startswith(".") for p in relative.parts):
                continue
            found[str(relative)] = path.read_bytes()
    return found


def losses(workdir: Path) -> list[tuple[int, float, float, float]]:
    (metrics,) = (workdir / "data" / "pretrain" / "runs").glob("*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows if "loss" in r]


def test_sigkill_in_a_data_stage_and_in_pretraining_then_resume(
    prefect_api: str, tmp_path: Path
) -> None:
    seeds = write_inputs(tmp_path / "inputs")
    whole = tmp_path / "whole"
    finish(arguments(whole, seeds), prefect_api, tmp_path / "whole.log")

    crashed = tmp_path / "crashed"
    args = arguments(crashed, seeds)
    normalize = crashed / "data" / "documents" / "v0001" / "normalize"
    done = normalize / "_done"

    def mid_normalize() -> bool:  # some of normalize's units are complete, not all
        return done.is_dir() and 3 <= len(list(done.glob("*.json"))) < len(seeds) - 3

    log = tmp_path / "crashed-1.log"
    kill_when(start(args, prefect_api, log), mid_normalize, log)
    assert not (normalize / "manifest.json").exists()

    runs = crashed / "data" / "pretrain" / "runs"

    def mid_pretraining() -> bool:  # a checkpoint is written and the run is past it
        metrics = list(runs.glob("*/metrics.jsonl"))
        if not metrics or not list(runs.glob("*/checkpoints/step-000050")):
            return False
        return len(metrics[0].read_text().splitlines()) > 60

    log = tmp_path / "crashed-2.log"
    kill_when(start(args, prefect_api, log), mid_pretraining, log)
    assert not (crashed / "data" / "pretrain" / "manifest.json").exists()
    finish(args, prefect_api, tmp_path / "crashed-3.log")

    expected, got = data_files(whole), data_files(crashed)
    assert len(expected) > 40 * 6  # every data stage's shards (and their rejected sets)
    assert got.keys() == expected.keys()
    assert [k for k in expected if got[k] != expected[k]] == []
    assert losses(crashed) == losses(whole)
    assert [s for s, *_ in losses(crashed)] == list(range(1, 301))

    # The two killed runs' MLflow runs were closed as KILLED by the next run, not left RUNNING.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{crashed / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("llmflow")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED", "KILLED"]
    assert "RUNNING" not in {r.info.status for r in runs}
    assert not list(crashed.rglob("*.tmp-*"))  # what the killed writers left was swept
