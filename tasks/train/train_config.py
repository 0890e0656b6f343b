"""What a user sets for training (pretraining and SFT), and the job one training process receives.

Both stages run the same loop (:mod:`llmflow.tasks.train.trainer`), so they share one set of
optimisation and bookkeeping fields (:class:`TrainConfig`); each adds what only it has (the model
shape for pretraining, the instruction data for SFT) and its own defaults. Kept apart from the
trainer so that the pipeline's config (and so the CLI, the Prefect UI form and MLflow's params) can
be built without importing torch's training machinery.
"""

from __future__ import annotations

import difflib
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmflow.models.decoder import PRESETS, DecoderConfig, PresetName
from llmflow.tasks.core.stage import StageConfig
from llmflow.tasks.train.planner import PlanSettings


class TrainConfig(StageConfig):
    """The optimisation and the bookkeeping of one training run (pretraining or SFT)."""

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "device",
            "nproc_per_node",
            "compile",
            "parallelism",
            "activation_checkpointing",
            # preset=auto: what the plan decides (model, batch, steps) is in the config it keys
            "plan",
            "peak_flops",
            "log_interval",
            "eval_interval",
            "eval_batches",
            "checkpoint_interval",
            "keep_checkpoints",
            "sample_prompts",
            "sample_tokens",
        }
    )

    seq_len: int | None = Field(
        None, ge=8, description="Tokens per training sequence. None: the model's max_seq_len."
    )
    micro_batch_size: int = Field(
        16, ge=1, description="Sequences per process per forward/backward (memory decides it)."
    )
    batch_tokens: int = Field(
        4096,
        ge=8,
        description=(
            "Tokens per optimizer step over all processes; gradient accumulation makes up the"
            " difference. Must be a multiple of micro_batch_size × seq_len × processes"
            " (nproc_per_node, else 1 when the config is checked, the GPUs seen at launch)."
        ),
    )
    max_steps: int = Field(200, ge=1, description="Optimizer steps of the whole run.")
    # 3e-3 made the tiny model's loss jump from 5.9 to 8.6 on the last warm-up step of the
    # embedded default; 2e-3 does not, and ends lower (val 4.13 against 4.50 at step 200).
    lr: float = Field(2e-3, gt=0, description="Peak learning rate (after warmup).")
    min_lr_ratio: float = Field(
        0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak."
    )
    warmup_steps: int = Field(20, ge=0, description="Linear warmup from 0 to the peak.")
    schedule: Literal["cosine", "wsd"] = Field(
        "cosine",
        description=(
            "Decay after warmup: cosine to min_lr_ratio, or WSD (warmup-stable-decay: constant,"
            " then linear decay over the last decay_fraction of the steps)."
        ),
    )
    decay_fraction: float = Field(
        0.2, gt=0, le=1, description="WSD only: share of the steps spent decaying."
    )
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW's decoupled decay, applied to matrices only (not norms)."
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2 (0.95 as GPT-3 and Llama).")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this; 0: no clip.")
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw",
        description=(
            "adamw: AdamW on every parameter. muon: Muon (torch.optim.Muon) on the 2-D weights of"
            " the transformer blocks, at muon_lr and without weight decay, and AdamW (lr,"
            " weight_decay, betas) on embeddings, output head and norms, as modded-nanogpt and"
            " nanochat split them. One schedule scales both."
        ),
    )
    muon_lr: float = Field(
        0.02,
        gt=0,
        description=(
            "optimizer=muon: Muon's peak learning rate, which torch scales per matrix by"
            " sqrt(max(1, rows/cols)) (adjust_lr_fn='original'); 0.02 as in nanochat and Keller"
            " Jordan's Muon, which scale the same way."
        ),
    )
    seed: int = Field(1337, description="Model initialisation and data order.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when a GPU is visible, else the CPU."
    )
    nproc_per_node: int | None = Field(
        None,
        ge=1,
        description=(
            "Training processes on this machine. None: one per visible GPU (one on the CPU)."
            " More than one runs under torchrun with DDP (gloo on the CPU, NCCL on GPUs)."
        ),
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Autocast dtype. auto: bfloat16 on CUDA, float32 on the CPU."
    )
    compile: bool = Field(False, description="torch.compile the model (faster on GPUs).")
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description=(
            "ddp: every process holds the whole model and optimizer state, gradients are"
            " all-reduced (DDP with more than one process). fsdp: FSDP2 (fully_shard on each"
            " decoder block, then the root) shards parameters, gradients and optimizer state over"
            " the processes, with bfloat16 parameters and float32 gradient reduction when dtype is"
            " bfloat16: for models whose optimizer state outgrows one GPU. Checkpoints then hold"
            " the sharded state (torch.distributed.checkpoint) and the full weights."
        ),
    )
    activation_checkpointing: bool = Field(
        False,
        description=(
            "Recompute each decoder block's activations in the backward pass instead of keeping"
            " them: much less activation memory for about a third more compute."
        ),
    )
    peak_flops: float | None = Field(
        None,
        gt=0,
        description=(
            "The device's peak FLOP/s for MFU. None: looked up from the GPU's name (H100, A100…);"
            " on the CPU MFU is not logged unless this is set."
        ),
    )
    log_interval: int = Field(1, ge=1, description="Log training metrics every N steps.")
    eval_interval: int = Field(
        25, ge=1, description="Validation loss, bits per byte and samples every N steps."
    )
    eval_batches: int = Field(
        8, ge=1, description="Micro-batches of held-out sequences per evaluation."
    )
    checkpoint_interval: int = Field(
        50, ge=1, description="Save a checkpoint every N steps (and always at the end)."
    )
    keep_checkpoints: int = Field(
        2, ge=0, description="Newest checkpoints kept on disk; 0 keeps them all."
    )
    sample_prompts: list[str] = Field(
        default_factory=lambda: ["The", "Permission is hereby granted", "This library"],
        description="Prompts whose continuations are logged at each evaluation.",
    )
    sample_tokens: int = Field(48, ge=1, description="Tokens generated per sample prompt.")


class PretrainConfig(TrainConfig):
    """Pretraining: the model's shape, and the loop's settings from :class:`TrainConfig`.

    Defaults are the embedded default's: the ``tiny`` preset trained for a few minutes on two CPU
    cores. A one-GPU run of the ~124M ``gpt2-small`` preset wants roughly ``batch_tokens=524288``,
    ``micro_batch_size=32``, ``lr=6e-4``, ``warmup_steps=700`` and many thousands of steps.
    """

    # one Literal, so that a wrong name gets one message listing every choice
    preset: Literal[PresetName, "auto"] = Field(
        "tiny",
        description=(
            "Model size: tiny (CPU), gpt2-small (~124M, one GPU), llama-1b; or auto: the run"
            " planner (llmflow plan) sizes the model, seq_len, batch_tokens, micro_batch_size"
            " and max_steps to the tokenized data and `plan` (hardware, hours)."
        ),
    )
    plan: PlanSettings = Field(
        default_factory=PlanSettings,
        description="preset=auto only: the hardware, budget and tokens per parameter to plan for.",
    )
    model: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Overrides of the preset's DecoderConfig fields (hidden_size, num_layers, qk_norm, …)."
            " vocab_size always comes from the tokenizer, padded up to a multiple of 64."
        ),
    )

    @model_validator(mode="after")
    def _check_model_overrides(self) -> PretrainConfig:
        """The overrides must make a valid decoder. Messages start with their key relative to
        this section (``model.hidden_sise: …``): the pipeline config's errors prefix it with
        ``pretrain.``."""
        if "vocab_size" in self.model:
            raise ValueError("model.vocab_size: set the tokenizer's vocab_size instead")
        try:
            self.decoder_config(vocab_size=256)
        except ValidationError as error:
            raise ValueError(_decoder_problem(error.errors()[0])) from None
        return self

    @model_validator(mode="after")
    def _check_batch(self) -> PretrainConfig:
        """A batch the trainer cannot split into micro-batches fails here, when the config is
        read, not after the data stages have run. Under ``preset: auto`` the planner sets
        seq_len, micro_batch_size and batch_tokens together."""
        if self.preset != "auto":
            seq_len = self.seq_len or self.decoder_config(vocab_size=256).max_seq_len
            problem = batch_problem(self, seq_len)
            if problem:
                raise ValueError(f"batch_tokens: {problem}")
        return self

    def decoder_config(self, vocab_size: int) -> DecoderConfig:
        """The preset with the overrides and the tokenizer's vocabulary (padded to 64); under
        ``auto`` the decoder's defaults with the overrides (the planner's shape, once applied)."""
        base = DecoderConfig() if self.preset == "auto" else PRESETS[self.preset]
        fields = base.model_dump() | self.model
        if "vocab_size" in self.model:
            raise ValueError("pretrain.model.vocab_size: set the tokenizer's vocab_size instead")
        fields["vocab_size"] = 64 * -(-vocab_size // 64)
        return DecoderConfig.model_validate(fields)


def _decoder_problem(error: Any) -> str:
    """One pydantic error of the decoder built from ``pretrain.model``, as ``model.<key>: …``."""
    field = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        near = difflib.get_close_matches(field, list(DecoderConfig.model_fields), n=1)
        hint = f" (did you mean 'pretrain.model.{near[0]}'?)" if near else ""
        return f"model.{field}: unknown key{hint}"
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    return f"model{'.' + field if field else ''}: {message}"


def batch_problem(config: TrainConfig, seq_len: int) -> str | None:
    """Why ``config.batch_tokens`` cannot be split into micro-batches of ``seq_len``-token
    sequences over the configured processes (None when it can), with the nearest values that
    can: the trainer needs a whole number of micro-batches per step."""
    processes = config.nproc_per_node or 1
    per_micro = config.micro_batch_size * seq_len * processes
    if config.batch_tokens % per_micro == 0:
        return None
    below = config.batch_tokens // per_micro * per_micro
    nearest = [v for v in (below, below + per_micro) if v]
    return (
        f"{config.batch_tokens} is not a multiple of micro_batch_size × seq_len × processes ="
        f" {config.micro_batch_size} × {seq_len} × {processes} = {per_micro};"
        f" nearest valid value{'s' if len(nearest) > 1 else ''}:"
        f" {' and '.join(str(v) for v in nearest)}"
    )


def sft_batch_problem(pretrain: PretrainConfig, sft: SftConfig) -> str | None:
    """:func:`batch_problem` for SFT, whose sequences default to the pretrained model's context
    (unknown before the planner runs under ``pretrain.preset: auto``: then not checked)."""
    seq_len = sft.seq_len
    if seq_len is None and pretrain.preset != "auto":
        seq_len = pretrain.decoder_config(vocab_size=256).max_seq_len
    return None if seq_len is None else batch_problem(sft, seq_len)


class SftConfig(TrainConfig):
    """Instruction tuning: which conversations, and the loop's settings with SFT's defaults.

    The model is the pretraining stage's final checkpoint (its shape comes with it). Each example
    is one conversation in the chat template, packed several to a row of ``seq_len`` tokens with
    attention kept inside each; the loss is on the assistant's tokens only. Defaults suit the
    embedded default (the ``tiny`` model and the shipped instruction set): a lower peak learning
    rate than pretraining's and a decay to zero, as SFT recipes (nanochat, Tulu) do.
    """

    data: str | None = Field(
        None,
        description=(
            "Instruction data: a JSONL, JSON or Parquet file (local path or fsspec URL) of chat"
            " ({messages: [{role, content}]}), Alpaca ({instruction, input, output}) or"
            " prompt/response records. None: the instruction set shipped with llmflow."
        ),
    )
    val_fraction: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="Share of the conversations held out for the validation loss (by hash).",
    )
    max_steps: int = Field(60, ge=1, description="Optimizer steps of the whole run.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (after warmup).")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final learning rate as a fraction of the peak."
    )
    warmup_steps: int = Field(10, ge=0, description="Linear warmup from 0 to the peak.")
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW's decoupled decay, applied to matrices only (not norms)."
    )
    eval_interval: int = Field(
        10, ge=1, description="Validation loss and chat samples every N steps."
    )
    checkpoint_interval: int = Field(
        30, ge=1, description="Save a checkpoint every N steps (and always at the end)."
    )
    sample_prompts: list[str] = Field(
        default_factory=lambda: [
            "Who are you?",
            "What does the len() function do in Python?",
            "What does the MIT license allow?",
        ],
        description="User messages whose replies (greedy, in the chat template) are logged.",
    )


class TrainJob(BaseModel):
    """Everything one training process needs, written to ``job.json`` for torchrun's workers.

    ``kind`` says what the data files are: token shards read as one stream (pretraining) or
    packed conversation rows (``.npz``, SFT), and whether samples are chat replies.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["pretrain", "sft"] = "pretrain"
    config: PretrainConfig | SftConfig
    decoder: DecoderConfig
    train_shards: list[str]
    val_shards: list[str]
    tokenizer_dir: str
    init_checkpoint: str | None = Field(
        None, description="Weights a new run starts from (SFT: the pretrained checkpoint)."
    )
    run_dir: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
