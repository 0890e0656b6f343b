"""pretrain: token shards in, a trained checkpoint, its curves and a Hugging Face export out.

The loop itself is :mod:`llmflow.tasks.train.trainer`. This module decides where a run lives and
whether it is already done, starts the loop (in this process for one device, under ``torchrun``
as a subprocess for several, streaming its output and progress), and records the outcome: the
final checkpoint, the tokenizer and a ``LlamaForCausalLM`` export as MLflow artifacts.

A run's folder is named by its key: the hash of the code version, the config fields that change
the result, the token dataset's manifest and the tokenizer. The same key finds the same folder,
so a re-run after an interruption resumes from the newest checkpoint there, and a re-run after
completion does nothing; a changed learning rate or dataset starts a new folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from llmflow.models.decoder import Decoder, DecoderConfig
from llmflow.models.hf_export import export_llama
from llmflow.tasks.core import run_charts, shards
from llmflow.tasks.core.graph import StageContext, StepReport
from llmflow.tasks.core.progress import StepProgress, run_logger
from llmflow.tasks.core.shards import manifest_sha256
from llmflow.tasks.core.stage import StageSpec
from llmflow.tasks.core.steps import run_step, step_key
from llmflow.tasks.train import checkpoints
from llmflow.tasks.train.bpe_tokenizer import HF_TOKENIZER_FILES
from llmflow.tasks.train.planner import Plan, plan_from_manifest
from llmflow.tasks.train.tokenize import token_shard_paths
from llmflow.tasks.train.train_config import PretrainConfig, TrainConfig, TrainJob
from llmflow.tasks.train.train_metrics import read_metrics

STAGE = StageSpec(name="pretrain", version="1", libraries=("torch",))
HF_DIR = "hf"
_OUTPUT_TAIL = 60


def local_dir(path: str) -> Path:
    return shards.local_path(path, "pretraining writes checkpoints with torch.save")


def run_key(config: PretrainConfig, tokens_sha256: str, tokenizer_sha256: str) -> str:
    """The run's key: the stage's key over the token dataset and the tokenizer."""
    return step_key(STAGE, config, {"tokens": tokens_sha256, "tokenizer": tokenizer_sha256})


def auto_plan(config: PretrainConfig, tokens_manifest: dict[str, Any]) -> Plan | None:
    """``preset: auto``: the run planner's plan for the tokenize manifest's training tokens and
    vocabulary and ``config.plan`` (None for a named preset). Overrides in ``config.model`` are
    kept (``num_layers`` fixes the depth), and so is a set ``seq_len``."""
    if config.preset != "auto":
        return None
    return plan_from_manifest(
        tokens_manifest, config.plan, seq_len=config.seq_len, depth=config.model.get("num_layers")
    )


def apply_plan(config: PretrainConfig, plan: Plan | None) -> PretrainConfig:
    """The config with the plan's model shape, batch and steps (itself without a plan)."""
    if plan is None:
        return config
    update: dict[str, Any] = plan.pretrain_fields() | {"model": plan.model | config.model}
    if plan.fsdp:
        update["parallelism"] = "fsdp"
    if plan.activation_checkpointing:
        update["activation_checkpointing"] = True
    if plan.hardware != "cpu" and config.nproc_per_node is None:
        update["nproc_per_node"] = plan.processes
    return PretrainConfig.model_validate(config.model_dump() | update)


def plan_job(
    config: PretrainConfig,
    tokenize_dir: str,
    tokenizer_dir: str,
    stage_dir: str,
    tracking_uri: str | None = None,
    mlflow_run_id: str | None = None,
) -> tuple[TrainJob, str]:
    """The run's job description and key, from the token dataset and the tokenizer; under
    ``preset: auto`` the planner's model, batch and steps are applied first (so the key is the
    planned config's)."""
    tokens_manifest = shards.read_manifest(tokenize_dir)
    config = apply_plan(config, auto_plan(config, tokens_manifest))
    tokenizer_manifest = shards.read_json(shards.join(tokenizer_dir, "manifest.json"))
    key = run_key(config, manifest_sha256(tokenize_dir), tokenizer_manifest["tokenizer_sha256"])
    run_dir = local_dir(stage_dir) / "runs" / key[:16]
    decoder = config.decoder_config(tokens_manifest["tokenizer"]["vocab_size"])
    job = TrainJob(
        config=config,
        decoder=decoder,
        train_shards=[str(p) for p in token_shard_paths(tokenize_dir, "train")],
        val_shards=[str(p) for p in token_shard_paths(tokenize_dir, "val")],
        tokenizer_dir=str(local_dir(tokenizer_dir)),
        run_dir=str(run_dir),
        tracking_uri=tracking_uri,
        mlflow_run_id=mlflow_run_id,
    )
    return job, key


def processes(config: TrainConfig) -> int:
    """Training processes: as configured, else one per visible GPU, else one."""
    if config.nproc_per_node is not None:
        return config.nproc_per_node
    if config.device != "cpu" and torch.cuda.is_available():
        return max(1, torch.cuda.device_count())
    return 1


def launch(job: TrainJob, nproc: int, on_step: Callable[[int, int], None] | None = None) -> dict:
    """Train ``job``: in this process for one, under torchrun for several.

    torchrun runs as a subprocess of this task, so the Prefect worker that started it stays the
    one place that sees its exit; rank 0's progress lines move this task's progress bar and every
    other line is passed on to the log, as it arrives.
    """
    run_dir = Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # always written: it is what torchrun's workers read, here or started by hand on other nodes
    job_path = run_dir / "job.json"
    shards.write_bytes_atomic(str(job_path), job.model_dump_json(indent=2).encode())
    if nproc == 1:
        from llmflow.tasks.train.trainer import train

        return train(job, on_step=on_step)
    from llmflow.tasks.train.trainer import PROGRESS_PREFIX, RESULT_FILE

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "llmflow.tasks.train.trainer",
        str(job_path),
    ]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=_OUTPUT_TAIL)
    logger = run_logger()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith(PROGRESS_PREFIX):
                step, total = (int(v) for v in line.removeprefix(PROGRESS_PREFIX).split())
                if on_step is not None:
                    on_step(step, total)
                continue
            tail.append(line)
            logger.info("%s", line)
        code = proc.wait()
    if code != 0:
        output = "\n".join(tail)
        raise RuntimeError(f"torchrun with {nproc} processes exited with code {code}:\n{output}")
    return json.loads((run_dir / RESULT_FILE).read_text())


def load_model(checkpoint: Path) -> Decoder:
    """A checkpoint's weights in a :class:`Decoder` on the CPU (for export and evaluation)."""
    state = checkpoints.load_checkpoint(checkpoint)
    model = Decoder(DecoderConfig.model_validate(state["decoder"]))
    model.load_state_dict(state["model"])
    return model.eval()


def export_hf(checkpoint: Path, tokenizer_dir: str, out_dir: Path) -> Path:
    """The checkpoint as a ``LlamaForCausalLM`` folder with the tokenizer beside it: what
    ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export_llama(load_model(checkpoint), tmp)
    for name in HF_TOKENIZER_FILES:
        source = Path(tokenizer_dir) / name
        if source.exists():
            shutil.copy2(source, tmp / name)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def trained_outputs(
    stage_dir: str, job: TrainJob, result: dict[str, Any], extra: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, Any]]:
    """A finished run's declared files (the exported model's, so a re-run skips only while they
    are intact) and its manifest's fields, for pretraining or SFT."""
    run_dir = Path(job.run_dir).relative_to(local_dir(stage_dir))
    export = Path(job.run_dir) / HF_DIR
    outputs = [str(run_dir / HF_DIR / f.name) for f in sorted(export.iterdir()) if f.is_file()]
    fields = {
        "mlflow_run_id": job.mlflow_run_id,  # the run that holds the checkpoint and the export
        "config": job.config.model_dump(mode="json"),
        "config_hash": job.config.output_hash(),
        "decoder": job.decoder.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "result": {k: v for k, v in result.items() if k not in ("device", "resumed_from")},
        **(extra or {}),
    }
    return outputs, fields


def manifest_run_dir(stage_dir: str, manifest: dict[str, Any]) -> Path:
    """The run folder a pretraining or SFT manifest names, kept inside the stage's folder.

    The manifest stores it relative to the stage folder (:func:`trained_outputs`); a value that is
    absolute or climbs out with ``..`` is refused with an error naming the manifest, so a
    tampered manifest cannot point the export, SFT or evaluation at files elsewhere.
    """
    return checkpoints.resolve_inside(
        local_dir(stage_dir),
        manifest.get("run_dir"),
        shards.join(stage_dir, shards.MANIFEST_NAME),
        "run_dir",
    )


@task(name="pretrain", cache_policy=NO_CACHE, persist_result=False)
def pretrain_task(job: TrainJob, nproc: int) -> dict[str, Any]:
    """Train with a progress bar and a Prefect progress artifact counting optimizer steps."""
    total = job.config.max_steps
    with StepProgress("pretrain-steps", "pretrain: optimizer steps", total) as progress:

        def on_step(step: int, _total: int) -> None:
            progress.advance(step - progress.done)

        return launch(job, nproc, on_step)


@dataclass
class TrainingRun:
    """One training run as a stage records it; pretraining and SFT differ in these, not in the
    bookkeeping of :func:`record_training`.

    ``data_record`` (metrics, tags) describes the training data and is logged before training
    starts; ``data_input`` (name, URI, digest) is a training input that is no pipeline stage
    (SFT's conversations); ``extra`` goes into the manifest.
    """

    job: TrainJob
    key: str
    spec: StageSpec
    train: Any  # the Prefect task: (job, nproc) -> result
    params: dict[str, Any]
    dataset: str
    extra: dict[str, Any] | None = None
    data_input: tuple[str, str, str] | None = None
    data_record: tuple[dict[str, float], dict[str, str]] = field(default_factory=lambda: ({}, {}))
    artifacts: dict[str, Any] = field(default_factory=dict)  # JSON artifacts: file name -> data


def record_training(ctx: StageContext, run: TrainingRun) -> tuple[dict[str, Any], str, bool]:
    """Train (or resume, or skip) one run; record its curves, checkpoint and export in MLflow.

    Returns the run's manifest, its MLflow run id and whether it was skipped.
    """
    job = run.job
    params = run.params | {"decoder": job.decoder.model_dump(mode="json")}
    tags = {
        "llmflow.code_version": run.spec.code_version(),
        "llmflow.dataset": run.dataset,
        "llmflow.run_dir": job.run_dir,
    } | ({"llmflow.init_checkpoint": job.init_checkpoint} if job.init_checkpoint else {})
    with ctx.start_run(params, tags) as mlflow_run:
        if run.data_input is not None:
            mlflow_run.log_input(*run.data_input, "training")
        if any(run.data_record):
            mlflow_run.log(metrics=run.data_record[0], tags=run.data_record[1])
        for artifact_file, data in run.artifacts.items():
            mlflow_run.log_dict(data, artifact_file)

        def train_and_export() -> tuple[list[str], dict[str, Any]]:
            trained = job.model_copy(
                update={"tracking_uri": mlflow_run.tracking_uri, "mlflow_run_id": mlflow_run.run_id}
            )
            result = run.train(trained, processes(trained.config))
            run_dir = Path(trained.run_dir)
            checkpoint = Path(result["checkpoint"])
            export = export_hf(checkpoint, trained.tokenizer_dir, run_dir / HF_DIR)
            mlflow_run.log_artifacts(checkpoint, "checkpoint")
            mlflow_run.log_artifacts(export, "hf_model")
            for file in HF_TOKENIZER_FILES:
                mlflow_run.log_artifacts(Path(trained.tokenizer_dir) / file, "tokenizer")
            mlflow_run.log_artifacts(run_dir / "metrics.jsonl", "")
            curves = run_charts.training_curves(
                read_metrics(run_dir), f"{ctx.name}: {result['steps']} steps"
            )
            if curves is not None:
                mlflow_run.log_figure(curves, "charts/training_curves.png")
            return trained_outputs(ctx.dir, trained, result, run.extra)

        manifest, skipped = run_step(ctx.dir, run.spec, run.key, train_and_export)
        manifest_run_dir(ctx.dir, manifest)  # a tampered run_dir is refused before it is read
        result = manifest["result"]
        final = {k: result[k] for k in ("val_loss", "val_bpb", "unigram_entropy") if result.get(k)}
        mlflow_run.log(
            metrics={f"final_{k}": v for k, v in final.items()}
            | {"units": 1, "units_skipped": int(skipped)},
            step=result["steps"],
        )
        mlflow_run.log_dict(manifest, "manifest.json")
    return manifest, mlflow_run.run_id, skipped


def loss_summary(result: dict[str, Any]) -> str:
    """A training result in one line: steps, size and the held-out loss."""
    summary = f"{result['steps']} steps, {result['parameters']:,} parameters"
    if result.get("val_loss") is not None:
        summary += (
            f"; val loss {result['val_loss']:.3f} nats/token ({result['val_bpb']:.3f} bits/byte)"
        )
    return summary


def pretrain_step(ctx: StageContext) -> StepReport:
    """The pretrain stage: train (or resume, or skip) on the token shards, then export."""
    config: PretrainConfig = ctx.settings
    tokens_dir, tokenizer_dir = ctx.stage_dir("tokenize"), ctx.stage_dir("tokenizer")
    job, key = plan_job(config, tokens_dir, tokenizer_dir, ctx.dir)
    plan = auto_plan(config, shards.read_manifest(tokens_dir))
    planned = {} if plan is None else {"plan": plan.model_dump(mode="json") | {"text": plan.text()}}
    training = TrainingRun(
        job,
        key,
        STAGE,
        pretrain_task,
        job.config.model_dump(mode="json"),  # preset auto: the plan's choices applied
        tokens_dir,
        extra=planned or None,
        artifacts={"plan.json": planned["plan"]} if planned else {},
    )
    manifest, run_id, skipped = record_training(ctx, training)
    result = manifest["result"]
    tokens = shards.read_manifest(tokens_dir)
    summary = loss_summary(result)
    if result.get("val_loss") is not None:
        summary += f" vs unigram entropy {result['unigram_entropy']:.3f}"
    export = manifest_run_dir(ctx.dir, manifest) / HF_DIR
    return StepReport(
        run_id=run_id,
        skipped=skipped,
        table={
            "steps": result["steps"],
            "parameters": result["parameters"],
            "training tokens": result["train_tokens"],
            "validation loss (nats/token)": result.get("val_loss"),
            "validation bits per byte": result.get("val_bpb"),
            "unigram entropy (nats/token)": result["unigram_entropy"],
            "checkpoint": result["checkpoint"],
        },
        docs_in=tokens["counts"]["kept"],
        kept=tokens["counts"]["kept"],
        bytes=(export / "model.safetensors").stat().st_size,
        summary=f"{summary}; export {export}",
    )
