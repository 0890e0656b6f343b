"""MLflow bookkeeping for a pipeline run: one parent run, one nested child run per stage.

Everything goes through an explicit ``MlflowClient`` and explicit run ids, never MLflow's fluent
"active run": that is kept per thread, and Prefect runs tasks on worker threads, where a nested
run silently comes out top-level (../shared/STACK.md).
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from prefect.runtime import flow_run
from prefect.settings import PREFECT_UI_URL

from llmflow.tasks.core import progress
from llmflow.tasks.ingest.crawl_config import redact_url

_PARAM_VALUE_LIMIT = 6000  # MLflow's limit on one param value
_BATCH = 100
DATA_ROOT_TAG = "llmflow.data_root"
# MLflow 3's UI opens an experiment by its kind: without this tag (or with "genai_development")
# on the GenAI overview (Traces, "No data available"), the runs behind a toggle; with it, on
# the runs table (the tag's key and values are the UI's own: mlflow/server/js, experimentKind).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
# MLflow 3.18's UI goes further: it opens every experiment by a workflow type of its own
# ("GenAI" unless the address says otherwise or the user picked "Model training" in that
# browser), whatever the tag says; so every MLflow address llmflow gives carries this.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# Every stage run logs how many units of work it had and how many it found already done: a run
# whose every unit was skipped repeats an earlier one and is not recorded again (StageRun).
UNITS, UNITS_SKIPPED = "units", "units_skipped"
# A stage run's MLflow run opens when the stage first needs its id, or once it has worked this
# long (a stage that only finds its work done takes less), so that a long one shows as running.
OPEN_AFTER_S = 30.0


def mlflow_page(base_url: str, experiment_id: str, run_id: str | None = None) -> str:
    """The address of an experiment's page (its runs table), or of a run's, in the MLflow UI at
    ``base_url``, in MLflow's model-training view (:data:`MODEL_TRAINING_VIEW`)."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{base_url.rstrip('/')}/{path}?{MODEL_TRAINING_VIEW}"


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
            if EXPERIMENT_KIND_TAG not in found.tags:  # made before llmflow set it, or by hand
                self.client.set_experiment_tag(
                    self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT
                )
        else:
            # With the default SQLite store, artifacts sit beside it in the workdir rather than
            # in ./mlruns of whatever directory the command was started from.
            location = None
            if tracking_uri == default_tracking_uri(workdir):
                location = (Path(workdir).absolute() / "mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(
                experiment,
                artifact_location=location,
                tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT},
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

    def child_tags(self, stage: str, tags: dict[str, str]) -> dict[str, str]:
        """The tags a stage's run is created with: its own, the data root, parent and stage."""
        assert self.parent_run_id is not None, "start the parent run first"
        return (
            tags
            | self.root_tag
            | {MLFLOW_PARENT_RUN_ID: self.parent_run_id, "llmflow.stage": stage}
        )

    def start_child(
        self,
        stage: str,
        params: dict[str, str],
        tags: dict[str, str],
        start_time: int | None = None,
    ) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=stage,
            start_time=start_time,
            tags=self.child_tags(stage, tags),
        )
        self.log(run.info.run_id, params=params)
        return run.info.run_id

    def find_repeat(
        self, stage: str, params: dict[str, str], tags: dict[str, str], but: str | None = None
    ) -> str | None:
        """The newest finished run of ``stage`` on this data root with these params and (at
        least) these tags, other than ``but``: the run that recorded what a stage that found
        all its work done would record again. None when there is none."""
        own = {k: v for k, v in self.child_tags(stage, tags).items() if not k.startswith("mlflow.")}
        query = f"tags.`llmflow.stage` = '{stage}' and attributes.status = 'FINISHED'"
        root = self.root_tag.get(DATA_ROOT_TAG)
        if root and "'" not in root:  # a quote would end MLflow's string; compared below anyway
            query += f" and tags.`{DATA_ROOT_TAG}` = '{root}'"
        candidates = self.client.search_runs(
            [self.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=200
        )
        for run in candidates:
            same_tags = all(run.data.tags.get(k) == v for k, v in own.items())
            if run.info.run_id != but and same_tags and run.data.params == params:
                return run.info.run_id
        return None

    def log(
        self,
        run_id: str,
        params: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
        timestamp: int | None = None,
    ) -> None:
        """Log in batches; ``step`` orders repeated values of a metric (live counts per unit).

        MLflow draws a metric whose last value has step 0 as a bar (one per run) and one with a
        step of 1 or more as a line: a value logged once belongs at step 0, a line of one point
        is what a summary at another step looks like.
        """
        now = timestamp or int(time.time() * 1000)
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
        return mlflow_page(self.tracking_uri, self.experiment_id, run_id)

    def finish(self, run_id: str, ok: bool) -> None:
        self.client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")

    @contextmanager
    def stage_run(
        self, stage: str, params: dict[str, Any], tags: dict[str, str]
    ) -> Iterator[StageRun]:
        """A stage's child run, the skeleton every stage shares: its config as params
        (flattened, URLs redacted), FAILED if the block raises (Ctrl-C included), FINISHED when
        it ends; opened lazily, and not at all for a stage that found every unit done when an
        earlier run recorded the same (:class:`StageRun`)."""
        run = StageRun(self, stage, flatten(params), tags)
        try:
            yield run
        except BaseException:
            run.close(ok=False)
            raise
        run.close(ok=True)


class StageRun:
    """One stage's MLflow run, bound to its id (what
    :class:`~llmflow.tasks.core.graph.RunRecorder` asks of it), and opened only when needed.

    A re-run whose every unit is skipped would otherwise add a run per stage each time (twelve
    for a pipeline that had nothing to do). So what the stage logs waits here until the stage
    first asks for the run's id, has worked for :data:`OPEN_AFTER_S`, raises, or ends having
    done work; then the run is created (with the stage's start time) and the waiting calls are
    replayed in order. A stage that ends with ``units_skipped == units`` (both metrics are
    logged by every stage) logs nothing new: when an earlier finished run of the stage has the
    same params and tags, that run stands for it (:attr:`run_id` names it, :attr:`repeats` is
    true); otherwise this one is recorded, once.
    """

    def __init__(
        self, tracker: PipelineTracker, stage: str, params: dict[str, str], tags: dict[str, str]
    ) -> None:
        self.tracker = tracker
        self.stage = stage
        self.params = params
        self.tags = dict(tags)  # creation tags, then every tag logged: what a repeat must match
        self.repeats = False
        self._started = int(time.time() * 1000)
        self._id: str | None = None
        self._waiting: list[Callable[[str], None]] = []
        self._figures: list[Any] = []
        self._units: dict[str, float] = {}
        self._lock = threading.RLock()
        self._timer = threading.Timer(OPEN_AFTER_S, self._open)
        self._timer.daemon = True
        self._timer.start()

    @property
    def tracking_uri(self) -> str:
        return self.tracker.tracking_uri

    @property
    def experiment_id(self) -> str:
        return self.tracker.experiment_id

    @property
    def run_id(self) -> str:
        """The run's id, creating the run if it is not yet (after :meth:`close`, the id of the
        run that stands for this one)."""
        return self._open()

    @property
    def opened(self) -> bool:
        return self._id is not None

    def _open(self) -> str:
        with self._lock:
            if self._id is None:
                self._id = self.tracker.start_child(
                    self.stage, self.params, self.tags, start_time=self._started
                )
                for call in self._waiting:
                    call(self._id)
                self._waiting.clear()
                self._figures.clear()
            return self._id

    def _record(self, call: Callable[[str], None]) -> None:
        with self._lock:
            if self._id is None:
                self._waiting.append(call)
                return
            run_id = self._id
        call(run_id)

    def close(self, ok: bool) -> None:
        """End the run: FAILED or FINISHED, or, for a stage that found all its work done,
        replaced by the earlier run that recorded the same."""
        self._timer.cancel()
        with self._lock:
            units = self._units.get(UNITS, 0)
            all_skipped = ok and units > 0 and self._units.get(UNITS_SKIPPED) == units
            if all_skipped:
                earlier = self.tracker.find_repeat(self.stage, self.params, self.tags, self._id)
                if earlier is not None:
                    if self._id is not None:  # opened by the timer: a slow skip
                        self.tracker.client.delete_run(self._id)
                    from llmflow.tasks.core.run_charts import close as close_figure

                    for figure in self._figures:
                        close_figure(figure)
                    self._id, self.repeats = earlier, True
                    self._waiting.clear()
                    return
            run_id = self._open()
        self.tracker.finish(run_id, ok)

    def log(
        self,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        now = int(time.time() * 1000)
        metrics, tags = dict(metrics or {}), dict(tags or {})  # as they are now, if they wait
        with self._lock:
            self._units |= {k: v for k, v in metrics.items() if k in (UNITS, UNITS_SKIPPED)}
            self.tags |= tags
        self._record(
            lambda run_id: self.tracker.log(
                run_id, metrics=metrics, tags=tags, step=step, timestamp=now
            )
        )

    def log_dict(self, data: Any, artifact_file: str) -> None:
        data = copy.deepcopy(data) if not self.opened else data  # as it is now, when it waits
        self._record(lambda run_id: self.tracker.log_dict(run_id, data, artifact_file))

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        rows = copy.deepcopy(rows) if not self.opened else rows
        self._record(lambda run_id: self.tracker.log_table(run_id, rows, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        with self._lock:
            if self._id is None:
                self._figures.append(figure)
        self._record(lambda run_id: self.tracker.log_figure(run_id, figure, artifact_file))

    def log_artifacts(self, local_path: str | Path, artifact_path: str) -> None:
        self._record(lambda run_id: self.tracker.log_artifacts(run_id, local_path, artifact_path))

    def log_input(self, name: str, uri: str, digest: str, context: str) -> None:
        self._record(lambda run_id: self.tracker.log_input(run_id, name, uri, digest, context))

    def register_model(
        self, name: str, source_run_id: str, artifact_path: str, tags: dict[str, str], key: str
    ) -> str:
        # another run's model: nothing of this run's is needed, and the caller wants the version
        return self.tracker.register_model(name, source_run_id, artifact_path, tags, key)


def flow_run_tags() -> dict[str, str]:
    """The MLflow parent run's tags naming the Prefect flow run it records, with the run's page
    in the Prefect UI only where there is a UI to open: Prefect's own ``ui_url`` reads
    ``None/flow-runs/...`` when no UI URL is known (an API of Prefect's own, temporary), and the
    API ``llmflow run`` starts for itself has no UI and is gone when the run ends."""
    from llmflow.flows.prefect_api import is_temporary

    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)}
    base = PREFECT_UI_URL.value()
    if isinstance(base, str) and base.startswith(("http://", "https://")) and not is_temporary():
        tags["prefect.flow_run_url"] = f"{base.rstrip('/')}/runs/flow-run/{flow_run.id}"
    return tags


def flow_run_tag(run_id: str) -> str:
    """The Prefect tag naming a flow run's MLflow run: Prefect 3's UI shows a flow run's tags
    at the top of its page (its labels, ``mlflow.run_id`` among them, nowhere)."""
    return f"mlflow-run:{run_id}"


def link_flow_run(tracker: PipelineTracker, run_id: str, attempts: int = 4) -> bool:
    """Labels on the Prefect flow run naming its MLflow parent run (and the run's page when
    MLflow is a server), and a tag that shows it on the flow run's page: the other half of the
    MLflow run's ``prefect.flow_run_*`` tags. (A flow run has no description in Prefect 3.8, and
    its name is the MLflow run's name.)

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
                tags = client.read_flow_run(flow_run.id).tags
                if flow_run_tag(run_id) not in tags:  # a retry after a dropped answer
                    client.update_flow_run(flow_run.id, tags=[*tags, flow_run_tag(run_id)])
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
