"""The optimizer choice: Muon's parameter split, its schedule, and a Muon run that learns and
resumes exactly (the same exactness test_pretrain holds AdamW to)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from document_datasets import build_token_dirs
from test_pretrain import losses
from test_pretrain import make_job as pretrain_job

from llmflow.models.decoder import Decoder, DecoderConfig
from llmflow.tasks.train import checkpoints
from llmflow.tasks.train.optimizers import CombinedOptimizer, build_optimizer, split_parameters
from llmflow.tasks.train.train_config import PretrainConfig, TrainJob
from llmflow.tasks.train.train_metrics import read_metrics
from llmflow.tasks.train.trainer import lr_multiplier, train

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 64}
BLOCK_MATRICES = (
    "self_attn.qkv_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_up_proj.weight",
    "mlp.down_proj.weight",
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def token_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    return build_token_dirs(tmp_path_factory.mktemp("optimizer-data"))


def make_job(token_dirs: tuple[str, str], run_root: Path, **settings: object) -> TrainJob:
    """test_pretrain's tiny job, on Muon."""
    return pretrain_job(token_dirs, run_root, **{"optimizer": "muon", **settings})


def muon_config(**settings: object) -> PretrainConfig:
    return PretrainConfig.model_validate({"optimizer": "muon", "max_steps": 10} | settings)


@pytest.mark.parametrize("shape", [{}, {"tie_embeddings": False, "qk_norm": True}])
def test_muon_takes_the_blocks_matrices_and_adamw_everything_else_once(
    shape: dict[str, object],
) -> None:
    model = Decoder(DecoderConfig.model_validate({"vocab_size": 64, **TINY_MODEL, **shape}))
    optimizer = build_optimizer(model, muon_config(weight_decay=0.1), CPU)
    assert isinstance(optimizer, CombinedOptimizer)
    adamw, muon = optimizer.parts["adamw"], optimizer.parts["muon"]
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    assert optimizer.param_groups == [*adamw.param_groups, *muon.param_groups]

    names = {id(p): name for name, p in model.named_parameters()}  # a tied head: listed once
    held = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert sorted(held) == sorted(names.values())  # every parameter, in exactly one group
    decayed, undecayed = ({names[id(p)] for p in g["params"]} for g in adamw.param_groups)
    matrices = {names[id(p)] for p in muon.param_groups[0]["params"]}
    assert matrices == {f"model.layers.{i}.{m}" for i in range(2) for m in BLOCK_MATRICES}
    untied = shape.get("tie_embeddings") is False
    assert decayed == {"model.embed_tokens.weight"} | ({"lm_head.weight"} if untied else set())
    assert undecayed and all(name.endswith("norm.weight") for name in undecayed)
    assert any(".self_attn.q_norm." in name for name in undecayed) == bool(shape.get("qk_norm"))
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0, 0.0]
    assert muon.param_groups[0]["lr"] == 0.02 and adamw.param_groups[0]["lr"] == PretrainConfig().lr
    assert split_parameters(model)[0] == muon.param_groups[0]["params"]

    model(torch.randint(0, 64, (2, 16))).sum().backward()
    optimizer.step()
    state = optimizer.state  # the parts' state, merged: Muon's momentum, Adam's moments
    assert all("momentum_buffer" in state[p] for p in muon.param_groups[0]["params"])
    assert all("exp_avg_sq" in state[p] for g in adamw.param_groups for p in g["params"])
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_adamw_stays_a_plain_adamw_over_every_parameter() -> None:
    model = Decoder(DecoderConfig.model_validate({"vocab_size": 64, **TINY_MODEL}))
    optimizer = build_optimizer(model, PretrainConfig(), CPU)
    assert type(optimizer) is torch.optim.AdamW  # its checkpoints stay AdamW's own state dict
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(held) == len(list(model.parameters())) == len({id(p) for p in held})


def test_one_schedule_moves_every_group_of_both_optimizers_also_after_a_reload() -> None:
    config = muon_config(lr=1e-3, muon_lr=0.05, warmup_steps=2, min_lr_ratio=0.1)
    model = Decoder(DecoderConfig.model_validate({"vocab_size": 64, **TINY_MODEL}))
    optimizer = build_optimizer(model, config, CPU)
    peaks = [1e-3, 1e-3, 0.05]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config)
    )

    def assert_scheduled(optimizer: torch.optim.Optimizer, step: int) -> None:
        assert isinstance(optimizer, CombinedOptimizer)
        parts = [g["lr"] for part in optimizer.parts.values() for g in part.param_groups]
        expected = [pytest.approx(peak * lr_multiplier(step, config)) for peak in peaks]
        assert [g["lr"] for g in optimizer.param_groups] == parts == expected

    for step in range(4):
        assert_scheduled(optimizer, step)
        model(torch.randint(0, 64, (2, 16))).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()

    # what the trainer's resume does: a fresh optimizer and scheduler, then both states loaded
    fresh = build_optimizer(model, config, CPU)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(
        fresh, lambda step: lr_multiplier(step, config)
    )
    saved = optimizer.state_dict()  # one optimizer's format: groups, parameters numbered across
    assert [len(g["params"]) for g in saved["param_groups"]] == [
        len(g["params"]) for g in optimizer.param_groups
    ]
    fresh.load_state_dict(saved)
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    again = fresh.state_dict()
    assert (
        again["param_groups"] == saved["param_groups"]
        and again["state"].keys() == saved["state"].keys()
    )
    for i, values in saved["state"].items():
        assert all(torch.equal(again["state"][i][k], v) for k, v in values.items())
    assert_scheduled(fresh, 4)
    for step in range(5, 10):
        fresh.step()
        fresh_scheduler.step()
        assert_scheduled(fresh, step)
    assert lr_multiplier(9, config) < lr_multiplier(4, config)  # it really moved

    with pytest.raises(ValueError, match=r"groups of \[\d+\] parameters.*adamw \+ muon"):
        fresh.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


def test_a_muon_run_learns_and_resumes_exactly_from_a_checkpoint(
    token_dirs: tuple[str, str], tmp_path: Path
) -> None:
    whole = make_job(token_dirs, tmp_path / "whole")
    train(whole)
    interrupted = make_job(token_dirs, tmp_path / "interrupted")

    class Stop(Exception):
        pass

    def crash_at_five(step: int, total: int) -> None:
        if step == 5:  # after the step-3 checkpoint: steps 4 and 5 are redone
            raise Stop

    with pytest.raises(Stop):
        train(interrupted, on_step=crash_at_five)
    checkpoint_dir = Path(interrupted.run_dir) / "checkpoints"
    assert checkpoints.list_checkpoints(checkpoint_dir) == [3]
    saved = checkpoints.load_checkpoint(checkpoint_dir / "step-000003")["optimizer"]
    adamw_groups, muon_group = saved["param_groups"][:2], saved["param_groups"][2]
    assert all("betas" in g for g in adamw_groups) and muon_group["ns_steps"] == 5
    assert len(saved["state"]) == sum(len(g["params"]) for g in saved["param_groups"])
    result = train(interrupted)

    assert result["resumed_from"] == 3
    assert [s for s, *_ in losses(interrupted.run_dir)] == list(range(1, 9))
    assert losses(interrupted.run_dir) == losses(whole.run_dir)
    val = [r["val_loss"] for r in read_metrics(interrupted.run_dir) if "val_loss" in r]
    assert val == [r["val_loss"] for r in read_metrics(whole.run_dir) if "val_loss" in r]

    trained = [loss for _, loss, *_ in losses(whole.run_dir)]
    assert trained[-1] < trained[0] - 0.1  # it learns (6.24 to 6.05 in these 8 steps)
    # both learning rates are logged, on the one schedule
    config = whole.config
    rows = [r for r in read_metrics(whole.run_dir) if "loss" in r]
    assert rows and all(
        r["muon_lr"] == pytest.approx(r["lr"] / config.lr * config.muon_lr) for r in rows
    )


def test_a_muon_run_sharded_by_fsdp_matches_the_plain_one_and_resumes_across(
    token_dirs: tuple[str, str], tmp_path: Path
) -> None:
    """Muon steps FSDP's DTensor shards as they are (DTensor gathers a matrix for the
    Newton–Schulz iterations) and its state goes through DCP's sharded checkpoint like AdamW's:
    in one process (a group of its own), a sharded run stopped after its step-3 checkpoint and
    resumed unsharded continues as the plain run did."""
    whole = make_job(token_dirs, tmp_path / "whole", max_steps=6)
    train(whole)

    class Stop(Exception):
        pass

    def stop_at_four(step: int, total: int) -> None:
        if step == 4:
            raise Stop

    job = make_job(token_dirs, tmp_path / "fsdp", max_steps=6, parallelism="fsdp")
    with pytest.raises(Stop):
        train(job, on_step=stop_at_four)
    if torch.distributed.is_initialized():  # the stopped run's group, left open
        torch.distributed.destroy_process_group()
    assert checkpoints.is_sharded(Path(job.run_dir) / "checkpoints" / "step-000003")
    resumed = job.model_copy(
        update={"config": job.config.model_copy(update={"parallelism": "ddp"})}
    )
    assert train(resumed)["resumed_from"] == 3

    expected, got = losses(whole.run_dir), losses(job.run_dir)
    assert [s for s, *_ in got] == list(range(1, 7))
    for (_, loss_1, norm_1, lr_1), (_, loss_2, norm_2, lr_2) in zip(expected, got, strict=True):
        assert loss_2 == pytest.approx(loss_1, rel=1e-5)
        assert norm_2 == pytest.approx(norm_1, rel=1e-4)
        assert lr_2 == lr_1
