"""The pipeline's stage names, in order, without importing a stage.

The CLI prints them in its help and checks ``--stages`` against them; importing the registry
(:mod:`llmflow.tasks.registry`) for that would import every stage and with them torch, Prefect and
scikit-learn, seconds before ``llmflow --help`` could answer. ``tests/test_cli_startup.py``
asserts that these equal the registry's :data:`~llmflow.tasks.registry.GRAPH`, so they cannot
drift apart.
"""

from __future__ import annotations

STAGE_NAMES: tuple[str, ...] = (
    "crawl",
    "normalize",
    "quality",
    "dedup",
    "quality_model",
    "toxicity",
    "pii",
    "decontaminate",
    "tokenizer",
    "tokenize",
    "pretrain",
    "sft",
    "evaluate",
)
# The data phase: the stages whose output joins the versioned documents.
DOCUMENT_STAGE_NAMES: tuple[str, ...] = STAGE_NAMES[: STAGE_NAMES.index("decontaminate") + 1]
