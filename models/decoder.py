"""A decoder-only transformer in the Llama style, and its presets.

RoPE, RMSNorm, SwiGLU, no biases, grouped-query attention through
``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient kernels on GPUs),
optional tied embeddings and QK-norm. Module and parameter names follow Hugging Face's
``LlamaForCausalLM`` (``model.layers.N.self_attn.o_proj`` …) except that q/k/v and gate/up are
each one fused matmul (``qkv_proj``, ``gate_up_proj``, as nanoGPT fuses qkv): export splits
those two and copies the rest, and RoPE uses the same half-rotation layout as transformers'
Llama.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class DecoderConfig(BaseModel):
    """The shape of the model. Every field is what a Llama config calls it, where it has one."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, ge=2, description="Tokens in the vocabulary (the tokenizer's).")
    hidden_size: int = Field(128, ge=8, description="Width of the residual stream.")
    num_layers: int = Field(4, ge=1, description="Transformer blocks.")
    num_heads: int = Field(4, ge=1, description="Query heads.")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads (grouped-query attention). None: num_heads."
    )
    intermediate_size: int | None = Field(
        None,
        ge=8,
        description="SwiGLU hidden width. None: 8/3 x hidden_size rounded up to a multiple of 64.",
    )
    max_seq_len: int = Field(256, ge=8, description="Longest sequence (context length).")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(
        True, description="Share the input embedding and the output projection (fewer weights)."
    )
    qk_norm: bool = Field(
        False,
        description="RMSNorm on queries and keys per head (stabilises training at high learning"
        " rates; not part of Llama, so such a model exports as Llama only without it).",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> DecoderConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even for RoPE")
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size is not None:
            return self.intermediate_size
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)


PresetName = Literal["tiny", "gpt2-small", "llama-1b"]

PRESETS: dict[str, DecoderConfig] = {
    # Trains on two CPU cores in minutes: the embedded default.
    "tiny": DecoderConfig(hidden_size=128, num_layers=4, num_heads=4, max_seq_len=256),
    # GPT-2 small's size (~124M with a 50k vocabulary): one GPU.
    "gpt2-small": DecoderConfig(
        vocab_size=50304, hidden_size=768, num_layers=12, num_heads=12, max_seq_len=1024
    ),
    # Llama 3.2 1B's shape: several GPUs.
    "llama-1b": DecoderConfig(
        vocab_size=128256,
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        max_seq_len=2048,
        rope_theta=500000.0,
    ),
}


def rope_tables(config: DecoderConfig, device: torch.device | None = None) -> torch.Tensor:
    """cos and sin for every position, stacked: (2, max_seq_len, head_dim), in float32."""
    half = config.head_dim // 2
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, half, dtype=torch.float32, device=device) / half)
    )
    positions = torch.arange(config.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by position, in transformers' half-rotation layout."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Attention mask for packed rows: True where query i may attend to key j.

    That is j <= i and both in the same segment (the convention of
    ``scaled_dot_product_attention``'s boolean ``attn_mask``). ``(seq,)`` gives ``(seq, seq)``;
    ``(batch, seq)`` gives ``(batch, 1, seq, seq)``, broadcasting over heads. Padding (segment 0)
    attends only to earlier padding, so no row of the mask is empty (an empty row would make
    softmax NaN).
    """
    if segment_ids.dim() not in (1, 2):
        raise ValueError(f"segment_ids must be (seq,) or (batch, seq), got {segment_ids.shape}")
    seq = segment_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids.unsqueeze(-1) == segment_ids.unsqueeze(-2)
    mask = same & causal
    return mask if segment_ids.dim() == 1 else mask.unsqueeze(1)


class KVCache:
    """Keys and values of the positions seen so far, per layer, for incremental decoding."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer], self.values[layer]
        if old_k is not None and old_v is not None:
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        d, h, kv = config.head_dim, config.num_heads, config.kv_heads
        # One matmul for queries, keys and values (Llama's q_proj, k_proj and v_proj stacked;
        # the export splits them back): fewer, larger kernels than three small ones.
        self.split = (h * d, kv * d, kv * d)
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split), bias=False)
        self.o_proj = nn.Linear(h * d, config.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(d, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(d, eps=config.norm_eps) if config.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        layer: int,
        cache: KVCache | None,
        start: int,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        c = self.config
        q, k, v = self.qkv_proj(x).split(self.split, dim=-1)
        q = q.view(batch, seq, c.num_heads, c.head_dim).transpose(1, 2)
        k = k.view(batch, seq, c.kv_heads, c.head_dim).transpose(1, 2)
        v = v.view(batch, seq, c.kv_heads, c.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        mask: torch.Tensor | None
        if packed is not None:  # per-token positions (batch, 1, seq, head_dim), broadcast on heads
            positions, mask = packed
            cos, sin = rope[0][positions].unsqueeze(1), rope[1][positions].unsqueeze(1)
        else:
            cos, sin = rope[0, start : start + seq], rope[1, start : start + seq]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        if packed is not None:
            causal = False
        elif start == 0:
            mask, causal = None, True
        else:  # new positions see every cached one and the earlier new ones
            total = k.shape[2]
            rows = torch.arange(start, start + seq, device=x.device)[:, None]
            mask, causal = torch.arange(total, device=x.device)[None, :] <= rows, False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=c.kv_heads != c.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, c.hidden_size))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one matmul (Llama's gate_proj and
    up_proj stacked; the export splits them back)."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.ffn_size, bias=False)
        self.down_proj = nn.Linear(config.ffn_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor,
        layer: int,
        cache: KVCache | None,
        start: int,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, layer, cache, start, packed)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)


class Decoder(nn.Module):
    """Token ids in, next-token logits out."""

    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("rope", rope_tables(config), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, output projections scaled by depth (GPT-2's scheme)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            std = 0.02
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                std /= math.sqrt(2 * self.config.num_layers)
            nn.init.normal_(p, mean=0.0, std=std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token (forward + backward), PaLM's estimate as nanoGPT uses it.

        6 per matmul weight (2 forward, 4 backward) plus attention's score and value products,
        12 · layers · hidden · seq_len. The embedding lookup is no matmul: an untied input table
        is left out, a tied one counts once, as the output projection. Both the trainer's MFU and
        the throughput bench use this one count.
        """
        c = self.config
        matmul_params = self.num_parameters()
        if not c.tie_embeddings:
            matmul_params -= self.model.embed_tokens.weight.numel()
        return 6 * matmul_params + 12 * c.num_layers * c.hidden_size * seq_len

    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for every position of ``ids`` (batch, seq).

        Packed rows (several SFT examples in one row) pass ``segment_ids`` (batch, seq): a token
        then attends only to earlier tokens of its own segment, and ``position_ids`` (RoPE)
        restart in each, so every example trains exactly as it would alone.
        """
        start = cache.length if cache is not None else 0
        if start + ids.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence of {start + ids.shape[1]} tokens exceeds max_seq_len="
                f"{self.config.max_seq_len}"
            )
        packed = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("packed rows (segment_ids) are for training, not cached decoding")
            if position_ids is None:
                raise ValueError("segment_ids need position_ids (positions restart per segment)")
            packed = (position_ids.long(), block_causal_mask(segment_ids))
        x = self.model.embed_tokens(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, self.rope, i, cache, start, packed)
        return self.lm_head(self.model.norm(x))
