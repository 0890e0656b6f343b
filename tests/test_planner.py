"""The run planner (llmflow plan, pretrain.preset: auto): its counts match the decoder's, its
plans are deterministic, fit the memory, report repeated data, and its memory estimate is within
20% of a measured CPU training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmflow.flows.cli import app
from llmflow.models.decoder import PRESETS, Decoder, DecoderConfig
from llmflow.tasks.train import memory_estimate, planner
from llmflow.tasks.train.memory_estimate import GIB
from llmflow.tasks.train.planner import (
    PlanError,
    PlanSettings,
    hardware,
    plan_run,
    shape_for_depth,
)
from llmflow.tasks.train.pretrain import apply_plan, auto_plan
from llmflow.tasks.train.train_config import PretrainConfig
from llmflow.tasks.train.train_metrics import PEAK_FLOPS_BF16

# The embedded default's tokenize stage: 40,925 training tokens, a 1,024-token vocabulary.
EMBEDDED_TOKENS, EMBEDDED_VOCAB = 40_925, 1024
EMBEDDED_MANIFEST = {
    "tokens": {"train": EMBEDDED_TOKENS, "val": 9_076},
    "tokenizer": {"vocab_size": EMBEDDED_VOCAB},
}


def embedded_plan() -> planner.Plan:
    return plan_run(EMBEDDED_TOKENS, hardware("cpu"), vocab_size=EMBEDDED_VOCAB)


@pytest.mark.parametrize(
    "config",
    [
        PRESETS["tiny"],
        shape_for_depth(3, 1000, 64),
        DecoderConfig(
            vocab_size=512,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=96,
            tie_embeddings=False,
            qk_norm=True,
            max_seq_len=32,
        ),
    ],
)
def test_counts_match_the_decoder(config: DecoderConfig) -> None:
    model = Decoder(config)
    assert memory_estimate.parameter_count(config) == model.num_parameters()
    assert memory_estimate.flops_per_token(config, 32) == model.flops_per_token(32)


def test_depth_rule_gives_gpt2_small_at_12_and_peaks_come_from_the_trainer() -> None:
    c = shape_for_depth(12, 50304, 1024)
    gpt2 = PRESETS["gpt2-small"]
    assert (c.hidden_size, c.num_layers, c.num_heads) == (
        gpt2.hidden_size,
        gpt2.num_layers,
        gpt2.num_heads,
    )
    peaks = dict(PEAK_FLOPS_BF16)
    for name in planner.known_gpus():
        assert hardware(name).peak_flops == peaks.get(name, peaks.get(name.split()[0]))
    assert hardware("rtx4090").name == "RTX 4090" and hardware("h100").name == "H100"


def test_same_inputs_same_plan() -> None:
    args = (3_000_000_000, hardware("H100", 8))
    first = plan_run(*args, hours=2.0, vocab_size=50304)
    second = plan_run(*args, hours=2.0, vocab_size=50304)
    assert first.model_dump() == second.model_dump()
    assert first.text() == second.text()
    # the budget, given as dollars, is the same as the hours it buys
    priced = plan_run(*args, budget_usd=40.0, usd_per_gpu_hour=2.5, vocab_size=50304)
    assert priced.budget_hours == pytest.approx(2.0)
    assert priced.depth == first.depth and priced.predicted_cost_usd is not None


def test_a_small_dataset_reports_its_epochs_and_gets_a_smaller_model() -> None:
    h100 = hardware("H100")
    plenty = plan_run(5_000_000_000, h100, hours=1.0, vocab_size=32768)
    scarce = plan_run(50_000_000, h100, hours=1.0, vocab_size=32768)
    # with plenty of data the budget decides; with 50M tokens the 4-epoch rule does
    assert plenty.epochs < 1
    assert scarce.depth < plenty.depth
    assert 1 < scarce.epochs <= 4.01
    assert any(r.startswith("epochs:") for r in scarce.reasons)
    assert "epochs of the data" in scarce.text()
    # far too little data for any model: the smallest, capped at 16 epochs, and said so
    tiny = embedded_plan()
    assert tiny.depth == planner.MIN_DEPTH
    assert 15 < tiny.epochs <= 16.1
    assert any("more than 4" in r for r in tiny.reasons)


def test_plans_fit_the_memory_shrinking_the_micro_batch_then_checkpointing_then_fsdp() -> None:
    big = plan_run(10**11, hardware("H100"), hours=10**4, vocab_size=65536, depth=20)
    small = plan_run(
        10**11, hardware("H100", memory_gib=24), hours=10**4, vocab_size=65536, depth=20
    )
    assert small.micro_batch_size < big.micro_batch_size
    for p in (big, small):
        assert p.memory_bytes <= p.memory_usable_bytes
        assert p.batch_tokens % (p.micro_batch_size * p.seq_len * p.processes) == 0
        assert not p.activation_checkpointing and not p.fsdp

    # depth 27 on one L4 (24 GB): the states fit, one sequence's activations do not beside them
    l4 = hardware("L4")
    ckpt = plan_run(10**11, l4, hours=10**4, vocab_size=65536, depth=27)
    assert ckpt.activation_checkpointing and not ckpt.fsdp and ckpt.micro_batch_size == 1
    c = shape_for_depth(27, 65536, ckpt.seq_len)
    assert memory_estimate.memory_estimate(c, ckpt.seq_len, 1, bf16=True).total > l4.usable_bytes
    assert ckpt.memory_bytes <= l4.usable_bytes
    with pytest.raises(PlanError, match="do not fit"):
        plan_run(10**11, l4, hours=10**4, vocab_size=65536, depth=27, allow_checkpointing=False)

    # depth 36 (~2.4B): 16 bytes a parameter exceed an L4; over 8 of them FSDP shards it
    sharded = plan_run(10**11, hardware("L4", 8), hours=10**4, vocab_size=65536, depth=36)
    assert sharded.fsdp and sharded.memory_bytes <= sharded.memory_usable_bytes
    assert 16 * sharded.parameters > l4.usable_bytes
    assert any(r.startswith("FSDP:") for r in sharded.reasons)
    with pytest.raises(PlanError, match="FSDP is not allowed"):
        plan_run(10**11, hardware("L4", 8), hours=10**4, depth=36, allow_fsdp=False)
    with pytest.raises(PlanError, match="do not fit 1 × L4"):
        plan_run(10**11, l4, hours=10**4, vocab_size=65536, depth=36)


def test_cpu_plan_for_the_embedded_default_is_sensible() -> None:
    plan = embedded_plan()
    tiny = Decoder(PRESETS["tiny"].model_copy(update={"vocab_size": EMBEDDED_VOCAB}))
    # no bigger than the tiny preset the embedded default trains (41k tokens feed no more)
    assert plan.parameters <= tiny.num_parameters()
    assert plan.seq_len == 256 and plan.processes == 1
    assert plan.batch_tokens % (plan.micro_batch_size * plan.seq_len) == 0
    assert 100 <= plan.max_steps <= 1000
    assert plan.predicted_seconds < 600 and plan.predicted_mfu is None
    assert plan.memory_bytes < GIB and not plan.activation_checkpointing and not plan.fsdp
    text = plan.text()
    assert "a prediction" in text and "nanochat's rule" in text and "16.0 passes" in text

    # pretrain.preset: auto applies the same plan to the config
    config = PretrainConfig(preset="auto", device="cpu")
    auto = auto_plan(config, EMBEDDED_MANIFEST)
    assert auto is not None and auto.model_dump() == plan.model_dump()
    applied = apply_plan(config, auto)
    assert (applied.batch_tokens, applied.micro_batch_size, applied.max_steps) == (
        plan.batch_tokens,
        plan.micro_batch_size,
        plan.max_steps,
    )
    decoder = applied.decoder_config(EMBEDDED_VOCAB)
    assert memory_estimate.parameter_count(decoder) == plan.parameters
    # a named preset is left alone; a fixed num_layers fixes the depth
    assert auto_plan(PretrainConfig(), EMBEDDED_MANIFEST) is None
    deeper = auto_plan(PretrainConfig(preset="auto", model={"num_layers": 3}), EMBEDDED_MANIFEST)
    assert deeper is not None and deeper.depth == 3
    with pytest.raises(ValueError, match="unknown GPU"):
        auto_plan(
            PretrainConfig(preset="auto", plan=PlanSettings(hardware="TPU")), EMBEDDED_MANIFEST
        )


# Run in a fresh interpreter: peak RSS (ru_maxrss) less the RSS after imports and a warm-up step
# of a throwaway model (which loads the kernels and thread pools). glibc's malloc is pinned to a
# fixed mmap threshold of 64 KiB: with its default dynamic threshold freed tensor memory stays in
# the heap and RSS overshoots the live tensors by 10-22% (measured); pinned, RSS follows them.
_MEASURE = """
import json, os, resource, sys
import torch, torch.nn.functional as F
from llmflow.models.decoder import Decoder, DecoderConfig
from llmflow.tasks.train.train_config import PretrainConfig
from llmflow.tasks.train.trainer import build_optimizer

def step(model, optimizer, ids):
    logits = model(ids[:, :-1])
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    (loss / ids[:, 1:].numel()).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

torch.manual_seed(0)
config, micro = DecoderConfig.model_validate_json(sys.argv[1]), int(sys.argv[2])
settings, cpu = PretrainConfig(device="cpu"), torch.device("cpu")
warm = Decoder(DecoderConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2))
step(warm, build_optimizer(warm, settings, cpu), torch.randint(0, 64, (1, 9)))
del warm
with open("/proc/self/statm") as f:
    base = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
model = Decoder(config)
optimizer = build_optimizer(model, settings, cpu)
ids = torch.randint(0, config.vocab_size, (micro, config.max_seq_len + 1))
for _ in range(2):
    step(model, optimizer, ids)
# VmHWM, this process's own peak RSS: not ru_maxrss, which Linux carries over an exec from the
# process that spawned it (a big pytest process's peak, in CI)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
print(json.dumps({"peak": hwm - base}))
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads Linux's /proc")
def test_memory_estimate_within_20_percent_of_a_measured_cpu_step() -> None:
    # the embedded default's data with a depth-4 model and an 8k vocabulary: ~0.5 GiB, so that
    # the few tens of MB the runtime's own buffers vary by do not decide the comparison
    plan = plan_run(EMBEDDED_TOKENS, hardware("cpu"), vocab_size=8192, depth=4)
    assert plan.micro_batch_size == 8
    config = shape_for_depth(plan.depth, 8192, plan.seq_len)
    estimate = memory_estimate.memory_estimate(
        config, plan.seq_len, plan.micro_batch_size, bf16=False
    )
    assert estimate.total == plan.memory_bytes
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "2"}
    peaks = []
    # The lowest of up to three fresh processes: the runtime's own buffers vary a little
    for _ in range(3):
        result = subprocess.run(
            [sys.executable, "-c", _MEASURE, config.model_dump_json(), str(plan.micro_batch_size)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            check=True,
        )
        peaks.append(json.loads(result.stdout.strip().splitlines()[-1])["peak"])
        if abs(estimate.total - min(peaks)) / min(peaks) <= 0.2:
            break
    measured = min(peaks)
    assert abs(estimate.total - measured) / measured <= 0.2, (estimate.total, peaks)
    assert torch.get_num_threads() >= 1  # the parent is untouched


runner = CliRunner()


def test_cli_prints_a_plan_and_exits_2_on_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["plan", "--tokens", "2e9", "--gpu", "H100", "--hours", "1"])
    assert result.exit_code == 0, result.output
    assert "1 × H100" in result.output and "depth 12" in result.output
    assert "a prediction" in result.output and "why:" in result.output

    manifest = tmp_path / "data" / "tokenize" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps(EMBEDDED_MANIFEST))
    result = runner.invoke(app, ["plan", "--workdir", str(tmp_path), "--cpu", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["data_tokens"] == EMBEDDED_TOKENS and shown["vocab_size"] == EMBEDDED_VOCAB
    assert shown["max_steps"] == embedded_plan().max_steps

    for args, named in [
        (["--tokens", "1e9", "--gpu", "H999"], "--gpu"),
        (["--tokens", "lots"], "--tokens"),
        ([], "--tokens"),
        (["--workdir", str(tmp_path / "none")], "--workdir"),
        (["--tokens", "1e9", "--gpu", "A100", "--budget-usd", "10"], "--usd-per-gpu-hour"),
        (["--tokens", "1e9", "--hours", "-1"], "--hours"),
        (["--tokens", "1e9", "--gpu", "L4", "--cpu"], "--cpu"),
    ]:
        result = runner.invoke(app, ["plan", *args])
        assert result.exit_code == 2, (args, result.output)
        assert named in result.output, (args, result.output)
    result = runner.invoke(app, ["plan", "--tokens", "1e9", "--gpu", "H999"])
    assert "H100" in result.output and "RTX 4090" in result.output  # the known ones are listed


def test_pretrain_auto_plans_the_job_from_the_tokenize_manifest(tmp_path: Path) -> None:
    from document_datasets import build_token_dirs

    from llmflow.tasks.core import shards
    from llmflow.tasks.train import pretrain

    tokens_dir, tokenizer_dir = build_token_dirs(tmp_path / "data")
    manifest = shards.read_manifest(tokens_dir)
    config = PretrainConfig(preset="auto", device="cpu")
    job, key = pretrain.plan_job(config, tokens_dir, tokenizer_dir, str(tmp_path / "runs"))
    plan = auto_plan(config, manifest)
    assert plan is not None and plan.data_tokens == manifest["tokens"]["train"]
    assert job.config.model == plan.model and job.config.max_steps == plan.max_steps
    assert (job.config.batch_tokens, job.config.micro_batch_size, job.config.seq_len) == (
        plan.batch_tokens,
        plan.micro_batch_size,
        plan.seq_len,
    )
    assert job.decoder.num_layers == plan.depth
    assert job.decoder.vocab_size == manifest["tokenizer"]["vocab_size"] == plan.vocab_size
    # the same config plans the same run (key); a budget that plans fewer steps is another run
    again, again_key = pretrain.plan_job(config, tokens_dir, tokenizer_dir, str(tmp_path / "runs"))
    assert again_key == key and again.config == job.config
    rushed = config.model_copy(update={"plan": PlanSettings(hours=0.002)})
    short, short_key = pretrain.plan_job(rushed, tokens_dir, tokenizer_dir, str(tmp_path / "runs"))
    assert short.config.max_steps < job.config.max_steps and short_key != key
