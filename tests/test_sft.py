"""sft: it starts from the pretrained weights, trains on assistant tokens only, resumes exactly,
and exports a model that transformers' own chat path answers with as our generator does.

Real parts throughout: the tokenizer and token shards come from the real stages over CPython's
language reference, the base model from a real (short) pretraining run, the conversations from a
JSONL file in the three record shapes, read by the stage's reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from document_datasets import build_token_dirs

from llmflow.tasks.core.steps import write_step_manifest
from llmflow.tasks.evaluate.evaluation import chat_samples
from llmflow.tasks.train import checkpoints, pretrain, sft
from llmflow.tasks.train.sft_data import IGNORE_INDEX
from llmflow.tasks.train.train_config import PretrainConfig, SftConfig
from llmflow.tasks.train.train_data import PackedConversations
from llmflow.tasks.train.train_metrics import read_metrics
from llmflow.tasks.train.trainer import _samples, train

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_seq_len": 64}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def conversation_records() -> list[object]:
    """Thirty-six conversations in the three shapes, and two records that are not usable."""
    records: list[object] = []
    for a in range(6):
        for b in range(6):
            question, answer = f"What is {a} plus {b}?", f"{a} plus {b} is {NUMBERS[a + b]}."
            if (a + b) % 3 == 0:
                records.append(
                    {
                        "messages": [
                            {"role": "user", "content": question},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
            elif (a + b) % 3 == 1:
                records.append({"instruction": question, "input": "", "output": answer})
            else:
                records.append({"prompt": question, "response": answer})
    records.append({"messages": [{"role": "assistant", "content": "no question"}]})
    records.append(["not", "a", "record"])
    return records


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A pretraining stage's output (a short real run and its manifest), and the data file."""
    root = tmp_path_factory.mktemp("sft")
    tokens_dir, tokenizer_dir = build_token_dirs(root)
    config = PretrainConfig(
        model=TINY_MODEL,
        seq_len=64,
        micro_batch_size=4,
        batch_tokens=256,
        max_steps=6,
        eval_interval=6,
        checkpoint_interval=6,
        sample_tokens=4,
        device="cpu",
    )
    pretrain_dir = str(root / "pretrain")
    job, key = pretrain.plan_job(config, tokens_dir, tokenizer_dir, pretrain_dir)
    result = train(job)
    export = Path(job.run_dir) / pretrain.HF_DIR
    pretrain.export_hf(Path(result["checkpoint"]), job.tokenizer_dir, export)
    outputs, fields = pretrain.trained_outputs(pretrain_dir, job, result)  # the export's files
    write_step_manifest(pretrain_dir, pretrain.STAGE, key, outputs, fields)
    data = root / "conversations.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversation_records()))
    return {"pretrain": pretrain_dir, "tokenizer": tokenizer_dir, "data": str(data)}


def sft_config(base: dict[str, str], **settings: object) -> SftConfig:
    fields: dict[str, object] = {
        "data": base["data"],
        "micro_batch_size": 2,
        "batch_tokens": 256,
        "max_steps": 8,
        "lr": 3e-3,
        "warmup_steps": 1,
        "eval_interval": 4,
        "checkpoint_interval": 3,
        "keep_checkpoints": 0,
        "sample_tokens": 8,
        "sample_prompts": ["What is 2 plus 2?"],
        "val_fraction": 0.2,
        "device": "cpu",
    }
    return SftConfig.model_validate(fields | settings)


def losses(run_dir: str) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r]


def test_data_is_read_split_and_packed_with_every_skip_counted(
    base: dict[str, str], tmp_path: Path
) -> None:
    job, _, data = sft.plan_job(
        sft_config(base), base["pretrain"], base["tokenizer"], str(tmp_path)
    )
    assert data.conversations == 36
    assert sum(data.skipped.values()) == 2, data.skipped  # both bad records, each with a reason
    assert data.train_conversations + data.val_conversations == 36
    assert data.val_conversations > 0 and data.train_rows > 0
    rows = PackedConversations(job.train_shards[0], 64, seed=0)
    # a packed row holds several whole conversations, and only assistant tokens are targets
    assert rows.count == data.train_rows < data.train_conversations
    assert 0 < rows.tokens < rows.rows["ids"].size
    # planning the same run again (a resume) reuses the packed rows instead of re-encoding
    written = Path(job.train_shards[0]).stat().st_mtime_ns
    again, _, same = sft.plan_job(
        sft_config(base), base["pretrain"], base["tokenizer"], str(tmp_path)
    )
    assert same == data and again == job
    assert Path(job.train_shards[0]).stat().st_mtime_ns == written


def test_sft_starts_from_the_pretrained_weights_with_an_assistant_only_loss(
    base: dict[str, str], tmp_path: Path
) -> None:
    job, _, _ = sft.plan_job(sft_config(base), base["pretrain"], base["tokenizer"], str(tmp_path))
    result = train(job)
    first_loss = losses(job.run_dir)[0][1]

    # the same number by hand: the pretrained model on step 1's rows, cross-entropy over the
    # assistant targets only, divided by their count
    model = pretrain.load_model(Path(job.init_checkpoint or ""))
    data = PackedConversations(job.train_shards[0], 64, job.config.seed)
    batch = data.batch(0, 4, torch.device("cpu"))  # 256 tokens per step = 4 rows of 64
    with torch.no_grad():
        logits = model(batch.x, segment_ids=batch.segment_ids, position_ids=batch.position_ids)
    trained = batch.y != IGNORE_INDEX
    expected = F.cross_entropy(logits[trained], batch.y[trained])
    assert first_loss == pytest.approx(float(expected), abs=1e-5)
    # a user token as a target would change the loss: the mask is what makes the two agree
    with_prompts = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch.x[:, 1:].reshape(-1)
    )
    assert float(with_prompts) != pytest.approx(float(expected), abs=1e-3)

    assert losses(job.run_dir)[-1][1] < first_loss
    assert result["val_loss"] is not None and result["unigram_entropy"] is None
    sample = (Path(job.run_dir) / "samples" / "step-000008.txt").read_text()
    assert sample.startswith("### 'What is 2 plus 2?'")


def test_resumed_sft_repeats_the_uninterrupted_losses(base: dict[str, str], tmp_path: Path) -> None:
    whole, _, _ = sft.plan_job(
        sft_config(base), base["pretrain"], base["tokenizer"], str(tmp_path / "whole")
    )
    train(whole)
    interrupted, _, _ = sft.plan_job(
        sft_config(base), base["pretrain"], base["tokenizer"], str(tmp_path / "again")
    )

    class Stop(Exception):
        pass

    def crash_at_five(step: int, total: int) -> None:
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(interrupted, on_step=crash_at_five)
    result = train(interrupted)  # from step 3's checkpoint, not from the pretrained weights
    assert result["resumed_from"] == 3
    assert losses(interrupted.run_dir) == losses(whole.run_dir)
    assert checkpoints.list_checkpoints(Path(whole.run_dir) / "checkpoints") == [3, 6, 8]


def test_exported_model_answers_through_transformers_as_through_our_generator(
    base: dict[str, str], tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmflow.tasks.train.bpe_tokenizer import load_tokenizer

    job, _, _ = sft.plan_job(
        sft_config(base, max_steps=12), base["pretrain"], base["tokenizer"], str(tmp_path)
    )
    result = train(job)
    checkpoint = Path(result["checkpoint"])
    export = pretrain.export_hf(checkpoint, job.tokenizer_dir, tmp_path / "hf")
    hf_model = AutoModelForCausalLM.from_pretrained(export).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(export)
    prompts = ["What is 2 plus 2?", "What is 5 plus 1?"]
    theirs = chat_samples(hf_model, hf_tokenizer, prompts, max_new_tokens=12)
    ours = _samples(
        pretrain.load_model(checkpoint), load_tokenizer(job.tokenizer_dir), prompts, 12, True, 0
    )
    assert [s["prompt"] for s in theirs] == prompts
    for sample in theirs:
        assert f"### {sample['prompt']!r}\n{sample['reply']}\n" in ours


def test_bad_sft_settings_are_clear_errors(base: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exceeds the pretrained model's max_seq_len=64"):
        sft.plan_job(
            sft_config(base, seq_len=128), base["pretrain"], base["tokenizer"], str(tmp_path)
        )
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "", "response": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"sft.data .*empty.jsonl: no usable conversation"):
        sft.plan_job(
            sft_config(base, data=str(empty)), base["pretrain"], base["tokenizer"], str(tmp_path)
        )


def test_a_checkpoint_and_its_run_folder_load_for_evaluation(
    base: dict[str, str], tmp_path: Path
) -> None:
    from llmflow.tasks.evaluate.model_loading import load_causal_lm

    job, _, _ = sft.plan_job(
        sft_config(base, max_steps=3), base["pretrain"], base["tokenizer"], str(tmp_path)
    )
    checkpoint = Path(train(job)["checkpoint"])
    with pytest.raises(ValueError, match="no tokenizer at .*hf"):
        load_causal_lm(checkpoint)
    pretrain.export_hf(checkpoint, job.tokenizer_dir, Path(job.run_dir) / pretrain.HF_DIR)
    ids = torch.tensor([[1, 4, 20, 30, 40]])
    with torch.no_grad():
        ours = pretrain.load_model(checkpoint)(ids)
        for path in (checkpoint, Path(job.run_dir)):
            model, tokenizer = load_causal_lm(path)
            torch.testing.assert_close(model(input_ids=ids).logits, ours, atol=1e-4, rtol=1e-4)
            assert tokenizer.chat_template
