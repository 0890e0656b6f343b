"""``llmflow --help`` starts fast and reads well at 80 columns.

Help must not wait for torch, Prefect or MLflow: the CLI imports them inside the commands that
use them. Timing assertions flake on a busy machine, so the test asserts what decides the time:
which modules ``--help`` imports (``python -X importtime`` lists every one).
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmflow.flows.cli import app
from llmflow.tasks.stage_names import DOCUMENT_STAGE_NAMES, STAGE_NAMES

# What made `llmflow --help` take 4-5 CPU-seconds; none of them is needed to print help.
HEAVY = ("torch", "prefect", "mlflow", "scipy", "sklearn", "pyarrow", "httpx", "yaml")
COMMANDS = ("run", "serve", "evaluate", "plan", "ui", "ablate")


def _imported(*args: str) -> set[str]:
    """The top-level packages a fresh interpreter imports to run ``llmflow ARGS``."""
    code = "import sys; from llmflow.flows.cli import app; sys.argv = ['llmflow', *sys.argv[1:]]"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"{code}; app()", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "80", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Usage: llmflow" in result.stdout
    modules = re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)", result.stderr, re.M)
    assert modules, result.stderr[-2000:]
    return {m.split(".")[0] for m in modules}


@pytest.mark.parametrize(
    "args", [("--help",), *((command, "--help") for command in COMMANDS)], ids=" ".join
)
def test_help_imports_nothing_heavy(args: tuple[str, ...]) -> None:
    heavy = sorted(set(HEAVY) & _imported(*args))
    assert not heavy, f"llmflow {' '.join(args)} imports {heavy}"


def test_static_stage_names_are_the_graphs() -> None:
    """The help's stage names come from a cheap module; they cannot drift from the registry."""
    from llmflow.tasks.registry import GRAPH

    assert GRAPH.names == STAGE_NAMES
    assert GRAPH.document_stages == DOCUMENT_STAGE_NAMES


def _help_at_80_columns(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, result.output
    return result.output


def test_run_help_lists_every_stage_at_80_columns() -> None:
    text = _help_at_80_columns("run")
    # a stage's name is never cut ("quality_mode…") nor split over two lines
    words = set(re.findall(r"[a-z_]+", text))
    missing = [stage for stage in STAGE_NAMES if stage not in words]
    assert not missing, f"stages missing from `llmflow run --help`: {missing}\n{text}"
    assert "…" not in text


@pytest.mark.parametrize("command", ["run", "serve", "ui", "ablate", "evaluate"])
def test_every_workdir_option_shows_its_default(command: str) -> None:
    text = _help_at_80_columns(command)
    assert "--workdir" in text
    assert "[default: ./llmflow-work]" in text, text


def test_plan_help_shows_its_defaults() -> None:
    """Defaults that depend on other options are shown as typer shows a described default."""
    text = " ".join(_help_at_80_columns("plan").split())
    for default in ("(1.0)", "(0.40)", "(the manifest's, else 32768)"):
        assert f"[default: {default}]" in text, text
