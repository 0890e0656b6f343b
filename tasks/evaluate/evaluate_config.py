"""What a user sets for the evaluate stage.

Kept apart from :mod:`llmflow.tasks.evaluate.evaluation` (which imports torch and the scorer) so
that the
pipeline's config, and so the CLI and the Prefect UI's form, build without them.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from llmflow.tasks.core.stage import StageConfig
from llmflow.tasks.evaluate.benchmarks import TASKS
from llmflow.tasks.evaluate.model_loading import DEVICE_PATTERN
from llmflow.tasks.ingest.embedded_data import EMBEDDED_TASKS


class EvaluateConfig(StageConfig):
    """Benchmarks, held-out bits per byte and chat samples for the pipeline's final model."""

    # where and how fast the model runs changes no score (beyond float rounding): not in the key
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = frozenset(
        {"batch_size", "device", "registered_model"}
    )

    model: str | None = Field(
        None,
        description=(
            "The model to evaluate: a Hugging Face directory, a .gguf file or an llmflow run"
            " folder. None: the model the sft stage produced."
        ),
    )
    tasks: list[str] = Field(
        default_factory=lambda: list(EMBEDDED_TASKS),
        description="Benchmark tasks, scored as lm-evaluation-harness scores them.",
    )
    data_dir: str | None = Field(
        None,
        description=(
            "Folder of benchmark files in their published formats. None: the 200-item subsets"
            " shipped with llmflow (embedded/benchmarks), for a quick, offline look."
        ),
    )
    limit: int | None = Field(None, ge=1, description="Score only the first N items of a task.")
    num_fewshot: int | None = Field(
        None, ge=0, description="Solved examples before each item. None: the task's (MMLU 5)."
    )
    batch_size: int = Field(8, ge=1, description="Contexts scored together.")
    device: str = Field(
        "auto",
        pattern=DEVICE_PATTERN,
        description=(
            "torch device the model runs on: auto (CUDA when the machine has it, else the CPU),"
            " cpu, cuda, cuda:N or mps."
        ),
    )
    heldout_windows: int = Field(
        64,
        ge=0,
        description=(
            "Windows of the token shards' validation split for bits per byte (0: skip). Needs"
            " the model's tokenizer to be the pipeline's."
        ),
    )
    chat_prompts: list[str] = Field(
        default_factory=lambda: [
            "Who are you?",
            "What does the len() function do in Python?",
            "What does the MIT license allow?",
            "Write the word hello in upper case.",
        ],
        description="User messages whose greedy replies (in the chat template) are recorded.",
    )
    max_new_tokens: int = Field(48, ge=1, description="Longest reply generated per prompt.")
    registered_model: str | None = Field(
        "llmflow-sft",
        description=(
            "Name in MLflow's model registry under which the evaluated SFT model is registered,"
            " with its scores as tags. None: do not register."
        ),
    )

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: list[str]) -> list[str]:
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        return tasks
