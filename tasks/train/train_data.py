"""What the training loop reads: batches of training sequences, and the held-out batches.

A batch is a pure function of the seed and its first sequence number: :class:`TrainWindows` cuts
the token stream into windows of ``seq_len + 1`` ids, :class:`PackedConversations` reads SFT's
packed rows; both visit their items in a seeded permutation per epoch. That is what makes a resumed
run repeat an uninterrupted one step for step, and a global batch the same sequences whatever its
split into processes and micro-batches. The held-out batches (:func:`eval_batches`) are the first
windows or rows of the validation split, in order, the same at every evaluation; what is measured
on them (:func:`validation_loss`) is also what evaluation measures an exported model with.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from llmflow.tasks.train.parallelize import Distributed
from llmflow.tasks.train.sft_data import IGNORE_INDEX, read_packed_rows
from llmflow.tasks.train.token_shards import TokenStream
from llmflow.tasks.train.train_config import TrainJob

_UNIGRAM_MAX_TOKENS = 100_000_000


@dataclass
class Batch:
    """Inputs and aligned targets (``IGNORE_INDEX`` where nothing is trained); packed rows add
    their segments and per-segment positions."""

    x: torch.Tensor
    y: torch.Tensor
    segment_ids: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None

    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        if self.segment_ids is None:
            return model(self.x)
        return model(self.x, segment_ids=self.segment_ids, position_ids=self.position_ids)


def _epoch_order(seed: int, epoch: int, count: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(count)


class TrainWindows:
    """Training sequences: the token stream cut into windows of ``seq_len + 1`` ids, visited in a
    seeded permutation per epoch, so sequence number ``k`` is the same whoever asks for it."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int) -> None:
        self.stream = stream
        self.seq_len = seq_len
        self.seed = seed
        self.count = (len(stream) - 1) // seq_len
        if self.count < 1:
            raise ValueError(
                f"the training split has {len(stream)} tokens, fewer than one sequence of"
                f" seq_len + 1 = {seq_len + 1}: lower pretrain.seq_len or add documents"
            )
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def tokens(self) -> int:
        return len(self.stream)

    def sequence(self, k: int) -> np.ndarray:
        epoch, index = divmod(k, self.count)
        if epoch != self._epoch:
            self._order = _epoch_order(self.seed, epoch, self.count)
            self._epoch = epoch
        return self.stream.read(int(self._order[index]) * self.seq_len, self.seq_len + 1)

    def batch(self, first: int, size: int, device: torch.device) -> Batch:
        rows = torch.from_numpy(np.stack([self.sequence(first + i) for i in range(size)]))
        rows = rows.to(device, non_blocking=True)
        return Batch(rows[:, :-1], rows[:, 1:])

    def targets(self, first: int, size: int) -> int:
        """Trained targets in sequences ``first …``: every position of every window."""
        return size * self.seq_len


class PackedConversations:
    """SFT rows (:func:`~llmflow.tasks.train.sft_data.pack_examples`, saved as ``.npz``), visited
    in a
    seeded permutation per epoch like :class:`TrainWindows`: row ``k`` is the same whoever asks."""

    def __init__(self, path: str, seq_len: int, seed: int) -> None:
        self.rows = read_packed_rows(path)
        self.seed = seed
        self.count = len(self.rows["ids"])
        if self.count < 1:
            raise ValueError(f"{path}: no packed conversation rows to train on")
        if self.rows["ids"].shape[1] != seq_len:
            raise ValueError(
                f"{path}: rows of {self.rows['ids'].shape[1]} tokens, the run wants {seq_len}"
            )
        self._trained = (self.rows["targets"] != IGNORE_INDEX).sum(axis=1)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def tokens(self) -> int:
        return int(self._trained.sum())

    def _indices(self, first: int, size: int) -> np.ndarray:
        out = np.empty(size, dtype=np.int64)
        for i in range(size):
            epoch, index = divmod(first + i, self.count)
            if epoch not in self._orders:
                self._orders = {epoch: _epoch_order(self.seed, epoch, self.count)}
            out[i] = self._orders[epoch][index]
        return out

    def batch(self, first: int, size: int, device: torch.device) -> Batch:
        return self.rows_batch(self._indices(first, size), device)

    def rows_batch(self, indices: np.ndarray, device: torch.device) -> Batch:
        take = {k: torch.from_numpy(v[indices]).to(device) for k, v in self.rows.items()}
        return Batch(take["ids"], take["targets"], take["segment_ids"], take["position_ids"])

    def targets(self, first: int, size: int) -> int:
        return int(self._trained[self._indices(first, size)].sum())


def eval_windows(stream: TokenStream, seq_len: int, limit: int) -> list[np.ndarray]:
    """The first ``limit`` held-out windows, in order (a short split gives one shorter window)."""
    total = len(stream)
    if total < 2:
        return []
    count = min(limit, max(1, (total - 1) // seq_len))
    length = min(seq_len + 1, total)
    return [stream.read(i * seq_len, length) for i in range(count)]


def eval_batches(job: TrainJob, seq_len: int, device: torch.device) -> list[Batch]:
    """The held-out data in micro-batches: the first windows of the validation tokens, or the
    first packed rows of the held-out conversations (none when the split is empty)."""
    config = job.config
    size, limit = config.micro_batch_size, config.eval_batches * config.micro_batch_size
    if job.kind == "sft":
        if not job.val_shards:
            return []
        held_out = PackedConversations(job.val_shards[0], seq_len, config.seed)
        rows = np.arange(min(limit, held_out.count))
        return [held_out.rows_batch(rows[i : i + size], device) for i in range(0, len(rows), size)]
    windows = eval_windows(TokenStream(job.val_shards), seq_len, limit)
    batches = []
    for start in range(0, len(windows), size):
        tokens = torch.from_numpy(np.stack(windows[start : start + size])).to(device)
        batches.append(Batch(tokens[:, :-1], tokens[:, 1:]))
    return batches


def unigram_entropy(stream: TokenStream, vocab_size: int) -> float:
    """Entropy (nats per token) of the training split's token frequencies: the loss of a model
    that knows only how often each token occurs. A trained model must get well below it."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    done = 0
    while done < min(len(stream), _UNIGRAM_MAX_TOKENS):
        chunk = stream.read(done, min(1 << 22, len(stream) - done))
        counts += np.bincount(chunk, minlength=vocab_size)[:vocab_size]
        done += len(chunk)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


@torch.no_grad()
def validation_loss(
    model: torch.nn.Module,
    batches: list[Batch],
    token_bytes: torch.Tensor,
    parallel: Distributed,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> tuple[float, float]:
    """Validation loss (nats per trained token) and bits per byte over the held-out batches.

    Bits per byte divides the summed loss by the UTF-8 bytes the target tokens stand for, which
    makes models with different tokenizers comparable; special tokens (``<|eos|>``) stand for no
    bytes and are left out of both sums, as nanochat does. Targets set to ``IGNORE_INDEX`` (SFT's
    prompts, padding) count in neither.
    """
    model.eval()
    mine = batches[parallel.rank :: parallel.world]
    device = token_bytes.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, tokens, loss(bytes), bytes
    for batch in mine:
        with autocast():
            logits = batch.logits(model)
        y = batch.y.reshape(-1)
        losses = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y, reduction="none"
        ).double()
        trained = y != IGNORE_INDEX
        nbytes = torch.where(trained, token_bytes[y.clamp(min=0)], 0).double()
        sums += torch.stack(
            [losses.sum(), trained.sum().double(), (losses * (nbytes > 0)).sum(), nbytes.sum()]
        )
    sums = parallel.all_sum(sums)
    model.train()
    loss = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
    bpb = float(sums[2] / (math.log(2) * sums[3])) if sums[3] > 0 else float("nan")
    return loss, bpb
