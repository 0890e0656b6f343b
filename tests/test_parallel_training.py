"""Parallel pretraining: DDP and FSDP2 processes against one process, activation checkpointing, and
a sharded (DCP) checkpoint that resumes exactly after a SIGKILL.

Everything runs on the CPU with gloo and the tiny model of ``test_pretrain``, on the real data
(the Python language reference through the real tokenizer and tokenize stages). Tolerances, all
float32: several processes sum the same numbers in another order than one process, so their
losses agree to ``LOSS_RTOL`` and their gradient norms to ``NORM_RTOL`` (as the DDP test in
``test_pretrain`` asks); activation checkpointing recomputes the same operations, so its losses
agree to ``RECOMPUTE_RTOL``; a resumed run does exactly what the uninterrupted one did, so its
losses and weights are equal, bit for bit.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from document_datasets import build_token_dirs
from test_pretrain import losses
from test_pretrain import make_job as pretrain_job

from llmflow.tasks.train import checkpoints, pretrain
from llmflow.tasks.train.train_config import TrainJob
from llmflow.tasks.train.train_metrics import read_metrics
from llmflow.tasks.train.trainer import train

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 64}
LOSS_RTOL = 1e-5  # several processes vs one: the same sums in another order
NORM_RTOL = 1e-4
RECOMPUTE_RTOL = 1e-6  # activation checkpointing: the same forward, run again


@pytest.fixture(scope="module")
def token_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(tokenize dir, tokenizer dir) built once for the module by the real stages."""
    return build_token_dirs(tmp_path_factory.mktemp("parallel-data"))


def make_job(token_dirs: tuple[str, str], run_root: Path, **settings: object) -> TrainJob:
    """test_pretrain's tiny job, 4 steps of 8 sequences (2 micro-batches per process with 1 or 2
    processes) and 3 evaluation batches (uneven over 2 processes: FSDP evaluates them all on
    each)."""
    return pretrain_job(
        token_dirs, run_root, **{"max_steps": 4, "eval_batches": 3, "sample_tokens": 4, **settings}
    )


def val_losses(run_dir: str) -> list[float]:
    return [row["val_loss"] for row in read_metrics(run_dir) if "val_loss" in row]


def final_weights(result: dict) -> dict[str, torch.Tensor]:
    return checkpoints.load_checkpoint(Path(result["checkpoint"]), parts=("model",))["model"]


def assert_close_runs(
    expected: str, got: str, loss_rtol: float, norm_rtol: float
) -> list[tuple[int, float, float, float]]:
    one, other = losses(expected), losses(got)
    assert [s for s, *_ in other] == [s for s, *_ in one]
    for (_, loss_1, norm_1, lr_1), (_, loss_2, norm_2, lr_2) in zip(one, other, strict=True):
        assert loss_2 == pytest.approx(loss_1, rel=loss_rtol)
        assert norm_2 == pytest.approx(norm_1, rel=norm_rtol)
        assert lr_2 == lr_1
    assert val_losses(got) == pytest.approx(val_losses(expected), rel=loss_rtol)
    assert one[-1][1] < one[0][1]  # it learned something, so the match is not of two flat lines
    return one


def test_two_ddp_and_two_fsdp_processes_match_one_process(
    token_dirs: tuple[str, str], tmp_path: Path
) -> None:
    single = make_job(token_dirs, tmp_path / "single", nproc_per_node=1)
    one = train(single)  # micro-batch 4 × 2 accumulation steps, no process group
    ddp = make_job(token_dirs, tmp_path / "ddp", nproc_per_node=2)
    pretrain.launch(ddp, 2)  # torchrun, gloo: 4 × 1 on each of 2 processes
    fsdp = make_job(token_dirs, tmp_path / "fsdp", nproc_per_node=2, parallelism="fsdp")
    sharded = pretrain.launch(fsdp, 2)

    assert sharded["world_size"] == 2
    assert sharded["parameters"] == one["parameters"]  # DTensors count the whole model
    assert_close_runs(single.run_dir, ddp.run_dir, LOSS_RTOL, NORM_RTOL)
    assert_close_runs(single.run_dir, fsdp.run_dir, LOSS_RTOL, NORM_RTOL)

    # the sharded checkpoint: DCP's shards of model and optimizer, and the full weights beside
    # them, which every reader of a checkpoint (export, evaluation, SFT) takes as from DDP
    final = Path(sharded["checkpoint"])
    assert final.name == "step-000004"
    assert sorted(p.name for p in final.iterdir()) == [
        "dcp",
        "decoder.json",
        "model.pt",
        "trainer.pt",
    ]
    assert sorted(p.name for p in (final / "dcp").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    expected, got = final_weights(one), final_weights(sharded)
    assert got.keys() == expected.keys()
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=1e-6, msg=name)
    model = pretrain.load_model(final)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, model.config.vocab_size)


def test_activation_checkpointing_and_one_process_fsdp_match_the_plain_model(
    token_dirs: tuple[str, str], tmp_path: Path
) -> None:
    """In this process: no process group for the plain runs, a one-process group of its own for
    FSDP (which writes the sharded checkpoint format all the same)."""
    plain = make_job(token_dirs, tmp_path / "plain")
    train(plain)
    recomputed = make_job(token_dirs, tmp_path / "ac", activation_checkpointing=True)
    train(recomputed)
    assert_close_runs(plain.run_dir, recomputed.run_dir, RECOMPUTE_RTOL, RECOMPUTE_RTOL)

    fsdp = make_job(
        token_dirs, tmp_path / "fsdp-ac", parallelism="fsdp", activation_checkpointing=True
    )
    result = train(fsdp)
    assert not torch.distributed.is_initialized()  # its group was closed with the run
    assert result["world_size"] == 1
    assert_close_runs(plain.run_dir, fsdp.run_dir, LOSS_RTOL, NORM_RTOL)
    assert checkpoints.is_sharded(Path(result["checkpoint"]))


def test_resume_crosses_between_ddp_and_fsdp_checkpoints(
    token_dirs: tuple[str, str], tmp_path: Path
) -> None:
    """``parallelism`` is a runtime setting (it changes no result), so a run folder may be
    resumed with the other one: a DDP checkpoint is sharded on loading, a sharded one is read
    whole by DCP. Both continue as the uninterrupted run did."""
    whole = make_job(token_dirs, tmp_path / "whole", max_steps=6)
    train(whole)

    class Stop(Exception):
        pass

    def stop_at_four(step: int, total: int) -> None:
        if step == 4:  # after the step-3 checkpoint
            raise Stop

    for first, then in (("ddp", "fsdp"), ("fsdp", "ddp")):
        job = make_job(token_dirs, tmp_path / f"{first}-{then}", max_steps=6, parallelism=first)
        with pytest.raises(Stop):
            train(job, on_step=stop_at_four)
        if torch.distributed.is_initialized():  # the stopped FSDP run's group, left open
            torch.distributed.destroy_process_group()
        checkpoint_dir = Path(job.run_dir) / "checkpoints"
        assert checkpoints.is_sharded(checkpoint_dir / "step-000003") == (first == "fsdp")
        resumed = job.model_copy(
            update={"config": job.config.model_copy(update={"parallelism": then})}
        )
        result = train(resumed)
        assert result["resumed_from"] == 3
        assert_close_runs(whole.run_dir, job.run_dir, LOSS_RTOL, NORM_RTOL)


def test_a_tampered_dcp_index_is_refused_without_running_it(
    token_dirs: tuple[str, str], tmp_path: Path
) -> None:
    job = make_job(token_dirs, tmp_path / "run", max_steps=3, parallelism="fsdp")
    train(job)
    checkpoint = Path(job.run_dir) / "checkpoints" / "step-000003"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    (checkpoint / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload()))
    longer = job.model_copy(update={"config": job.config.model_copy(update={"max_steps": 4})})
    with pytest.raises(ValueError, match=r"\.system is not part of a DCP checkpoint.s index"):
        train(longer)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    assert not marker.exists()


def kill_torchrun(process: subprocess.Popen) -> None:
    """SIGKILL torchrun alone, as a lost machine or an OOM kill stops it. Each worker runs in a
    session of its own (torch's elastic agent starts them so), which no signal to torchrun's
    process group reaches: the workers must die with their parent (``die_with_parent``), or
    they would train on as orphans into the run folder being resumed."""
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
    assert len(children) == 2, children
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    for pid in map(int, children):
        while Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid):
            assert time.monotonic() < deadline, f"worker {pid} outlived torchrun"
            time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_sigkill_under_fsdp_resumes_step_for_step(
    token_dirs: tuple[str, str], tmp_path: Path
) -> None:
    settings: dict[str, object] = {
        "nproc_per_node": 2,
        "parallelism": "fsdp",
        "max_steps": 16,
        "checkpoint_interval": 4,
        "eval_interval": 8,
        "eval_batches": 2,
    }
    whole = make_job(token_dirs, tmp_path / "whole", **settings)
    uninterrupted = pretrain.launch(whole, 2)

    crashed = make_job(token_dirs, tmp_path / "crashed", **settings)
    run_dir = Path(crashed.run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text(crashed.model_dump_json())
    log = tmp_path / "killed.log"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "llmflow.tasks.train.trainer",
        str(run_dir / "job.json"),
    ]
    process = subprocess.Popen(
        command,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    latest = run_dir / "checkpoints" / checkpoints.LATEST
    deadline = time.monotonic() + 120
    while not latest.exists():  # the first checkpoint is complete: kill all of torchrun now
        assert process.poll() is None, f"ended before its first checkpoint:\n{log.read_text()}"
        assert time.monotonic() < deadline, "no checkpoint came"
        time.sleep(0.01)
    kill_torchrun(process)
    assert not (run_dir / "result.json").exists(), "finished before the kill"

    result = pretrain.launch(crashed, 2)
    assert result["resumed_from"] in (4, 8, 12)  # from a checkpoint before the end
    assert [s for s, *_ in losses(crashed.run_dir)] == list(range(1, 17))
    assert losses(crashed.run_dir) == losses(whole.run_dir)
    assert val_losses(crashed.run_dir) == val_losses(whole.run_dir)
    expected, got = final_weights(uninterrupted), final_weights(result)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], weight) for name, weight in expected.items())
