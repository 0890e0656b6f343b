"""What a user sets for pretraining, and the job description one training process receives.

Kept apart from :mod:`llmflow.tasks.trainer` so that the pipeline's config (and so the CLI, the
Prefect UI form and MLflow's params) can be built without importing torch's training machinery.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmflow.models.decoder import PRESETS, DecoderConfig, PresetName
from llmflow.tasks.stage import StageConfig


class PretrainConfig(StageConfig):
    """The model, the optimisation and the bookkeeping of one pretraining run.

    Defaults are the embedded default's: the ``tiny`` preset trained for a few minutes on two CPU
    cores. A one-GPU run of the ~124M ``gpt2-small`` preset wants roughly ``batch_tokens=524288``,
    ``micro_batch_size=32``, ``lr=6e-4``, ``warmup_steps=700`` and many thousands of steps.
    """

    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {
            "device",
            "nproc_per_node",
            "compile",
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

    preset: PresetName = Field(
        "tiny", description="Model size: tiny (CPU), gpt2-small (~124M, one GPU), llama-1b."
    )
    model: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "Overrides of the preset's DecoderConfig fields (hidden_size, num_layers, qk_norm, …)."
            " vocab_size always comes from the tokenizer, padded up to a multiple of 64."
        ),
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
            " difference. Must be a multiple of micro_batch_size × seq_len × processes."
        ),
    )
    max_steps: int = Field(200, ge=1, description="Optimizer steps of the whole run.")
    lr: float = Field(3e-3, gt=0, description="Peak learning rate (after warmup).")
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

    @model_validator(mode="after")
    def _check_model_overrides(self) -> PretrainConfig:
        try:
            self.decoder_config(vocab_size=256)
        except ValidationError as error:
            problems = "; ".join(
                f"model.{'.'.join(str(p) for p in e['loc']) or '(shape)'}:"
                f" {'unknown field' if e['type'] == 'extra_forbidden' else e['msg']}"
                for e in error.errors()
            )
            raise ValueError(problems) from None
        return self

    def decoder_config(self, vocab_size: int) -> DecoderConfig:
        """The preset with the overrides and the tokenizer's vocabulary (padded to 64)."""
        fields = PRESETS[self.preset].model_dump() | self.model
        if "vocab_size" in self.model:
            raise ValueError("pretrain.model.vocab_size: set the tokenizer's vocab_size instead")
        fields["vocab_size"] = 64 * -(-vocab_size // 64)
        return DecoderConfig.model_validate(fields)


class TrainJob(BaseModel):
    """Everything one training process needs, written to ``job.json`` for torchrun's workers."""

    model_config = ConfigDict(extra="forbid")

    config: PretrainConfig
    decoder: DecoderConfig
    train_shards: list[str]
    val_shards: list[str]
    tokenizer_dir: str
    run_dir: str
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
