"""Export a :class:`~llmflow.models.decoder.Decoder` as a Hugging Face ``LlamaForCausalLM``.

The decoder's parameter names are Llama's but for its two fused projections (``qkv_proj``,
``gate_up_proj``), which the export splits back; export is then the state dict in safetensors plus
a ``config.json`` that transformers reads; any Llama-compatible tool (transformers, vLLM,
llama.cpp's converter) then loads the model without llmflow.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmflow.models.decoder import Decoder


def llama_config(model: Decoder) -> dict:
    """transformers' LlamaConfig fields for this model."""
    c = model.config
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.ffn_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def llama_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """The weights under Llama's names: the fused projections split into q/k/v and gate/up."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu")
        if name.endswith(".qkv_proj.weight"):
            prefix = name.removesuffix(".qkv_proj.weight")
            sizes = model.model.layers[0].self_attn.split
            for part, piece in zip(("q", "k", "v"), tensor.split(sizes, dim=0), strict=True):
                state[f"{prefix}.{part}_proj.weight"] = piece.contiguous()
        elif name.endswith(".gate_up_proj.weight"):
            prefix = name.removesuffix(".gate_up_proj.weight")
            gate, up = tensor.chunk(2, dim=0)
            state[f"{prefix}.gate_proj.weight"] = gate.contiguous()
            state[f"{prefix}.up_proj.weight"] = up.contiguous()
        else:
            state[name] = tensor.contiguous()
    return state


def export_llama(model: Decoder, directory: str | Path) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``directory``; returns it."""
    if model.config.qk_norm:
        raise ValueError(
            "a model with qk_norm=True has no Llama equivalent (Llama has no QK-norm); train with"
            " qk_norm=False to export it as LlamaForCausalLM"
        )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    state = llama_state_dict(model)
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # transformers re-ties it from the embedding
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llama_config(model), indent=2) + "\n")
    return out


__all__ = ["export_llama", "llama_config", "llama_state_dict"]
