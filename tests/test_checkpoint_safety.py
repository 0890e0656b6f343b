"""Checkpoints and manifests as untrusted input, and MLflow as an unreliable neighbour.

A checkpoint handed in (``evaluate --model``, SFT's start, a resumed run folder) must not run code
while it is read; paths read back from ``latest.json`` and from manifests must stay in their own
folder; and a tracking server that is down must not hold training up. Everything here is real: a
real pickle payload, a real training run, a real closed port and a real SQLite tracking store.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from document_datasets import build_token_dirs
from test_pretrain import TINY_MODEL
from test_pretrain import make_job as pretrain_job

from llmflow.tasks.core import shards
from llmflow.tasks.core.steps import completed_step
from llmflow.tasks.evaluate.model_loading import load_causal_lm
from llmflow.tasks.train import checkpoints, pretrain, sft, train_metrics
from llmflow.tasks.train.train_config import SftConfig, TrainJob
from llmflow.tasks.train.train_metrics import read_metrics
from llmflow.tasks.train.trainer import train


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``. What an attacker's file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def token_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return build_token_dirs(tmp_path_factory.mktemp("safety-data"))


def make_job(token_dirs: tuple[str, str], run_root: Path, **settings: object) -> TrainJob:
    """test_pretrain's tiny job, shorter: these tests are about what is loaded, not learned."""
    short = {"max_steps": 6, "eval_interval": 3, "eval_batches": 1, "sample_prompts": ["The"]}
    return pretrain_job(token_dirs, run_root, **(short | {"sample_tokens": 4} | settings))


def tiny_checkpoint(directory: Path, step: int = 1) -> Path:
    """A complete checkpoint of a real (tiny) decoder, in the current format."""
    from llmflow.models.decoder import Decoder, DecoderConfig

    decoder = DecoderConfig.model_validate(TINY_MODEL | {"vocab_size": 64})
    model = Decoder(decoder)
    state = {"step": step, "scheduler": {}, "rng": [checkpoints.rng_state(torch.device("cpu"))]}
    parts = {"model": model.state_dict(), "optimizer": {}, "trainer": state}
    return checkpoints.save_checkpoint(
        directory, step, parts | {"decoder": decoder.model_dump()}, keep=0
    )


# --- 1. no code runs while a checkpoint is read ---------------------------------------------------


@pytest.mark.parametrize("file", ["trainer.pt", "model.pt", "optimizer.pt"])
def test_a_pickle_payload_in_a_checkpoint_is_refused_without_running(
    tmp_path: Path, file: str
) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "checkpoints")
    marker = tmp_path / "payload-ran"
    torch.save({"step": 1, "rng": [Payload(marker)]}, checkpoint / file)

    with pytest.raises(ValueError) as error:
        checkpoints.load_checkpoint(checkpoint)
    assert not marker.exists()
    message = str(error.value)
    assert str(checkpoint / file) in message
    assert "refused" in message and "nothing in it was run" in message


def test_every_way_in_refuses_the_payload(token_dirs: tuple[str, str], tmp_path: Path) -> None:
    """The three doors of the review: a resumed run folder, SFT's starting checkpoint and
    ``evaluate --model`` on a checkpoint. None runs the payload; each names the file."""
    marker = tmp_path / "payload-ran"

    resumed = make_job(token_dirs, tmp_path / "resume")
    planted = tiny_checkpoint(Path(resumed.run_dir) / "checkpoints", step=3)
    torch.save({"step": 3, "payload": Payload(marker)}, planted / "trainer.pt")
    with pytest.raises(ValueError, match=f"{planted / 'trainer.pt'}.*refused"):
        train(resumed)

    start = make_job(token_dirs, tmp_path / "sft-start").model_copy(
        update={"kind": "pretrain", "init_checkpoint": str(planted)}
    )
    with pytest.raises(ValueError, match=f"{planted / 'trainer.pt'}.*refused"):
        train(start)

    (planted.parent.parent / "hf").mkdir()
    (planted.parent.parent / "hf" / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=f"{planted / 'trainer.pt'}.*refused"):
        load_causal_lm(planted)
    assert not marker.exists()


def test_a_checkpoint_written_before_the_safe_format_still_loads(tmp_path: Path) -> None:
    """Old ``trainer.pt`` files hold the NumPy RNG key as an ndarray: they load through the
    narrow NumPy allow-list, and the state restores NumPy's generator exactly."""
    np.random.seed(7)
    legacy_rng = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    expected = np.random.random(3)
    checkpoint = tiny_checkpoint(tmp_path)
    torch.save({"step": 1, "rng": [legacy_rng]}, checkpoint / "trainer.pt")
    with pytest.raises(Exception, match="numpy"):  # not loadable as plain weights: it is old
        torch.load(checkpoint / "trainer.pt", weights_only=True)

    state = checkpoints.load_checkpoint(checkpoint)["trainer"]
    np.random.seed(0)
    checkpoints.set_rng_state(state["rng"][0], torch.device("cpu"))
    np.testing.assert_array_equal(np.random.random(3), expected)


def test_the_new_trainer_state_is_plain_weights_only_data(tmp_path: Path) -> None:
    np.random.seed(11)
    checkpoint = tiny_checkpoint(tmp_path)
    expected = np.random.random(3)
    # loadable with no allow-list at all: nothing but tensors and containers
    state = torch.load(checkpoint / "trainer.pt", weights_only=True)
    np.random.seed(0)
    checkpoints.set_rng_state(state["rng"][0], torch.device("cpu"))
    np.testing.assert_array_equal(np.random.random(3), expected)


# --- 3. paths read back from files stay in their folder -------------------------------------------


def test_resolve_inside_keeps_paths_in_their_folder(tmp_path: Path) -> None:
    source = tmp_path / "manifest.json"
    assert checkpoints.resolve_inside(tmp_path, "runs/abc", source, "run_dir") == (
        tmp_path / "runs" / "abc"
    )
    assert checkpoints.resolve_inside(tmp_path, "runs/x/../abc", source, "run_dir") == (
        tmp_path / "runs" / "abc"
    )
    for bad in ["/etc", "..", "../x", "runs/../../x", "", ".", 5, None, "a\0b"]:
        with pytest.raises(ValueError) as error:
            checkpoints.resolve_inside(tmp_path, bad, source, "run_dir")
        assert str(source) in str(error.value) and f"run_dir={bad!r}" in str(error.value)


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_latest_json_pointing_outside_its_folder_is_refused(tmp_path: Path, how: str) -> None:
    outside = tiny_checkpoint(tmp_path / "elsewhere", step=9)
    directory = tmp_path / "run" / "checkpoints"
    tiny_checkpoint(directory, step=1)
    value = str(outside) if how == "absolute" else "../../elsewhere/step-000009"
    (directory / "latest.json").write_text(json.dumps({"step": 9, "path": value}))
    with pytest.raises(ValueError) as error:
        checkpoints.latest_checkpoint(directory)
    assert str(directory / "latest.json") in str(error.value)
    assert repr(value) in str(error.value)


def test_latest_json_with_a_bad_step_or_shape_is_a_clear_error(tmp_path: Path) -> None:
    directory = tmp_path / "checkpoints"
    tiny_checkpoint(directory, step=1)
    pointer = directory / "latest.json"
    pointer.write_text(json.dumps({"step": "one", "path": "step-000001"}))
    with pytest.raises(ValueError, match=r"latest.json: step='one' is not a step number"):
        checkpoints.latest_checkpoint(directory)
    pointer.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"latest.json: expected"):
        checkpoints.latest_checkpoint(directory)
    pointer.write_text(json.dumps({"step": 1, "path": "step-000001"}))
    assert checkpoints.latest_checkpoint(directory) == directory / "step-000001"


def _manifest(stage_dir: Path, run_dir: str) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": shards.MANIFEST_FORMAT,
        "stage": "pretrain",
        "code_version": "1",
        "key": "k" * 64,
        "outputs": [],
        "run_dir": run_dir,
        "decoder": TINY_MODEL | {"vocab_size": 64},
    }
    shards.write_json_atomic(str(stage_dir / shards.MANIFEST_NAME), manifest)


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_a_manifest_run_dir_outside_the_stage_folder_is_refused(tmp_path: Path, how: str) -> None:
    victim = tmp_path / "victim"
    (victim / pretrain.HF_DIR).mkdir(parents=True)
    (victim / pretrain.HF_DIR / "config.json").write_text("{}")
    tiny_checkpoint(victim / "checkpoints")
    stage = tmp_path / "data" / "pretrain"
    value = str(victim) if how == "absolute" else "../../victim"
    _manifest(stage, value)
    manifest_file = str(stage / shards.MANIFEST_NAME)

    with pytest.raises(ValueError) as error:  # what a re-run does with the finished run's manifest
        pretrain.manifest_run_dir(str(stage), completed_step(str(stage), "k" * 64) or {})
    assert manifest_file in str(error.value) and f"run_dir={value!r}" in str(error.value)

    with pytest.raises(ValueError) as error:  # SFT would fine-tune the checkpoint it names
        sft.plan_job(SftConfig(), str(stage), str(tmp_path / "tokenizer"), str(tmp_path / "sft"))
    assert manifest_file in str(error.value) and f"run_dir={value!r}" in str(error.value)


def test_a_manifest_run_dir_inside_the_stage_folder_is_used(tmp_path: Path) -> None:
    stage = tmp_path / "data" / "pretrain"
    run = stage / "runs" / "abc"
    (run / pretrain.HF_DIR).mkdir(parents=True)
    (run / pretrain.HF_DIR / "config.json").write_text("{}")
    _manifest(stage, "runs/abc")
    assert (completed_step(str(stage), "k" * 64) or {})["run_dir"] == "runs/abc"
    assert pretrain.manifest_run_dir(str(stage), {"run_dir": "runs/abc"}) == run


# --- 4. MLflow down: training goes on ----------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING and text in r.getMessage()
    ]


def test_training_with_mlflow_down_finishes_and_warns_once(
    token_dirs: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # MLflow's client fails fast here, so the sender tries many times during the run: one warning
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setattr(train_metrics, "_MLFLOW_FLUSH_S", 0.05)
    uri = f"http://127.0.0.1:{_closed_port()}"
    job = make_job(token_dirs, tmp_path / "down", max_steps=12, eval_interval=6)
    job = job.model_copy(update={"tracking_uri": uri, "mlflow_run_id": "a" * 32})
    caplog.set_level(logging.WARNING, logger="llmflow.tasks.train.train_metrics")

    began = time.monotonic()
    result = train(job)
    took = time.monotonic() - began

    assert result["steps"] == 12
    assert took < 120, f"training with MLflow down took {took:.0f} s"
    assert [r["step"] for r in read_metrics(job.run_dir) if "loss" in r] == list(range(1, 13))
    unreachable = _warnings(caplog, "unreachable")
    assert len(unreachable) == 1, unreachable
    assert uri in unreachable[0] and str(Path(job.run_dir) / "metrics.jsonl") in unreachable[0]
    undelivered = _warnings(caplog, "not delivered")
    assert len(undelivered) == 1 and "metrics.jsonl" in undelivered[0]


def test_training_does_not_wait_out_mlflows_own_retries(
    token_dirs: tuple[str, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MLflow's default retries keep one failed request going for minutes: the run ends anyway,
    after waiting at most the close timeout for the last metrics."""
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setattr(train_metrics, "MLFLOW_CLOSE_TIMEOUT_S", 3.0)
    uri = f"http://127.0.0.1:{_closed_port()}"
    job = make_job(token_dirs, tmp_path / "slow").model_copy(
        update={"tracking_uri": uri, "mlflow_run_id": "b" * 32}
    )
    caplog.set_level(logging.WARNING, logger="llmflow.tasks.train.train_metrics")
    began = time.monotonic()
    train(job)
    took = time.monotonic() - began
    assert took < 90, f"training with MLflow down took {took:.0f} s"  # old code: minutes
    assert len(_warnings(caplog, "not delivered within 3 s")) == 1
    assert [r["step"] for r in read_metrics(job.run_dir) if "loss" in r] == list(range(1, 7))


def test_metrics_and_samples_reach_a_working_tracking_store(
    token_dirs: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("t", artifact_location=(tmp_path / "art").as_uri())
    run_id = client.create_run(experiment).info.run_id
    job = make_job(token_dirs, tmp_path / "ok").model_copy(
        update={"tracking_uri": uri, "mlflow_run_id": run_id}
    )
    caplog.set_level(logging.WARNING, logger="llmflow.tasks.train.train_metrics")
    train(job)

    local = {r["step"]: r["loss"] for r in read_metrics(job.run_dir) if "loss" in r}
    history = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert history == pytest.approx(local) and sorted(history) == list(range(1, 7))
    assert {m.step for m in client.get_metric_history(run_id, "val_loss")} == {3, 6}
    samples = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert samples == ["samples/step-000003.txt", "samples/step-000006.txt"]
    assert not _warnings(caplog, "MLflow")
