"""Data shipped inside the package for the embedded default (``make run``: offline, no user file).

The ``sft`` and ``evaluate`` stages need instruction data and benchmark files. A user points them
at their own; the embedded default has none and may not reach the network, so small, permissively
licensed sets travel with the package under ``embedded/`` (a plain data folder, shipped as package
data): an instruction set written for llmflow (CC0-1.0) and 200-item subsets of benchmarks whose
licenses allow redistribution, each with its license. ``embedded/README.md`` says where each file
comes from, how it was cut and under which license it ships.
"""

from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR: Path = Path(__file__).parent / "embedded"
# chat-shaped JSONL ({"messages": [...]}) that llmflow.tasks.train.sft_data.read_conversations reads
INSTRUCTIONS_FILE: Path = EMBEDDED_DIR / "instructions" / "llmflow_instructions.jsonl"
# a benchmarks folder in llmflow.tasks.evaluate.evaluation.BENCHMARK_FILES' layout (find_benchmark
# finds each)
BENCHMARKS_DIR: Path = EMBEDDED_DIR / "benchmarks"
# the tasks BENCHMARKS_DIR holds (200 items each); COPA and OpenBookQA are not redistributable
# with a verified license, see embedded/benchmarks/LICENSES.md
EMBEDDED_TASKS: tuple[str, ...] = (
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "boolq",
    "mmlu",
    "lambada",
)
