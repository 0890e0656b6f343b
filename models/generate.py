"""Sampling from a :class:`~llmflow.models.decoder.Decoder`, with a KV cache.

The prompt is run once (prefill); each new token then costs one position's work instead of the
whole sequence's. ``use_cache=False`` recomputes the sequence every step: slower, but the
reference the cached path is tested against.
"""

from __future__ import annotations

import torch

from llmflow.models.decoder import Decoder, KVCache


def next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token of each row from its logits: greedy at temperature 0, else sampled
    from the softmax, restricted to the top-k tokens and/or the top-p probability mass."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the first over top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Decoder,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The prompt (batch, seq) followed by up to ``max_new_tokens`` tokens per row.

    Stops early when every row has produced ``eos_id``; rows that finished keep emitting it.
    """
    model.eval()
    ids = prompt
    cache = KVCache(model.config.num_layers) if use_cache else None
    step_input = prompt
    done = torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
    for _ in range(max_new_tokens):
        if ids.shape[1] >= model.config.max_seq_len:
            break
        logits = model(step_input if use_cache else ids, cache)[:, -1]
        token = next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            token = torch.where(done, torch.full_like(token, eos_id), token)
            done |= token == eos_id
        ids = torch.cat([ids, token[:, None]], dim=1)
        step_input = token[:, None]
        if eos_id is not None and bool(done.all()):
            break
    return ids
