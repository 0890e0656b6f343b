"""A training run's measurements and rank 0's record of them: throughput and MFU
(:class:`Stopwatch`, :func:`peak_flops`), ``metrics.jsonl`` in the run folder, and the MLflow run.

The file is written as each logged step ends and is what tests, the pipeline's report and a user
without MLflow read (:func:`read_metrics`). MLflow gets the same values from a background thread
(:class:`_MlflowWriter`), so that a tracking server that is slow or down never holds training up.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from llmflow.tasks.train.train_config import TrainJob

METRICS_FILE = "metrics.jsonl"
_MLFLOW_FLUSH_S = 2.0
_MLFLOW_MAX_BACKOFF_S = 60.0
_MLFLOW_MAX_PENDING = 200_000
_MLFLOW_MAX_PENDING_TEXTS = 100
# How long the end of training waits for the last metrics to reach MLflow.
MLFLOW_CLOSE_TIMEOUT_S = 15.0

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


class Stopwatch:
    """Training time since the last logged step, evaluations and saves left out. The device is
    waited for only when the time is read or paused (a log, an evaluation, a save), not every
    step: tokens per second are those of the steps since the last logged one."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self.steps = 0
        self.start = time.perf_counter()

    def pause(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self.start

    def resume(self) -> None:
        self.start = time.perf_counter()

    def lap(self) -> tuple[float, int]:
        """(seconds, steps) since the last lap, and a new lap begun."""
        self.pause()
        lap = self.seconds, self.steps
        self.seconds, self.steps = 0.0, 0
        self.resume()
        return lap


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
