"""sft_data: instruction files → conversations (bad records counted), packing, block mask."""

from __future__ import annotations

import bz2
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmflow.models.decoder import block_causal_mask
from llmflow.tasks.train.sft_data import (
    IGNORE_INDEX,
    pack_examples,
    read_conversations,
    record_conversation,
)

ALPACA = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
ALPACA_NO_INPUT = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
PROMPT = {"prompt": "What is 2+2?", "response": "4"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "At night?"},
        {"role": "assistant", "content": "Black."},
    ]
}
GOOD = [ALPACA, ALPACA_NO_INPUT, PROMPT, CHAT]
EXPECTED = [
    [
        {"role": "user", "content": "Add the numbers.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ],
    [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    CHAT["messages"],
]

BAD = [
    (["a", "list"], "not an object"),
    ({"instruction": "Do it.", "input": ""}, "alpaca: missing output"),
    ({"instruction": "  ", "output": "x"}, "alpaca: empty instruction"),
    ({"instruction": "Do it.", "output": 5}, "alpaca: output is not a string"),
    ({"instruction": "Do it.", "input": ["x"], "output": "y"}, "alpaca: input is not a string"),
    ({"prompt": "Hi", "response": ""}, "prompt/response: empty response"),
    ({"prompt": "Hi"}, "prompt/response: missing response"),
    ({"instruction": None, "output": "x"}, "alpaca: missing instruction"),
    ({"question": "Hi", "answer": "x"}, "unknown schema"),
    ({"messages": "hello"}, "chat: messages is not a list"),
    ({"messages": []}, "chat: no messages"),
    (
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        "chat: bad role order",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]},
        "chat: bad role order",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": 3}]},
        "chat: non-string content",
    ),
    ({"messages": [{"role": "human", "content": "x"}]}, "chat: unknown role"),
    ({"messages": ["user: x"]}, "chat: message is not an object"),
    (
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
        "chat: empty content",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}]},
        "chat: does not end with an assistant reply",
    ),
]


def write_jsonl(path: Path, records: list, extra_lines: tuple[str, ...] = ()) -> str:
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_each_schema_becomes_the_right_conversation() -> None:
    assert [record_conversation(r) for r in GOOD] == EXPECTED


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "jsonl.bz2"])
def test_each_file_format_reads_the_same(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"data.{kind}"
    if kind == "jsonl":
        write_jsonl(path, GOOD)
    elif kind == "json":
        path.write_text(json.dumps(GOOD), encoding="utf-8")
    elif kind == "jsonl.bz2":
        path.write_bytes(bz2.compress("".join(json.dumps(r) + "\n" for r in GOOD).encode()))
    else:  # one Parquet file per schema would be usual; a union of columns must work too
        keys = sorted({k for r in GOOD for k in r})
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in GOOD]), path)
        assert pq.read_table(path).column("prompt").null_count == 3
    conversations, skipped = read_conversations(str(path))
    assert conversations == EXPECTED
    assert skipped == Counter()


def test_fsspec_url(tmp_path: Path) -> None:
    import fsspec

    with fsspec.open("memory://sft/data.jsonl", "w") as f:
        f.write(json.dumps(PROMPT) + "\n")
    assert read_conversations("memory://sft/data.jsonl") == ([EXPECTED[2]], Counter())
    local = write_jsonl(tmp_path / "x.jsonl", [PROMPT])
    assert read_conversations(f"file://{local}")[0] == [EXPECTED[2]]


def test_bad_records_are_counted_with_their_reason(tmp_path: Path) -> None:
    records = [ALPACA] + [bad for bad, _ in BAD] + [PROMPT]
    path = write_jsonl(tmp_path / "mixed.jsonl", records, ('{"prompt": "cut', "", "7"))
    conversations, skipped = read_conversations(path)
    assert conversations == [EXPECTED[0], EXPECTED[2]]
    expected = Counter(reason for _, reason in BAD)
    expected.update({"invalid JSON": 1, "not an object": 1})  # the cut line; the bare 7
    assert skipped == expected


def test_whole_file_problems_are_errors(tmp_path: Path) -> None:
    (tmp_path / "obj.json").write_text(json.dumps({"data": GOOD}))
    with pytest.raises(ValueError, match="obj.json: a JSON instruction file must hold a list"):
        read_conversations(str(tmp_path / "obj.json"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        read_conversations(str(tmp_path / "broken.json"))
    with pytest.raises(ValueError, match="data.csv: unknown instruction-data format"):
        read_conversations(str(tmp_path / "data.csv"))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_conversations(str(tmp_path / "nope.jsonl"))


def test_real_alpaca_and_dolly_files(shared_data: Path) -> None:
    sft = shared_data / "sft"
    alpaca, skipped = read_conversations(str(sft / "alpaca_5000.json"))
    # Two of the 5,000 records have an empty output (they ask for data the model cannot fetch).
    assert (len(alpaca), skipped) == (4998, Counter({"alpaca: empty output": 2}))
    assert alpaca[0] == [
        {
            "role": "user",
            "content": "Are the two sentences below grammatically correct? Output yes or no."
            "\n\nSentence 1: I am going to the store.\nSentence 2: I goes to the store.",
        },
        {"role": "assistant", "content": "No"},
    ]
    dolly, skipped = read_conversations(str(sft / "dolly_hhrlhf_train_small.jsonl"))
    assert (len(dolly), skipped) == (1000, Counter())
    assert dolly[0][0]["content"].endswith("what is kangen water?\n\n### Response:\n")
    assert dolly[0][1]["content"].startswith("Kangen water is alkaline ionized water")
    # The seed tasks nest their outputs under "instances": a schema we do not read, so every
    # record is skipped, counted, and none is silently taken with an empty reply.
    seeds, skipped = read_conversations(str(sft / "alpaca_seed_tasks.jsonl"))
    assert (seeds, skipped) == ([], Counter({"alpaca: missing output": 175}))


def example(n: int, first: int, learn_from: int) -> tuple[list[int], list[bool]]:
    """n distinct ids starting at ``first``; the mask is True from index ``learn_from`` on."""
    return list(range(first, first + n)), [i >= learn_from for i in range(n)]


def test_packing_keeps_every_token_once_and_targets_stay_inside_examples() -> None:
    lengths = [8, 3, 5, 8, 2, 6, 4, 4, 1]
    encoded = []
    first = 100
    for n in lengths:
        encoded.append(example(n, first, learn_from=max(1, n // 2)))
        first += n
    encoded.append(([1, 2, 3], [False, False, False]))  # nothing to learn: dropped
    encoded.append(example(12, 500, learn_from=2))  # longer than a row: truncated to 8
    packed = pack_examples(encoded, seq_len=8, pad_id=2)
    assert (packed.examples, packed.truncated, packed.dropped) == (9, 1, 2)  # and the 1-token one

    kept = [e for e in encoded[:-1] if any(e[1][1:])] + [(encoded[-1][0][:8], encoded[-1][1][:8])]
    real = packed.segment_ids > 0
    assert sorted(packed.ids[real].tolist()) == sorted(t for ids, _ in kept for t in ids)
    assert packed.ids[~real].tolist() == [2] * int((~real).sum())
    # Optimal here: 41 - 1 (the 1-token example) + 8 truncated = 48 tokens = 6 full rows.
    assert packed.ids.shape == (6, 8) and packed.padding_fraction == 0.0

    expected_targets = {}
    for ids, mask in kept:
        for t in range(len(ids) - 1):
            expected_targets[ids[t]] = ids[t + 1] if mask[t + 1] else IGNORE_INDEX
        expected_targets[ids[-1]] = IGNORE_INDEX  # never predict the next example's first token
    got = {int(i): int(t) for i, t in zip(packed.ids[real], packed.targets[real], strict=True)}
    assert got == expected_targets
    assert int(packed.loss_mask.sum()) == sum(sum(m[1:]) for _, m in kept)
    for r in range(packed.ids.shape[0]):  # positions restart at 0 with each example
        for s in set(packed.segment_ids[r].tolist()) - {0}:
            assert packed.position_ids[r][packed.segment_ids[r] == s].tolist() == list(
                range(int((packed.segment_ids[r] == s).sum()))
            )


def test_packing_pads_when_nothing_fits_and_is_deterministic() -> None:
    encoded = [example(5, 10, 1), example(5, 20, 1), example(2, 30, 1)]
    packed = pack_examples(encoded, seq_len=8, pad_id=2)
    assert packed.ids.tolist() == [
        [10, 11, 12, 13, 14, 30, 31, 2],
        [20, 21, 22, 23, 24, 2, 2, 2],
    ]
    assert packed.segment_ids.tolist() == [[1, 1, 1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert packed.targets[0].tolist() == [11, 12, 13, 14, -100, 31, -100, -100]
    assert packed.position_ids[1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    again = pack_examples(encoded, seq_len=8, pad_id=2)
    assert np.array_equal(again.ids, packed.ids)
    with pytest.raises(ValueError, match="example 0: 2 ids but 1 mask"):
        pack_examples([([1, 2], [True])], seq_len=8, pad_id=2)
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        pack_examples(encoded, seq_len=1, pad_id=2)


def test_block_mask_forbids_attention_across_examples() -> None:
    segments = torch.tensor([1, 1, 1, 2, 2, 0, 0])
    mask = block_causal_mask(segments)
    expected = torch.zeros(7, 7, dtype=torch.bool)
    for block in (range(0, 3), range(3, 5), range(5, 7)):
        for i in block:
            for j in block:
                expected[i, j] = j <= i
    assert torch.equal(mask, expected)
    assert mask.any(dim=-1).all()  # every query sees at least itself: softmax never NaN
    batch = block_causal_mask(torch.stack([segments, torch.ones(7, dtype=torch.long)]))
    assert batch.shape == (2, 1, 7, 7) and torch.equal(batch[0, 0], expected)
    assert torch.equal(batch[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())


def test_packed_attention_equals_each_example_alone() -> None:
    """The point of the mask: attention outputs in a packed row equal those computed per example."""
    torch.manual_seed(0)
    segments = torch.tensor([1, 1, 1, 1, 2, 2, 2, 0])
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    packed = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=block_causal_mask(segments)
    )
    for start, end in ((0, 4), (4, 7)):
        alone = torch.nn.functional.scaled_dot_product_attention(
            q[..., start:end, :], k[..., start:end, :], v[..., start:end, :], is_causal=True
        )
        assert torch.allclose(packed[..., start:end, :], alone, atol=1e-6)
    leaky = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(leaky[..., 4:7, :], packed[..., 4:7, :], atol=1e-3)
