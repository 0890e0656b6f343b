"""The Llama-style decoder: causal, cache-equivalent generation, and a faithful HF export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmflow.models.decoder import PRESETS, Decoder, DecoderConfig, KVCache
from llmflow.models.generate import generate, next_token
from llmflow.models.hf_export import export_llama

SMALL = DecoderConfig(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64)


def model(config: DecoderConfig = SMALL, seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(config).eval()


@pytest.mark.parametrize("config", [SMALL, SMALL.model_copy(update={"num_kv_heads": 2})])
def test_future_tokens_change_no_earlier_logit(config: DecoderConfig) -> None:
    m = model(config)
    ids = torch.randint(0, 97, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        a, b = m(ids), m(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_cached_forward_equals_full_forward() -> None:
    m = model(SMALL.model_copy(update={"num_kv_heads": 2, "qk_norm": True}))
    ids = torch.randint(0, 97, (3, 24))
    cache = KVCache(SMALL.num_layers)
    with torch.no_grad():
        full = m(ids)
        parts = [m(ids[:, :10], cache), m(ids[:, 10:11], cache), m(ids[:, 11:], cache)]
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_packed_row_gives_each_example_its_own_logits() -> None:
    """Three examples packed in one row (with padding) give the logits each gets alone: attention
    stays inside a segment and positions restart, which is what makes SFT packing exact."""
    m = model(SMALL.model_copy(update={"num_kv_heads": 2}))
    examples = [torch.randint(0, 97, (n,)) for n in (9, 5, 11)]
    row = torch.cat([*examples, torch.zeros(3, dtype=torch.long)])[None]
    segments = torch.cat(
        [torch.full((len(e),), i + 1) for i, e in enumerate(examples)] + [torch.zeros(3)]
    ).long()[None]
    positions = torch.cat([torch.arange(len(e)) for e in examples] + [torch.arange(3)])[None]
    with torch.no_grad():
        packed = m(row, segment_ids=segments, position_ids=positions)[0]
        start = 0
        for example in examples:
            alone = m(example[None])[0]
            assert torch.allclose(packed[start : start + len(example)], alone, atol=1e-5)
            start += len(example)
        # without the segments the second example would see the first one
        plain = m(row)[0]
        assert not torch.allclose(plain[9:14], m(examples[1][None])[0], atol=1e-3)
    with pytest.raises(ValueError, match="position_ids"):
        m(row, segment_ids=segments)


def test_generation_with_cache_equals_without() -> None:
    m = model()
    prompt = torch.randint(0, 97, (2, 5))
    cached = generate(m, prompt, 30, use_cache=True)
    uncached = generate(m, prompt, 30, use_cache=False)
    assert cached.shape == (2, 35) and torch.equal(cached, uncached)
    for kwargs in ({"temperature": 0.8, "top_k": 10}, {"temperature": 1.0, "top_p": 0.9}):
        runs = [
            generate(
                m, prompt, 20, use_cache=c, generator=torch.Generator().manual_seed(3), **kwargs
            )
            for c in (True, False)
        ]
        assert torch.equal(runs[0], runs[1])


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    assert next_token(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    picks = {next_token(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert picks == {1, 2}
    picks = {next_token(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(200)}
    assert picks == {1}


def test_eos_stops_generation() -> None:
    m = model()
    prompt = torch.randint(0, 97, (1, 4))
    first = generate(m, prompt, 1)[0, -1].item()
    out = generate(m, prompt, 20, eos_id=first)
    assert out.shape[1] == 5


def test_hf_export_loads_in_transformers_with_the_same_logits(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    for tied in (True, False):
        config = SMALL.model_copy(update={"num_kv_heads": 2, "tie_embeddings": tied})
        m = model(config, seed=1)
        export_llama(m, tmp_path / str(tied))
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / str(tied)).eval()
        ids = torch.randint(0, 97, (2, 30))
        with torch.no_grad():
            ours, theirs = m(ids), hf(ids).logits
        assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_config_errors_and_presets() -> None:
    with pytest.raises(ValueError, match="num_heads"):
        DecoderConfig(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        DecoderConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="max_seq_len"):
        model()(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="qk_norm"):
        export_llama(model(SMALL.model_copy(update={"qk_norm": True})), "/nonexistent")
    small = PRESETS["gpt2-small"]
    n = sum(p.numel() for p in Decoder(small.model_copy(update={"num_layers": 1})).parameters())
    per_layer = 4 * small.hidden_size**2 + 3 * small.hidden_size * small.ffn_size
    total = n + 11 * (per_layer + 2 * small.hidden_size)
    assert 120e6 < total < 130e6  # ~124M like GPT-2 small
