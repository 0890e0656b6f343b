"""The shape every stage has, so that the graph is declared once and the flow names no stage.

A :class:`Stage` is a name, a phase, the datasets it reads (other stages, or the versioned
``documents``), its config model and its code identity (a
:class:`~llmflow.tasks.core.stage.StageSpec`), plus how it runs. A stage that maps over units
(shards, files, a crawl) gives ``plan`` and a per-unit ``task`` that calls
:func:`~llmflow.tasks.core.stage.run_unit` (the flow maps it, or calls its function unit by unit
inside one task run per batch of units, so all a unit needs is in that function), and optionally
``prepare`` (a step over the whole input first, dedup's resolve), ``finish`` (a manifest with
more than the units' counts) and ``report`` (more for its MLflow run). A stage that is one step
over its whole input (the tokenizer, pretraining, SFT, evaluation) gives ``step``. The registry
(:mod:`llmflow.tasks.registry`) lists the stages in order; planning, MLflow lineage, the CLI's
checks, the deployments and the documents version all read it there.

The flow hands a stage a :class:`StageContext`: where each dataset lives, each stage's config as
the run uses it, and a way to open the stage's MLflow run (:class:`RunRecorder`), so no stage
module imports the flows or MLflow's client.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel

from llmflow.tasks.core.document_versions import DOCUMENTS
from llmflow.tasks.core.stage import StageSpec, UnitRecord, WorkUnit

Phase = Literal["data", "train", "evaluate"]
PHASES: tuple[Phase, ...] = ("data", "train", "evaluate")


class RunRecorder(Protocol):
    """A stage's MLflow run, as a stage sees it: what it may record, bound to its run id."""

    @property
    def run_id(self) -> str: ...

    @property
    def tracking_uri(self) -> str: ...

    @property
    def experiment_id(self) -> str: ...

    def log(
        self,
        metrics: dict[str, float] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def log_artifacts(self, local_path: Any, artifact_path: str) -> None: ...

    def log_input(self, name: str, uri: str, digest: str, context: str) -> None: ...

    def register_model(
        self, name: str, source_run_id: str, artifact_path: str, tags: dict[str, str], key: str
    ) -> str: ...


# Opens a stage's MLflow run: ``start_run(params, tags, log_inputs=True)``, with its params (a
# nested dict, flattened and with URLs redacted by the flow) and tags; logs the datasets the stage
# reads unless ``log_inputs`` is false; on leaving, marks the run FINISHED, or FAILED when the
# block raised. The run is created lazily: a stage that logs ``units_skipped == units`` (every
# stage logs both) and whose params and tags an earlier finished run has adds no run, and its
# ``run_id`` names that earlier run (flows/tracking.py, StageRun).
StartRun = Callable[..., AbstractContextManager[RunRecorder, bool | None]]


@dataclass(frozen=True)
class StageContext:
    """What a stage is handed by the flow: the run's config, where datasets live, its MLflow run.

    ``config`` is the pipeline config (a stage reads its own and its inputs' settings through
    :meth:`stage_config`); ``stage_dir`` resolves a dataset's folder for this run (the document
    stages write into the documents version being made).
    """

    name: str
    config: Any
    stage_dir: Callable[[str], str]
    stage_config: Callable[[str], Any]
    start_run: StartRun

    @property
    def dir(self) -> str:
        """This stage's own folder."""
        return self.stage_dir(self.name)

    @property
    def settings(self) -> Any:
        """This stage's own config."""
        return self.stage_config(self.name)


@dataclass
class StepReport:
    """What a one-step stage reports: its Prefect table rows and its line of the run summary.

    ``table`` is the step's outcome as rows of a Prefect table artifact; ``markdown`` an extra
    Prefect markdown artifact (evaluation's results, key ``<stage>-results``); the counts fill
    the pipeline summary.
    """

    run_id: str
    skipped: bool
    table: dict[str, Any]
    docs_in: int = 0
    kept: int = 0
    rejected: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    bytes: int = 0
    summary: str = ""
    markdown: str | None = None
    markdown_description: str = ""


Plan = Callable[[StageContext], tuple[list[WorkUnit], str | None]]
TaskMapper = Callable[..., list[Any]]
Prepare = Callable[[list[WorkUnit], Any, str, TaskMapper], None]
# finish gets the input manifest's digest; None for a source stage (crawl reads no manifest)
Finish = Callable[[list[WorkUnit], Any, str, list[UnitRecord], str | None], dict]
# report gets the stage's MLflow run after the manifest: what a mapped stage records beyond its
# counts (the quality model's held-out metrics and files)
Report = Callable[[RunRecorder, list[WorkUnit], Any, str], None]


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: what it reads, how it is configured, and how it runs.

    ``inputs`` are the datasets it reads, its main input first; ``side_inputs`` are files it
    also reads from a dataset without reading the dataset (dedup reads the crawl's withdrawn
    ids): they are lineage, not planning. ``configure`` adjusts the stage's config for a run
    (dedup's index defaults to a folder shared by every documents version).
    """

    name: str
    phase: Phase
    inputs: tuple[str, ...]
    config: type[BaseModel]
    spec: StageSpec
    plan: Plan | None = None
    task: Any = None
    prepare: Prepare | None = None
    finish: Finish | None = None
    step: Callable[[StageContext], StepReport] | None = None
    configure: Callable[[StageContext, Any], Any] | None = None
    side_inputs: tuple[str, ...] = ()
    report: Report | None = None

    def __post_init__(self) -> None:
        if (self.step is None) == (self.task is None or self.plan is None):
            raise ValueError(f"stage {self.name}: give either plan and task, or step")


class StageGraph:
    """The stages in pipeline order, and what the flow, the CLI and the deployments ask of them."""

    def __init__(self, stages: tuple[Stage, ...]) -> None:
        self._set(stages)

    def _set(self, stages: tuple[Stage, ...]) -> None:
        names = [s.name for s in stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names repeat: {names}")
        known = {DOCUMENTS}
        for stage in stages:
            unknown = [i for i in (*stage.inputs, *stage.side_inputs) if i not in known]
            if unknown:
                raise ValueError(
                    f"stage {stage.name} reads {unknown}, which no earlier stage makes"
                )
            known.add(stage.name)
        phases = [PHASES.index(s.phase) for s in stages]
        if phases != sorted(phases):
            raise ValueError("stages must be listed phase by phase: data, train, evaluate")
        self.stages = stages
        self.by_name = {s.name: s for s in stages}

    def insert(self, stage: Stage, after: str) -> None:
        """Add a stage after another (a plugin's stage, or a test's): everything that reads the
        graph (the flows, the CLI's checks, the documents version) sees it from then on."""
        index = self.names.index(after) + 1
        self._set((*self.stages[:index], stage, *self.stages[index:]))

    def remove(self, name: str) -> None:
        """Take a stage out again (what :meth:`insert` added)."""
        self._set(tuple(s for s in self.stages if s.name != name))

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __getitem__(self, name: str) -> Stage:
        return self.by_name[name]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages)

    def phase(self, phase: Phase) -> tuple[str, ...]:
        """The stages of one phase, in order."""
        return tuple(s.name for s in self.stages if s.phase == phase)

    @property
    def document_stages(self) -> tuple[str, ...]:
        """The data phase: the stages whose last output becomes a version of the documents."""
        return self.phase("data")
