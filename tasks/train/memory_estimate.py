"""How much memory one training process needs, and the model's size and FLOPs, without building
the model: what the run planner (:mod:`llmflow.tasks.train.planner`) fits a run to.

Bytes per device: ``states + activations``. States: fp32 weights, fp32 gradients and AdamW's
two fp32 moments, ``16·N``; plus ``4·N`` for DDP's gradient buckets when there are several
processes; under FSDP ``12·N / G`` (sharded weights and moments) plus ``4·N`` (llmflow's trainer
keeps full-size fp32 gradients between the micro-batches of a step) plus two gathered layers.
Activations saved for backward, per token and layer, with ``a`` = 2 bytes under bf16
autocast (GPU) or 4 (CPU, float32) and the residual
stream always fp32: ``8·h + a·(6·h + 3·kv + 4·f) + 4·(2 + heads)`` (two residuals, two norm
outputs, qkv, RoPE'd q and k, attention out and its reshape, SwiGLU's gate-up, silu and
product, norm and log-sum-exp statistics); with activation checkpointing only the layer's
fp32 input (``4·h``) is kept, plus one layer recomputed. The head adds ``4·h + a·h`` and the
logits in float32 with their gradients (``16·V`` on the CPU, ``14·V`` with bf16 logits).
On the CPU this is within 1% of a measured step's peak RSS with glibc's mmap threshold pinned
(tests/test_planner.py; 517 MiB for depth 4, vocab 8192, 8 × 256 tokens); glibc's default
dynamic threshold keeps freed memory and adds 10-22%. The bf16 figure is not yet measured on
a GPU. The planner counts 90% of a GPU's memory less 1 GiB as usable (CUDA context, allocator
slack), and 80% of the CPU's less 1 GiB (the torch runtime).
"""

from __future__ import annotations

from pydantic import BaseModel

from llmflow.models.decoder import DecoderConfig

GIB = 1024**3
FSDP_GATHERED_LAYERS = 2  # a block's weights gathered for its forward and the next one's


def parameter_count(c: DecoderConfig) -> int:
    """``Decoder(c).num_parameters()`` without building it."""
    h, f, d = c.hidden_size, c.ffn_size, c.head_dim
    attention = h * (c.num_heads + 2 * c.kv_heads) * d + c.num_heads * d * h
    norms = 2 * h + (2 * d if c.qk_norm else 0)
    layer = attention + 3 * h * f + norms
    embeddings = c.vocab_size * h * (1 if c.tie_embeddings else 2)
    return c.num_layers * layer + embeddings + h


def flops_per_token(c: DecoderConfig, seq_len: int) -> int:
    """``Decoder(c).flops_per_token(seq_len)`` without building it."""
    matmul = parameter_count(c) - (0 if c.tie_embeddings else c.vocab_size * c.hidden_size)
    return 6 * matmul + 12 * c.num_layers * c.hidden_size * seq_len


class MemoryEstimate(BaseModel):
    """Peak bytes of one training process (one device)."""

    states: int
    activations: int
    checkpointing: bool
    fsdp: bool

    @property
    def total(self) -> int:
        return self.states + self.activations


def activation_bytes_per_token(c: DecoderConfig, bf16: bool, checkpointing: bool) -> float:
    """Bytes saved for backward per token (the formula in the module's docstring)."""
    a = 2 if bf16 else 4
    h, f, kv = c.hidden_size, c.ffn_size, c.kv_heads * c.head_dim
    layer = 8 * h + a * (6 * h + 3 * kv + 4 * f) + 4 * (2 + c.num_heads)
    layers = c.num_layers * 4 * h + layer if checkpointing else c.num_layers * layer
    head = 4 * h + a * h + (14 if bf16 else 16) * c.vocab_size
    return layers + head


def memory_estimate(
    c: DecoderConfig,
    seq_len: int,
    micro_batch: int,
    *,
    bf16: bool,
    processes: int = 1,
    fsdp: bool = False,
    checkpointing: bool = False,
) -> MemoryEstimate:
    """One process's peak: states (weights, gradients, AdamW) and saved activations."""
    n = parameter_count(c)
    if fsdp:
        layer = (parameter_count(c) - c.vocab_size * c.hidden_size - c.hidden_size) // max(
            1, c.num_layers
        )
        states = 12 * n // processes + 4 * n + FSDP_GATHERED_LAYERS * 4 * layer
    else:
        states = 16 * n + (4 * n if processes > 1 else 0)
    tokens = seq_len * micro_batch
    activations = int(tokens * activation_bytes_per_token(c, bf16, checkpointing))
    return MemoryEstimate(
        states=states, activations=activations, checkpointing=checkpointing, fsdp=fsdp
    )
