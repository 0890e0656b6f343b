"""MLflow bookkeeping for a pipeline run: one parent run, one nested child run per stage.

Everything goes through an explicit ``MlflowClient`` and explicit run ids, never MLflow's fluent
"active run": that is kept per thread, and Prefect runs tasks on worker threads, where a nested
run silently comes out top-level (../shared/STACK.md).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from prefect.runtime import flow_run

from llmflow.tasks.core import progress
from llmflow.tasks.ingest.crawl_config import redact_url

_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on one param value
_BATCH = 100
DATA_ROOT_TAG = "llmflow.data_root"


def default_tracking_uri(workdir: str) -> str:
    return f"sqlite:///{Path(workdir).absolute() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str | None, workdir: str) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(workdir)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → ``{"crawl.max_pages": "200", …}`` as MLflow params.

    URLs lose their userinfo on the way (a seed's ``user:password@``, an MLflow or object-store
    URI with credentials): params are shown to everyone who can open the experiment.
    """
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list):
            items = [redact_url(v) if isinstance(v, str) else v for v in value]
            flat[name] = str(items)[:_PARAM_VALUE_LIMIT]
        else:
            text = redact_url(value) if isinstance(value, str) else str(value)
            flat[name] = text[:_PARAM_VALUE_LIMIT]
    return flat


class PipelineTracker:
    """The MLflow side of one flow run."""

    def __init__(
        self, tracking_uri: str, experiment: str, workdir: str, data_root: str | None = None
    ) -> None:
        self.tracking_uri = tracking_uri
        # Every run this tracker starts is tagged with the dataset root it writes, so that the
        # next run holding that root's lock can tell which RUNNING runs were left by a dead one.
        self.root_tag = {DATA_ROOT_TAG: data_root} if data_root else {}
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            # With the default SQLite store, artifacts sit beside it in the workdir rather than
            # in ./mlruns of whatever directory the command was started from.
            location = None
            if tracking_uri == default_tracking_uri(workdir):
                location = (Path(workdir).absolute() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=location
            )
        self.parent_run_id: str | None = None

    def close_abandoned_runs(self) -> list[str]:
        """Mark KILLED the runs of this dataset root that a dead run left RUNNING; their ids.

        Call it only while holding the root's lock (the pipeline flow does): no live run can
        then be writing to that root, so any of its runs still RUNNING belonged to a process
        that was killed (SIGKILL, power loss) before it could finish them. Without this they
        would show as running forever, beside the successful re-run.
        """
        if not self.root_tag:
            return []
        root = self.root_tag[DATA_ROOT_TAG]
        abandoned: list[str] = []
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id],
                filter_string="attributes.status = 'RUNNING'",
                max_results=1000,
                page_token=token,
            )
            abandoned += [r.info.run_id for r in page if r.data.tags.get(DATA_ROOT_TAG) == root]
            token = page.token
            if not token:
                break
        for run_id in abandoned:
            self.client.set_terminated(run_id, status="KILLED")
        return abandoned

    def start_parent(self, run_name: str, tags: dict[str, str], params: dict[str, str]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=run_name,
            tags=tags | self.root_tag | {MLFLOW_RUN_NAME: run_name},
        )
        self.parent_run_id = run.info.run_id
        self.log(self.parent_run_id, params=params)
        return self.parent_run_id

    def start_child(self, stage: str, params: dict[str, str], tags: dict[str, str]) -> str:
        assert self.parent_run_id is not None, "start the parent run first"
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage,
            tags=tags
            | self.root_tag
            | {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "llmflow.stage": stage},
        )
        self.log(run.info.run_id, params=params)
        return run.info.run_id

    def log(
        self,
        run_id: str,
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        """Log in batches; ``step`` orders repeated values of a metric (live counts per unit)."""
        now = int(time.time() * 1000)
        param_list = [Param(k, v) for k, v in (params or {}).items()]
        metric_list = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
        tag_list = [RunTag(k, v) for k, v in (tags or {}).items()]
        for start in range(0, max(len(param_list), len(metric_list), len(tag_list), 1), _BATCH):
            self.client.log_batch(
                run_id,
                metrics=metric_list[start : start + _BATCH],
                params=param_list[start : start + _BATCH],
                tags=tag_list[start : start + _BATCH],
            )

    def log_dict(self, run_id: str, data: Any, artifact_file: str) -> None:
        self.client.log_dict(run_id, data, artifact_file)

    def log_figure(self, run_id: str, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as a PNG artifact, then closed (pyplot keeps every open figure)."""
        from llmflow.tasks.core.run_charts import close

        try:
            self.client.log_figure(run_id, figure, artifact_file)
        finally:
            close(figure)

    def log_table(self, run_id: str, rows: list[dict[str, Any]], artifact_file: str) -> None:
        """Rows of equal keys as an MLflow table artifact (the run page shows it as a table)."""
        columns = {key: [row[key] for row in rows] for key in rows[0]} if rows else {}
        self.client.log_table(run_id, data=columns, artifact_file=artifact_file)

    def log_artifacts(self, run_id: str, local_path: str | Path, artifact_path: str) -> None:
        """A file or a whole folder (a checkpoint, an export) under ``artifact_path``."""
        local = Path(local_path)
        if local.is_dir():
            self.client.log_artifacts(run_id, str(local), artifact_path)
        else:
            self.client.log_artifact(run_id, str(local), artifact_path)

    def log_input(self, run_id: str, name: str, uri: str, digest: str, context: str) -> None:
        """A dataset the run read, in MLflow's dataset lineage (the run's Inputs), identified by
        its manifest's hash: two runs that read the same bytes show the same digest."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        with warnings.catch_warnings():  # a local path matches two equivalent source types
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(uri)
        # Dataset.profile is abstract in name only (no ABCMeta): mlflow builds MetaDatasets too
        dataset = MetaDataset(source=source, name=name, digest=digest[:36])  # type: ignore[abstract]
        tag = InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)
        self.client.log_inputs(
            run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=[tag])]
        )

    def register_model(
        self, name: str, source_run_id: str, artifact_path: str, tags: dict[str, str], key: str
    ) -> str:
        """A version of ``name`` in the model registry for the model a run logged, once per
        ``key`` (a re-run that evaluates the same model finds its version instead of adding
        one). Returns the version number."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        for version in self.client.search_model_versions(f"name = '{name}'"):
            if version.tags.get("llmflow.key") == key:
                return version.version
        version = self.client.create_model_version(
            name=name,
            source=f"runs:/{source_run_id}/{artifact_path}",
            run_id=source_run_id,
            tags=tags | {"llmflow.key": key},
        )
        return version.version

    def run_url(self, run_id: str) -> str | None:
        """The run's page when MLflow is a server (``http(s)://`` tracking URI), else None."""
        if not self.tracking_uri.startswith(("http://", "https://")):
            return None
        return f"{self.tracking_uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    @contextmanager
    def stage_run(
        self, stage: str, params: dict[str, Any], tags: dict[str, str]
    ) -> Iterator[StageRun]:
        """A stage's child run, the skeleton every stage shares: started with its config as
        params (flattened, URLs redacted), marked FAILED if the block raises (Ctrl-C included)
        and FINISHED when it ends."""
        run = StageRun(self, self.start_child(stage, flatten(params), tags))
        try:
            yield run
        except BaseException:
            self.finish(run.run_id, ok=False)
            raise
        self.finish(run.run_id, ok=True)


@dataclass
class StageRun:
    """One stage's MLflow run: the tracker's logging calls bound to the run's id (what
    :class:`~llmflow.tasks.core.graph.RunRecorder` asks of it)."""

    tracker: PipelineTracker
    run_id: str

    @property
    def tracking_uri(self) -> str:
        return self.tracker.tracking_uri

    def log(
        self,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        self.tracker.log(self.run_id, metrics=metrics, tags=tags, step=step)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.tracker.log_dict(self.run_id, data, artifact_file)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        self.tracker.log_table(self.run_id, rows, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.tracker.log_figure(self.run_id, figure, artifact_file)

    def log_artifacts(self, local_path: str | Path, artifact_path: str) -> None:
        self.tracker.log_artifacts(self.run_id, local_path, artifact_path)

    def log_input(self, name: str, uri: str, digest: str, context: str) -> None:
        self.tracker.log_input(self.run_id, name, uri, digest, context)

    def register_model(
        self, name: str, source_run_id: str, artifact_path: str, tags: dict[str, str], key: str
    ) -> str:
        return self.tracker.register_model(name, source_run_id, artifact_path, tags, key)


def link_flow_run(tracker: PipelineTracker, run_id: str, attempts: int = 4) -> bool:
    """Labels on the Prefect flow run naming its MLflow parent run (and the run's page when
    MLflow is a server): the other half of the MLflow run's ``prefect.flow_run_*`` tags.

    A convenience, so it never ends a run: a busy API (a 503 past the client's own retries, a
    dropped connection) is tried again a few times, then given up with a warning; the MLflow run
    still names the flow run. Returns whether the labels were written.
    """
    from prefect.client.orchestration import get_client

    labels: dict[str, bool | int | float | str] = {
        "mlflow.run_id": run_id,
        "mlflow.experiment_id": tracker.experiment_id,
    }
    url = tracker.run_url(run_id)
    if url is not None:
        labels["mlflow.run_url"] = url
    for attempt in range(1, attempts + 1):
        try:
            with get_client(sync_client=True) as client:
                client.update_flow_run_labels(flow_run.id, labels)
            return True
        except (httpx.HTTPError, OSError) as error:
            if attempt == attempts:
                progress.run_logger().warning(
                    "could not label the flow run with its MLflow run %s after %d attempts"
                    " (%s); the run goes on, and its MLflow run names the flow run",
                    run_id,
                    attempts,
                    error,
                )
                return False
            time.sleep(2.0 * attempt)
    return False
