"""The training loop (pretraining and SFT): one process of it, alone or as one rank under torchrun.

The same function trains on a laptop's CPU and on each GPU of a node: ``torchrun`` sets the
``RANK``/``WORLD_SIZE`` environment and this module joins the process group (gloo on the CPU, NCCL
on GPUs) and wraps the model in DDP. Run directly as ``python -m llmflow.tasks.train.trainer
job.json``
(which is what :mod:`llmflow.tasks.train.pretrain` hands to torchrun).

Exactness is a design goal, not an accident: the batch of step ``s`` is a pure function of the seed
and ``s`` (a seeded permutation of the training windows per epoch), the checkpoint holds the
optimizer, the scheduler and every rank's RNG states, so a run resumed from step ``k`` produces the
same losses, step for step, as one that never stopped; and a global batch is the same sequences
whatever the split into processes and micro-batches, so two DDP processes match one process with
twice the accumulation.

Pretraining and SFT differ only in their data (:class:`TrainWindows` cut from the token stream,
:class:`PackedConversations` of whole conversations with an assistant-only loss), in where the
weights start (SFT: the pretrained checkpoint) and in what a sample is (a continuation, a chat
reply). The loss of a step is the summed loss over the step's trained targets divided by their
number over the whole global batch: the mean over tokens, whatever the split into processes and
micro-batches (SFT rows hold different numbers of assistant tokens, so a mean of per-micro-batch
means would weigh them unevenly).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from llmflow.models.decoder import Decoder
from llmflow.models.generate import generate
from llmflow.tasks.train import checkpoints
from llmflow.tasks.train.sft_data import IGNORE_INDEX, read_packed_rows
from llmflow.tasks.train.token_shards import TokenStream
from llmflow.tasks.train.train_config import TrainConfig, TrainJob

PROGRESS_PREFIX = "LLMFLOW_PROGRESS "
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
_MLFLOW_FLUSH_S = 2.0
_MLFLOW_MAX_BACKOFF_S = 60.0
_MLFLOW_MAX_PENDING = 200_000
_MLFLOW_MAX_PENDING_TEXTS = 100
# How long the end of training waits for the last metrics to reach MLflow.
MLFLOW_CLOSE_TIMEOUT_S = 15.0
_UNIGRAM_MAX_TOKENS = 100_000_000

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s by GPU name (vendor data sheets). Longest match first: "H100 PCIe" before
# "H100".
PEAK_FLOPS_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("B200", 2250e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
    ("V100", 125e12),
)


class NonFiniteLossError(RuntimeError):
    """Training diverged: the loss or the gradient norm is NaN or infinite."""


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """The device's peak for MFU: the configured figure, else the GPU's from the table."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine or warmup-stable-decay down to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = config.max_steps - max(1, round(config.decay_fraction * config.max_steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, config.max_steps - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with decoupled decay on matrices (embeddings and projections) only: decaying norm
    gains pulls them towards zero for no benefit. Fused on CUDA (one kernel for all parameters)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=1e-8,
        fused=device.type == "cuda",
    )


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


@dataclass
class Distributed:
    rank: int
    local_rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


def _setup(config: TrainConfig) -> tuple[Distributed, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("pretrain.device is 'cuda' but torch sees no CUDA device")
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=None)
    return Distributed(rank, local_rank, world), device


def _autocast(config: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    dtype = config.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every generator's state, in the form a weights-only ``trainer.pt`` holds."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return checkpoints.portable_rng_state(state)


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(checkpoints.numpy_rng_state(state["numpy"]))
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class _MlflowWriter:
    """Sends a run's metrics and sample texts to MLflow from a background thread.

    Training never waits on the tracking server: a server that is down or slow (MLflow's client
    retries a failed request for minutes by default) only delays this thread. Items queue here
    (at most ``_MLFLOW_MAX_PENDING`` metrics; the oldest go first past that) and are sent every
    ``_MLFLOW_FLUSH_S`` seconds with ``log_batch``; after a failure the next try waits twice as
    long, up to ``_MLFLOW_MAX_BACKOFF_S``, so a server that comes back gets the backlog. The
    first failure is logged once as a warning; nothing is lost, as every metric is also in the
    run's ``metrics.jsonl``. :meth:`close` makes a last attempt and waits at most
    ``MLFLOW_CLOSE_TIMEOUT_S``.
    """

    def __init__(self, tracking_uri: str, run_id: str, local_file: Path) -> None:
        self.uri = tracking_uri
        self.run_id = run_id
        self.local_file = local_file
        self.dropped = 0
        self._client: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._metrics: list[Any] = []
        self._texts: list[tuple[str, str]] = []
        self._in_flight = (0, 0)
        self._failures = 0
        self._warned = False
        self._thread = threading.Thread(
            target=self._run, name="llmflow-mlflow-metrics", daemon=True
        )
        self._thread.start()

    def add_metrics(self, metrics: list[Any]) -> None:
        with self._lock:
            self._metrics.extend(metrics)
            overflow = len(self._metrics) - _MLFLOW_MAX_PENDING
            if overflow > 0:
                del self._metrics[:overflow]
                self.dropped += overflow

    def add_text(self, text: str, artifact_file: str) -> None:
        with self._lock:
            self._texts.append((text, artifact_file))
            del self._texts[:-_MLFLOW_MAX_PENDING_TEXTS]

    def stop(self) -> None:
        """Ask for a last attempt and an exit, without waiting for either."""
        self._stopping = True
        self._wake.set()

    def close(self, timeout: float) -> bool:
        """Send what is left, waiting at most ``timeout`` seconds; whether all of it arrived."""
        self.stop()
        self._thread.join(timeout)
        with self._lock:
            metrics = len(self._metrics) + self._in_flight[0]
            texts = len(self._texts) + self._in_flight[1]
        if self._thread.is_alive() or metrics or texts or self.dropped:
            log.warning(
                "MLflow at %s: %d metric values (and %d dropped from the full queue) and %d"
                " sample texts of run %s were not delivered within %.0f s of the end of training;"
                " every metric is in %s",
                self.uri,
                metrics,
                self.dropped,
                texts,
                self.run_id,
                timeout,
                self.local_file,
            )
            return False
        return True

    def _run(self) -> None:
        delay = _MLFLOW_FLUSH_S
        while True:
            self._wake.wait(delay)
            self._wake.clear()
            stopping = self._stopping
            sent = self._send()
            if stopping:
                return
            delay = (
                _MLFLOW_FLUSH_S
                if sent
                else min(_MLFLOW_MAX_BACKOFF_S, _MLFLOW_FLUSH_S * 2**self._failures)
            )

    def _send(self) -> bool:
        with self._lock:
            metrics, self._metrics = self._metrics, []
            texts, self._texts = self._texts, []
            self._in_flight = (len(metrics), len(texts))
        if not metrics and not texts:
            return True
        done_metrics = done_texts = 0
        try:
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.uri)
            while done_metrics < len(metrics):
                chunk = metrics[done_metrics : done_metrics + 1000]
                self._client.log_batch(self.run_id, metrics=chunk)
                done_metrics += len(chunk)
            for text, artifact_file in texts:
                self._client.log_text(self.run_id, text, artifact_file)
                done_texts += 1
        except Exception as error:  # noqa: BLE001 - whatever MLflow raises, training goes on
            with self._lock:  # back to the front of the queue, for the next attempt
                self._metrics[:0] = metrics[done_metrics:]
                self._texts[:0] = texts[done_texts:]
                self._in_flight = (0, 0)
            self._failures += 1
            if not self._warned:
                self._warned = True
                log.warning(
                    "MLflow at %s is unreachable or refused run %s's metrics (%s); training goes"
                    " on, every metric is written to %s and sending is retried in the"
                    " background (this warning is not repeated)",
                    self.uri,
                    self.run_id,
                    _short(error),
                    self.local_file,
                )
            return False
        with self._lock:
            self._in_flight = (0, 0)
        if self._failures:
            log.info("MLflow at %s reachable again: the queued metrics were sent", self.uri)
        self._failures = 0
        return True


def _short(error: BaseException, limit: int = 300) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[:limit] + "…"


class MetricsSink:
    """Rank 0's record of the run: ``metrics.jsonl`` in the run folder (what tests and a user
    with no MLflow read), written as each step ends, and the MLflow run, sent in the background
    (:class:`_MlflowWriter`) so that a slow or absent tracking server never holds training."""

    def __init__(self, job: TrainJob, resume_step: int) -> None:
        self.path = Path(job.run_dir) / METRICS_FILE
        self._mlflow: _MlflowWriter | None = None
        if job.tracking_uri and job.mlflow_run_id:
            self._mlflow = _MlflowWriter(job.tracking_uri, job.mlflow_run_id, self.path)
            # a run that raises never reaches close(): its writer still sends what it holds and
            # ends once the sink is gone, instead of waking every few seconds for good
            weakref.finalize(self, self._mlflow.stop)
        # Lines past the checkpoint we resume from were written by the interrupted attempt and
        # are about to be written again: drop them, so the file holds each step once.
        if self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        if self._mlflow is not None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            self._mlflow.add_metrics([Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_text(self, text: str, artifact_file: str) -> None:
        if self._mlflow is not None:
            self._mlflow.add_text(text, artifact_file)

    def close(self, timeout: float | None = None) -> bool:
        """Deliver what is queued for MLflow, waiting at most ``timeout`` seconds (default
        ``MLFLOW_CLOSE_TIMEOUT_S``); whether everything arrived (True with no MLflow run)."""
        if self._mlflow is None:
            return True
        return self._mlflow.close(MLFLOW_CLOSE_TIMEOUT_S if timeout is None else timeout)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` rows, in order."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@torch.no_grad()
def evaluate(
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


def _samples(
    model: Decoder, tokenizer: Any, prompts: list[str], tokens: int, chat: bool, seed: int
) -> str:
    """Continuations of the prompts, each started after ``<|eos|>`` as a new document is
    (sampled); or, for a chat model, its greedy reply to each prompt as a user message, up to
    its ``<|end|>``."""
    from llmflow.tasks.train.bpe_tokenizer import special_token_id
    from llmflow.tasks.train.chat_format import encode_chat

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for prompt in prompts:
        if chat:
            ids, _ = encode_chat(tokenizer, [{"role": "user", "content": prompt}], True)
            stop, keep = special_token_id(tokenizer, "<|end|>"), len(ids)
            settings: dict[str, Any] = {"temperature": 0.0}
        else:
            stop = special_token_id(tokenizer, "<|eos|>")
            ids, keep = [stop, *tokenizer.encode(prompt, add_special_tokens=False).ids], 1
            settings = {"temperature": 0.8, "top_k": 50, "generator": generator}
        out = generate(model, torch.tensor([ids], device=device), tokens, eos_id=stop, **settings)
        text = tokenizer.decode(out[0, keep:].tolist(), skip_special_tokens=True)
        parts.append(f"### {prompt!r}\n{text}\n")
    model.train()
    return "\n".join(parts)


def train(job: TrainJob, on_step: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the run described by ``job``; returns rank 0's summary of it."""
    from llmflow.tasks.train.bpe_tokenizer import load_tokenizer, token_byte_lengths

    config = job.config
    parallel, device = _setup(config)
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = run_dir / "checkpoints"
    seq_len = config.seq_len or job.decoder.max_seq_len
    if seq_len > job.decoder.max_seq_len:
        raise ValueError(
            f"{job.kind}.seq_len={seq_len} exceeds the model's max_seq_len="
            f"{job.decoder.max_seq_len}"
        )
    per_micro = config.micro_batch_size * seq_len * parallel.world
    if config.batch_tokens % per_micro:
        raise ValueError(
            f"{job.kind}.batch_tokens={config.batch_tokens} is not a multiple of micro_batch_size"
            f" × seq_len × processes = {config.micro_batch_size} × {seq_len} × {parallel.world}"
            f" = {per_micro}"
        )
    accumulation = config.batch_tokens // per_micro
    global_sequences = config.batch_tokens // seq_len

    tokenizer = load_tokenizer(job.tokenizer_dir)
    token_bytes = torch.zeros(job.decoder.vocab_size, dtype=torch.int64)
    lengths = torch.from_numpy(np.asarray(token_byte_lengths(tokenizer), dtype=np.int64))
    token_bytes[: len(lengths)] = lengths
    token_bytes = token_bytes.to(device)

    chat = job.kind == "sft"
    if chat:
        data: TrainWindows | PackedConversations = PackedConversations(
            job.train_shards[0], seq_len, config.seed
        )
    else:
        train_stream = TokenStream(job.train_shards)
        data = TrainWindows(train_stream, seq_len, config.seed)
    val_batches = eval_batches(job, seq_len, device)

    if not val_batches and parallel.main:
        print(
            "no held-out data: validation loss and bits per byte are not measured"
            f" (raise {'sft' if chat else 'tokenize'}.val_fraction, or add data)",
            flush=True,
        )
    torch.manual_seed(config.seed)
    raw_model = Decoder(job.decoder).to(device)
    optimizer = build_optimizer(raw_model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, config)
    )
    start_step = 0
    latest = checkpoints.latest_checkpoint(checkpoint_dir)
    if latest is not None:
        state = checkpoints.load_checkpoint(latest, map_location=device)
        trainer_state = state["trainer"]
        if trainer_state["global_sequences"] != global_sequences:
            raise ValueError(
                f"checkpoint {latest} was made with {trainer_state['global_sequences']} sequences"
                f" per step, this run has {global_sequences}: start a new run folder"
            )
        raw_model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(trainer_state["scheduler"])
        start_step = trainer_state["step"]
        rng = trainer_state["rng"]
        _set_rng_state(rng[parallel.rank] if parallel.rank < len(rng) else rng[0], device)
    elif job.init_checkpoint is not None:  # a new SFT run starts from the pretrained weights
        initial = checkpoints.load_checkpoint(Path(job.init_checkpoint), map_location=device)
        if initial["decoder"] != job.decoder.model_dump():
            raise ValueError(
                f"checkpoint {job.init_checkpoint} is a different model shape than the run's"
            )
        raw_model.load_state_dict(initial["model"])

    # what the steps run: the decoder, compiled and/or wrapped for DDP as configured
    model: torch.nn.Module = raw_model
    if config.compile:
        # typed as returning a plain callable; for a module it is a (compiled) module
        model = cast(torch.nn.Module, torch.compile(model))
    ddp: DistributedDataParallel | None = None
    if parallel.world > 1:
        model = ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = lambda: _autocast(config, device)  # noqa: E731
    sink = MetricsSink(job, start_step) if parallel.main else None
    flops_per_token = raw_model.flops_per_token(seq_len)
    peak = peak_flops(device, config.peak_flops)
    # only rank 0 logs and reports it; the other ranks would each read the whole split for it
    entropy = math.nan
    if parallel.main and not chat:
        entropy = unigram_entropy(train_stream, job.decoder.vocab_size)
    if sink is not None and start_step == 0:
        counts = {"train_tokens": data.tokens, "parameters": raw_model.num_parameters()}
        sink.log(0, counts | ({} if chat else {"unigram_entropy": entropy}))

    def save(step: int) -> None:
        rng: list[dict[str, Any] | None] = [_rng_state(device)]
        if parallel.world > 1:
            rng = [None] * parallel.world
            dist.all_gather_object(rng, _rng_state(device))
        if parallel.main:
            checkpoints.save_checkpoint(
                checkpoint_dir,
                step,
                {k: v.detach().cpu() for k, v in raw_model.state_dict().items()},
                optimizer.state_dict(),
                {
                    "step": step,
                    "scheduler": scheduler.state_dict(),
                    "rng": rng,
                    "global_sequences": global_sequences,
                    "sequences_consumed": step * global_sequences,
                    "seq_len": seq_len,
                },
                job.decoder.model_dump(),
                config.keep_checkpoints,
            )

    def run_eval(step: int) -> dict[str, float]:
        """Held-out loss and bits per byte (when there is a held-out split), and samples."""
        metrics: dict[str, float] = {}
        if val_batches:
            loss, bpb = evaluate(model, val_batches, token_bytes, parallel, autocast)
            metrics = {"val_loss": loss, "val_bpb": bpb}
        if sink is not None:
            text = _samples(
                raw_model, tokenizer, config.sample_prompts, config.sample_tokens, chat, step
            )
            sink.log_text(text, f"samples/{checkpoints.step_name(step)}.txt")
            (run_dir / "samples").mkdir(exist_ok=True)
            (run_dir / "samples" / f"{checkpoints.step_name(step)}.txt").write_text(text)
        return metrics

    last: dict[str, float] = {}
    step = start_step
    model.train()
    tick = time.perf_counter()
    for step in range(start_step, config.max_steps):
        loss_sum = torch.zeros((), device=device)
        # every rank knows the whole step's count of trained targets (the data is a pure
        # function of the step), so each scales its sum by it; DDP's mean over ranks is undone
        # by the factor world
        step_targets = max(1, data.targets(step * global_sequences, global_sequences))
        for micro in range(accumulation):
            first = step * global_sequences + (micro * parallel.world + parallel.rank) * (
                config.micro_batch_size
            )
            batch = data.batch(first, config.micro_batch_size, device)
            sync = parallel.world == 1 or micro == accumulation - 1
            context = contextlib.nullcontext() if sync or ddp is None else ddp.no_sync()
            with context:
                with autocast():
                    logits = batch.logits(model)
                loss = F.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]),
                    batch.y.reshape(-1),
                    reduction="sum",
                )
                (loss * (parallel.world / step_targets)).backward()
            loss_sum += loss.detach()
        if config.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), config.grad_clip)
        else:
            grads = [p.grad.norm() for p in raw_model.parameters() if p.grad is not None]
            grad_norm = torch.stack(grads).norm()
        step_loss = parallel.all_sum(loss_sum) / step_targets
        loss_value, norm_value = float(step_loss), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            latest = checkpoints.latest_checkpoint(checkpoint_dir)
            raise NonFiniteLossError(
                f"step {step + 1}: training loss {loss_value}, gradient norm {norm_value}; the run"
                f" diverged and was stopped before the update. Lower {job.kind}.lr, lengthen"
                f" {job.kind}.warmup_steps or set pretrain.model.qk_norm=true, then re-run (it"
                f" resumes from {latest or 'the start'})."
            )
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        tokens_per_s = config.batch_tokens / (now - tick)
        tick = now
        metrics = {
            "loss": loss_value,
            "lr": lr,
            "grad_norm": norm_value,
            "tokens_per_s": tokens_per_s,
            "tokens_seen": done * config.batch_tokens,
            "model_tflops_per_s": tokens_per_s * flops_per_token / 1e12,
        }
        if peak:
            metrics["mfu"] = tokens_per_s * flops_per_token / peak
        if done % config.eval_interval == 0 or done == config.max_steps:
            metrics |= run_eval(done)
            tick = time.perf_counter()  # evaluation time is not training throughput
        if sink is not None and (
            done % config.log_interval == 0 or done == config.max_steps or "val_loss" in metrics
        ):
            sink.log(done, metrics)
        last = metrics
        if parallel.main and (done % config.eval_interval == 0 or done == config.max_steps):
            # A line per evaluation: the log (Prefect's, torchrun's output) says how the run goes.
            line = f"{job.kind} step {done}/{config.max_steps}: loss {loss_value:.4f}"
            if "val_loss" in metrics:
                line += f", val loss {metrics['val_loss']:.4f} ({metrics['val_bpb']:.3f} bits/byte)"
            print(f"{line}, {tokens_per_s:,.0f} tokens/s", flush=True)
        if done % config.checkpoint_interval == 0 or done == config.max_steps:
            save(done)
            tick = time.perf_counter()
        if parallel.main and on_step is not None:
            on_step(done, config.max_steps)
    if start_step >= config.max_steps:  # finished before, stopped before its export: re-measure
        done = start_step
        last = run_eval(done)
    result = {
        "steps": done,
        "resumed_from": start_step,
        "final_loss": last.get("loss"),
        "val_loss": last.get("val_loss"),
        "val_bpb": last.get("val_bpb"),
        "unigram_entropy": None if chat else entropy,
        "train_tokens": data.tokens,
        "val_batches": len(val_batches),
        "parameters": raw_model.num_parameters(),
        "world_size": parallel.world,
        "device": str(device),
        "checkpoint": str(checkpoints.latest_checkpoint(checkpoint_dir)),
    }
    if sink is not None:
        sink.close()
        (run_dir / RESULT_FILE).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    if parallel.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _print_progress(step: int, total: int) -> None:
    print(f"{PROGRESS_PREFIX}{step} {total}", flush=True)


def main(argv: Iterator[str] | list[str] | None = None) -> None:
    """torchrun's entry point: ``python -m llmflow.tasks.train.trainer <job.json>``."""
    args = list(argv if argv is not None else sys.argv[1:])
    if len(args) != 1:
        raise SystemExit("usage: python -m llmflow.tasks.train.trainer JOB.json")
    job = TrainJob.model_validate_json(Path(args[0]).read_text())
    train(job, on_step=_print_progress)


if __name__ == "__main__":
    main()
