"""sft: instruction data and the pretrained checkpoint in, an instruction-tuned model out.

The conversations (a user's file, or the set shipped with llmflow) are read with
:mod:`llmflow.tasks.train.sft_data`, split into training and held-out conversations by hash, written
in the chat template (:mod:`llmflow.tasks.train.chat_format`, the same one the tokenizer's config
gives
``apply_chat_template``) with the loss on the assistant's tokens only, and packed into rows.
Training is the pretraining loop (:mod:`llmflow.tasks.train.trainer`) on those rows, from the
pretrained weights, with SFT's own schedule; checkpoints, resume, the MLflow curves and the
Hugging Face export are pretraining's too (:mod:`llmflow.tasks.train.pretrain`).

Before packing, the conversations get the decontaminate stage's check
(:func:`~llmflow.tasks.curate.decontaminate.screen_texts`): in reject mode a conversation sharing an
n-gram with a benchmark item is skipped (reason ``benchmark_overlap``); in flag mode it is kept and
its items are listed in the run's manifest, where the evaluate stage finds them.

A run's folder is named by the hash of the code version, the result-changing config, the
pretraining run it starts from, the tokenizer and the conversations themselves (with the benchmark
index they were checked against): the same inputs resume or skip, changed ones start a new run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.models.decoder import DecoderConfig
from llmflow.tasks.core import shards
from llmflow.tasks.core.graph import StageContext, StepReport
from llmflow.tasks.core.heldout_split import is_validation
from llmflow.tasks.core.progress import StepProgress
from llmflow.tasks.core.stage import StageSpec
from llmflow.tasks.core.steps import step_key
from llmflow.tasks.curate.decontaminate import REASON, DecontaminateConfig, screen_texts
from llmflow.tasks.ingest.embedded_data import INSTRUCTIONS_FILE
from llmflow.tasks.train import checkpoints, pretrain
from llmflow.tasks.train.bpe_tokenizer import load_tokenizer
from llmflow.tasks.train.chat_format import encode_chat
from llmflow.tasks.train.sft_data import (
    Conversation,
    pack_examples,
    read_conversations,
    write_packed_rows,
)
from llmflow.tasks.train.train_config import SftConfig, TrainJob

STAGE = StageSpec(name="sft", version="1", libraries=("torch",))
TRAIN_ROWS, VAL_ROWS, STATS = "train.npz", "val.npz", "stats.json"


@dataclass
class SftData:
    """What became of the instruction data: counts for MLflow and the stage's summary."""

    source: str
    sha256: str  # of the conversations as read (what the run key depends on)
    conversations: int
    skipped: dict[str, int] = field(default_factory=dict)
    train_conversations: int = 0
    val_conversations: int = 0
    train_rows: int = 0
    val_rows: int = 0
    truncated: int = 0
    dropped: int = 0
    padding_fraction: float = 0.0
    benchmark_items: list[str] = field(default_factory=list)  # flagged, in kept conversations


def data_source(config: SftConfig) -> str:
    return config.data or str(INSTRUCTIONS_FILE)


def _conversation_id(conversation: Conversation) -> str:
    return hashlib.sha256(json.dumps(conversation, sort_keys=True).encode()).hexdigest()


def conversation_text(conversation: Conversation) -> str:
    """What the benchmark check reads of a conversation: every message's content."""
    return "\n".join(message.get("content", "") for message in conversation)


def read_data(
    config: SftConfig, decontaminate: DecontaminateConfig | None = None
) -> tuple[list[Conversation], list[bool], SftData]:
    """The conversations, whether each is held out, and the counts so far.

    The split hashes each conversation's content (as tokenize hashes document ids), so adding
    conversations to a file never moves old ones between the splits. With ``decontaminate``
    (its ``check_sft`` on), conversations are checked against the benchmark index first.
    """
    source = data_source(config)
    conversations, skipped = read_conversations(source)
    flagged: list[str] = []
    checked = ""
    if decontaminate is not None and decontaminate.check_sft and conversations:
        screened = screen_texts([conversation_text(c) for c in conversations], decontaminate)
        conversations = [c for c, k in zip(conversations, screened.keep, strict=True) if k]
        if screened.removed:
            skipped[REASON] += screened.removed
        flagged, checked = screened.flagged, f"{decontaminate.mode}:{screened.index_digest}"
    if not conversations:
        reasons = ", ".join(f"{n} {r}" for r, n in skipped.items()) or "the file is empty"
        raise ValueError(f"sft.data {source}: no usable conversation ({reasons})")
    ids = [_conversation_id(c) for c in conversations]
    held_out = is_validation(ids, config.val_fraction)
    digest = hashlib.sha256("\n".join([*ids, checked]).encode()).hexdigest()
    stats = SftData(
        source=source,
        sha256=digest,
        conversations=len(conversations),
        skipped=dict(Counter(skipped)),
        train_conversations=held_out.count(False),
        val_conversations=held_out.count(True),
        benchmark_items=flagged,
    )
    return conversations, held_out, stats


def run_key(config: SftConfig, data_sha256: str, base_key: str, tokenizer_sha256: str) -> str:
    """The run's key: the stage's unit key over the conversations, the pretraining run and the
    tokenizer."""
    inputs = {"data": data_sha256, "pretrain": base_key, "tokenizer": tokenizer_sha256}
    return step_key(STAGE, config, inputs)


def pack_data(
    conversations: list[Conversation],
    held_out: list[bool],
    tokenizer_dir: str,
    seq_len: int,
    out_dir: Path,
    stats: SftData,
) -> None:
    """Encode both splits in the chat template and write their packed rows to ``out_dir``."""
    tokenizer = load_tokenizer(tokenizer_dir)
    pad_id = tokenizer.token_to_id("<|pad|>")
    if pad_id is None:
        raise ValueError(f"tokenizer {tokenizer_dir} has no <|pad|> token")
    for split, path in ((False, TRAIN_ROWS), (True, VAL_ROWS)):
        chosen = [c for c, h in zip(conversations, held_out, strict=True) if h is split]
        rows = pack_examples([encode_chat(tokenizer, c) for c in chosen], seq_len, pad_id)
        write_packed_rows(str(out_dir / path), rows)
        stats.truncated += rows.truncated
        stats.dropped += rows.dropped
        if split:
            stats.val_rows = len(rows.ids)
        else:
            stats.train_rows = len(rows.ids)
            stats.padding_fraction = round(rows.padding_fraction, 4)
    if not stats.train_rows:
        raise ValueError(
            f"sft.data {stats.source}: no training conversation has an assistant token left"
            f" within sft.seq_len={seq_len}"
        )


def plan_job(
    config: SftConfig,
    pretrain_dir: str,
    tokenizer_dir: str,
    stage_dir: str,
    decontaminate: DecontaminateConfig | None = None,
) -> tuple[TrainJob, str, SftData]:
    """The run's job, key and data counts; packs the conversations into the run folder."""
    base = shards.read_json(shards.join(pretrain_dir, shards.MANIFEST_NAME))
    base_run = pretrain.manifest_run_dir(pretrain_dir, base)
    checkpoint = checkpoints.latest_checkpoint(base_run / "checkpoints")
    if checkpoint is None:
        raise ValueError(f"pretrain run {base_run}: no checkpoint to fine-tune")
    decoder = DecoderConfig.model_validate(base["decoder"])
    tokenizer_manifest = shards.read_json(shards.join(tokenizer_dir, "manifest.json"))
    conversations, held_out, stats = read_data(config, decontaminate)
    key = run_key(config, stats.sha256, base["key"], tokenizer_manifest["tokenizer_sha256"])
    run_dir = pretrain.local_dir(stage_dir) / "runs" / key[:16]
    seq_len = config.seq_len or decoder.max_seq_len
    if seq_len > decoder.max_seq_len:
        raise ValueError(
            f"sft.seq_len={seq_len} exceeds the pretrained model's max_seq_len="
            f"{decoder.max_seq_len}"
        )
    data_dir = run_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    packed = data_dir / STATS
    if packed.exists():  # packed by an earlier attempt of this run (the key covers the inputs)
        stats = SftData(**json.loads(packed.read_text()))
    else:
        pack_data(conversations, held_out, tokenizer_dir, seq_len, data_dir, stats)
        # written last: its presence says both row files are complete
        shards.write_json_atomic(str(packed), asdict(stats))
    job = TrainJob(
        kind="sft",
        config=config,
        decoder=decoder,
        train_shards=[str(data_dir / TRAIN_ROWS)],
        val_shards=[str(data_dir / VAL_ROWS)] if stats.val_rows else [],
        tokenizer_dir=str(pretrain.local_dir(tokenizer_dir)),
        run_dir=str(run_dir),
        init_checkpoint=str(checkpoint),
    )
    return job, key, stats


@task(name="sft", cache_policy=NO_CACHE, persist_result=False)
def sft_task(job: TrainJob, nproc: int) -> dict[str, Any]:
    """Fine-tune with a progress bar and a Prefect progress artifact counting optimizer steps."""
    with StepProgress("sft-steps", "sft: optimizer steps", job.config.max_steps) as progress:

        def on_step(step: int, _total: int) -> None:
            progress.advance(step - progress.done)

        return pretrain.launch(job, nproc, on_step)


def sft_step(ctx: StageContext) -> StepReport:
    """The SFT stage: fine-tune the pretrained model on the conversations, assistant tokens only."""
    config: SftConfig = ctx.settings
    job, key, data = plan_job(
        config,
        ctx.stage_dir("pretrain"),
        ctx.stage_dir("tokenizer"),
        ctx.dir,
        ctx.stage_config("decontaminate"),
    )
    training = pretrain.TrainingRun(
        job,
        key,
        STAGE,
        sft_task,
        config.model_dump(mode="json") | {"data_source": data.source},
        data.source,
        extra={"data": asdict(data)},
        data_input=("instructions", data.source, data.sha256),
        data_record=(
            {
                "conversations": data.conversations,
                "conversations_skipped": sum(data.skipped.values()),
                "train_conversations": data.train_conversations,
                "val_conversations": data.val_conversations,
                "train_rows": data.train_rows,
                "padding_fraction": data.padding_fraction,
                "truncated": data.truncated,
                "dropped": data.dropped,
            },
            {"llmflow.sft_data": data.source, "llmflow.sft_data_sha256": data.sha256},
        ),
    )
    manifest, run_id, skipped = pretrain.record_training(ctx, training)
    result = manifest["result"]
    export = pretrain.manifest_run_dir(ctx.dir, manifest) / pretrain.HF_DIR
    return StepReport(
        run_id=run_id,
        skipped=skipped,
        table={
            "instruction data": data.source,
            "conversations (train / held out)": (
                f"{data.train_conversations} / {data.val_conversations}"
            ),
            "records skipped": ", ".join(f"{n} {r}" for r, n in data.skipped.items()) or "none",
            "packed rows": data.train_rows,
            "padding": f"{data.padding_fraction:.1%}",
            "steps": result["steps"],
            "assistant tokens trained on": result["train_tokens"],
            "validation loss (nats/assistant token)": result.get("val_loss"),
            "checkpoint": result["checkpoint"],
        },
        docs_in=data.conversations + sum(data.skipped.values()),
        kept=data.conversations,
        rejected=sum(data.skipped.values()),
        rejected_by_reason=data.skipped,
        bytes=(export / "model.safetensors").stat().st_size,
        summary=(
            f"{data.train_conversations} conversations;"
            f" {pretrain.loss_summary(result)} on held-out replies"
        ),
    )
