"""sft_data: instruction data → conversations → packed rows with an assistant-only loss.

Readers accept the three record shapes instruction data comes in, detected per record by its
keys (so a file mixing them still reads):

- chat: ``{"messages": [{"role", "content"}, ...]}``, checked by the chat layout's rules;
- Alpaca: ``{"instruction", "input"?, "output"}`` → user = instruction (+ "\\n\\n" + input when
  there is one), assistant = output;
- prompt/response: ``{"prompt", "response"}`` → one user turn and one assistant turn.

Files are JSONL (one record a line), JSON (a list of records) or Parquet, local or any fsspec URL;
``.gz``/``.bz2``/... compression is inferred from the name. Text is taken verbatim (no stripping:
the model is meant to reproduce exactly what it is trained on). A record that cannot become a
trainable conversation (not an object, a missing, empty or non-string field, a bad role order, no
assistant reply at the end) is skipped and counted under its reason: one bad line must not sink a
run, and none disappears unaccounted. A file that cannot be read at all is an error.

Packing: SFT examples are short (Alpaca: ~150 tokens) next to a context of 1-2k, so padding each
to the context wastes most of the compute. :func:`pack_examples` fills rows with whole examples
(best-fit decreasing) and records which example each token belongs to; the decoder then confines
attention to each example (:func:`~llmflow.models.decoder.block_causal_mask`) and restarts
positions at 0 in each, so a packed row trains exactly as the examples would alone.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from llmflow.tasks.core import shards
from llmflow.tasks.train.chat_format import validate_messages

log = logging.getLogger(__name__)

Message = dict[str, str]
Conversation = list[Message]
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index
_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}
_ALPACA_KEYS = frozenset({"instruction", "input", "output"})
_PROMPT_KEYS = frozenset({"prompt", "response"})
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


class BadRecord(ValueError):
    """A record that cannot become a conversation; ``reason`` is its counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _text_field(record: Mapping[str, Any], schema: str, key: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise BadRecord(f"{schema}: missing {key}")
        return ""
    if not isinstance(value, str):
        raise BadRecord(f"{schema}: {key} is not a string", type(value).__name__)
    if required and not value.strip():
        raise BadRecord(f"{schema}: empty {key}")
    return value


def _chat(record: Mapping[str, Any]) -> Conversation:
    messages = record["messages"]
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise BadRecord("chat: messages is not a list", type(messages).__name__)
    try:
        validate_messages(messages)
    except ValueError as error:
        text = str(error)
        if "content must be a string" in text:
            reason = "chat: non-string content"
        elif "unknown role" in text:
            reason = "chat: unknown role"
        elif "not an object" in text:
            reason = "chat: message is not an object"
        elif "empty" in text:
            reason = "chat: no messages"
        else:
            reason = "chat: bad role order"
        raise BadRecord(reason, text) from error
    conversation = [{"role": m["role"], "content": m["content"]} for m in messages]
    for index, message in enumerate(conversation):
        if message["role"] != "system" and not message["content"].strip():
            raise BadRecord("chat: empty content", f"message {index} ({message['role']})")
    if conversation[-1]["role"] != "assistant":
        raise BadRecord("chat: does not end with an assistant reply")
    return conversation


def record_conversation(record: Any) -> Conversation:
    """One record as a conversation, or :class:`BadRecord` saying why it cannot be one.

    The schema is chosen by its non-null keys, in order: ``messages`` (chat), then any of
    ``instruction``/``input``/``output`` (Alpaca), then ``prompt``/``response``.
    """
    if not isinstance(record, Mapping):
        raise BadRecord("not an object", type(record).__name__)
    # A null field counts as absent: a Parquet file holding several schemas has every column in
    # every row, null where the row's schema lacks it.
    present = {key for key, value in record.items() if value is not None}
    if "messages" in present:
        return _chat(record)
    if present & _ALPACA_KEYS:
        instruction = _text_field(record, "alpaca", "instruction")
        extra = _text_field(record, "alpaca", "input", required=False)
        output = _text_field(record, "alpaca", "output")
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if present & _PROMPT_KEYS:
        prompt = _text_field(record, "prompt/response", "prompt")
        response = _text_field(record, "prompt/response", "response")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    keys = ", ".join(sorted(map(str, present))[:8])
    raise BadRecord("unknown schema", f"keys {keys or '(none)'}")


def file_format(path: str) -> str:
    """jsonl, json or parquet, from the file name (a compression suffix is looked through)."""
    name = path.rsplit("/", 1)[-1].lower()
    for suffix in _COMPRESSIONS:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    for suffix, kind in _FORMATS.items():
        if name.endswith(suffix):
            return kind
    raise ValueError(
        f"{path}: unknown instruction-data format; expected a name ending in"
        f" {', '.join(_FORMATS)} (optionally compressed: {', '.join(_COMPRESSIONS)})"
    )


def _records(path: str) -> Iterator[tuple[str, Any]]:
    """(location, record) pairs; a line of invalid JSON yields a BadRecord as its record."""
    kind = file_format(path)
    record: Any  # whatever the file holds; validated by the caller
    fs, fs_path = shards.filesystem(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"no instruction data at {path}")
    if kind == "parquet":
        with fs.open(fs_path, "rb") as f:
            table = pq.read_table(f)
        for row, record in enumerate(table.to_pylist()):
            yield f"{path} row {row}", record
        return
    with fs.open(fs_path, "rb", compression="infer") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error
    if kind == "json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(data, list):
            raise ValueError(
                f"{path}: a JSON instruction file must hold a list of records, got"
                f" {type(data).__name__} (use JSONL for one record a line)"
            )
        for index, record in enumerate(data):
            yield f"{path} item {index}", record
        return
    for number, line in enumerate(io.StringIO(text), start=1):
        if not line.strip():
            continue  # blank lines separate nothing in JSONL; they are not records
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            record = BadRecord("invalid JSON", str(error))
        yield f"{path} line {number}", record


def read_conversations(path: str) -> tuple[list[Conversation], Counter[str]]:
    """All trainable conversations in one file, and the skipped records counted by reason.

    Each reason is logged once with the first record that had it, so a surprising count can be
    traced to a line.
    """
    conversations: list[Conversation] = []
    skipped: Counter[str] = Counter()
    for where, record in _records(path):
        try:
            if isinstance(record, BadRecord):
                raise record
            conversations.append(record_conversation(record))
        except BadRecord as bad:
            if not skipped[bad.reason]:
                log.warning("skipping %s: %s (first of its kind)", where, bad)
            skipped[bad.reason] += 1
    return conversations, skipped


@dataclass(frozen=True)
class PackedRows:
    """Packed training rows, each ``seq_len`` long (numpy, shape ``(rows, seq_len)``).

    Shifted-label convention: ``targets[r, t]`` is what the model should predict at position t,
    i.e. ``ids[r, t + 1]`` when that token is in the same example and the mask says it is to be
    learned, else ``IGNORE_INDEX``; so ``cross_entropy(logits.flatten(0, 1), targets.flatten())``
    trains on assistant tokens only, and never across examples. ``segment_ids`` is 1, 2, ... for
    the examples in a row and 0 for padding; ``position_ids`` restart at 0 in each segment (for
    RoPE), padding included.
    """

    ids: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    examples: int  # examples packed
    truncated: int  # examples cut to seq_len
    dropped: int  # examples left with nothing to learn (empty, or truncated before the reply)

    @property
    def loss_mask(self) -> np.ndarray:
        """True where a position's prediction is trained (aligned with ``targets``)."""
        return self.targets != IGNORE_INDEX

    @property
    def padding_fraction(self) -> float:
        return float((self.segment_ids == 0).mean()) if self.ids.size else 0.0


def pack_examples(
    encoded: Sequence[tuple[Sequence[int], Sequence[bool]]], seq_len: int, pad_id: int
) -> PackedRows:
    """Pack (ids, mask) examples, as :func:`~llmflow.tasks.train.chat_format.encode_chat` makes
    them,
    into rows of ``seq_len`` tokens without splitting any example across rows.

    Best-fit decreasing: the longest examples are placed first, each into the row whose free room
    is smallest but enough, which leaves little padding (a row is padded only when nothing left
    fits). Ties keep input order, so the result is deterministic. An example longer than
    ``seq_len`` is truncated to its first ``seq_len`` tokens (counted); one with no token to
    learn (after truncation) is dropped (counted), since it would cost compute and teach nothing.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    examples: list[tuple[np.ndarray, np.ndarray]] = []
    truncated = dropped = 0
    for index, (ids, mask) in enumerate(encoded):
        if len(ids) != len(mask):
            raise ValueError(f"example {index}: {len(ids)} ids but {len(mask)} mask values")
        if len(ids) > seq_len:
            truncated += 1
            ids, mask = ids[:seq_len], mask[:seq_len]
        mask_array = np.asarray(mask, dtype=bool)
        if not mask_array[1:].any():  # the first token has no position before it to predict it
            dropped += 1
            continue
        examples.append((np.asarray(ids, dtype=np.int64), mask_array))

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted: bisect finds the best fit
    for i in order:
        need = len(examples[i][0])
        at = bisect.bisect_left(free, (need, -1))
        if at == len(free):
            rows.append([i])
            row, room = len(rows) - 1, seq_len - need
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= need
        if room > 0:
            bisect.insort(free, (room, row))

    shape = (len(rows), seq_len)
    ids_out = np.full(shape, pad_id, dtype=np.int64)
    targets = np.full(shape, IGNORE_INDEX, dtype=np.int64)
    segments = np.zeros(shape, dtype=np.int32)
    positions = np.zeros(shape, dtype=np.int32)
    for r, members in enumerate(rows):
        start = 0
        for segment, i in enumerate(members, start=1):
            example_ids, example_mask = examples[i]
            end = start + len(example_ids)
            ids_out[r, start:end] = example_ids
            segments[r, start:end] = segment
            positions[r, start:end] = np.arange(len(example_ids))
            targets[r, start : end - 1] = np.where(example_mask[1:], example_ids[1:], IGNORE_INDEX)
            start = end
        positions[r, start:] = np.arange(seq_len - start)
    return PackedRows(ids_out, targets, segments, positions, len(examples), truncated, dropped)


_PACKED_ARRAYS = ("ids", "targets", "segment_ids", "position_ids")


def write_packed_rows(path: str, rows: PackedRows) -> None:
    """Save the rows the trainer reads (``.npz``), atomically: a half-written file is never
    mistaken for the data of a run that resumes."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: getattr(rows, name) for name in _PACKED_ARRAYS})
    shards.write_bytes_atomic(path, buffer.getvalue())


def read_packed_rows(path: str) -> dict[str, np.ndarray]:
    """The arrays :func:`write_packed_rows` saved, checked to be one consistent set of rows."""
    try:
        with np.load(path) as saved:
            arrays = {name: saved[name] for name in _PACKED_ARRAYS}
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"{path}: not a packed SFT rows file ({error})") from error
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) != 1 or arrays["ids"].ndim != 2:
        raise ValueError(f"{path}: packed arrays of different shapes {shapes}")
    return arrays
