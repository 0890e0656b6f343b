"""What ``llmflow run`` prints when a run ends, laid out for the width of the terminal.

A table of the stages that ran, each stage's dataset and one-line summary, the documents version
the run published, where MLflow and Prefect keep the run, the commands that open their UIs, and,
when the run stopped early, the stage and the cause. At 80 columns every stage name stays whole
(the table shortens its headers, then drops its edges, then columns, until it fits), long lines
wrap at their own boundaries with a hanging indent (a rejection reason and its count never part),
and a command or the line that says why a run stopped is printed on one line of its own that a
terminal may fold but that pastes (and greps) whole.

Only rich and the standard library are imported at module level: ``llmflow --help`` must not pay
for the pipeline's imports.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

_HEADERS = ("stage", "in", "kept", "rejected", "fetch failures", "size", "time", "units run")
# Shorter headers, tried in turn when the table is too wide for the terminal.
_SHORT_HEADERS = (
    {"fetch failures": "fetch fail.", "units run": "units"},
    {"rejected": "rej.", "fetch failures": "fetch fail.", "units run": "units"},
    {"rejected": "rej.", "fetch failures": "fail.", "units run": "units"},
)
# Columns left out, in this order, when even the shortest headers do not fit.
_DROPPABLE = ("units run", "time", "size", "fetch failures")
# Where a summary line may wrap: after a clause's comma or semicolon.
_CLAUSE_END = re.compile(r"(?<=[,;]) ")
# Wider than any table: measuring in it gives a table's natural width.
_UNBOUNDED = 10_000


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def tool(name: str) -> str:
    """The console script beside this interpreter, so the printed command works as is."""
    candidate = Path(sys.executable).parent / name
    if not candidate.exists():
        return name
    try:
        return str(candidate.relative_to(Path.cwd()))
    except ValueError:
        return str(candidate)


def wrap(first: str, pieces: Sequence[str], width: int, indent: str) -> list[str]:
    """``pieces`` joined by spaces after ``first``, in lines of at most ``width`` cells; a line
    after the first starts with ``indent``. A piece is never split: one longer than the room
    left has a line of its own."""
    lines: list[str] = []
    line, empty = first, True
    for piece in pieces:
        if not empty and cell_len(line) + 1 + cell_len(piece) > width:
            lines.append(line)
            line, empty = indent, True
        line = line + piece if empty else f"{line} {piece}"
        empty = False
    lines.append(line)
    return lines


def _clauses(text: str, room: int) -> list[str]:
    """A summary's clauses (each with its comma or semicolon); a clause wider than ``room``
    falls apart into its words."""
    pieces: list[str] = []
    for clause in _CLAUSE_END.split(text):
        pieces += clause.split(" ") if cell_len(clause) > room else [clause]
    return pieces


def by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Reasons most frequent first (then by name), as the funnel shows them."""
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _reasons(counts: dict[str, int]) -> list[str]:
    """``reason N`` pieces, most frequent first, each but the last with its comma."""
    ordered = by_count(counts)
    return [f"{k} {v}" + ("," if i < len(ordered) - 1 else "") for i, (k, v) in enumerate(ordered)]


def _table(stages: list[dict[str, Any]], headers: dict[str, str], compact: bool) -> Table:
    table = Table(
        title="llmflow pipeline",
        box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
        show_edge=not compact,
        pad_edge=not compact,
    )
    for column, header in headers.items():
        left = column == "stage"  # a stage's name is never wrapped; it is why the table exists
        table.add_column(header, justify="left" if left else "right", no_wrap=left)
    for s in stages:
        cells = {
            "stage": s["stage"],
            "in": str(s["docs_in"]),
            "kept": str(s["kept"]),
            "rejected": str(s["rejected"]),
            "fetch failures": str(s["fetch_failures"]),
            "size": human_bytes(s["bytes"]),
            "time": f"{s['seconds']:.1f} s",
            "units run": f"{s['units'] - s['units_skipped']}/{s['units']}",
        }
        table.add_row(*(cells[c] for c in headers))
    return table


def stage_table(stages: list[dict[str, Any]], console: Console) -> Table:
    """The table of the stages, in the first layout that fits the console without wrapping a
    cell: full headers; shorter headers; no edges or padding; then fewer columns."""
    layouts: list[tuple[dict[str, str], bool]] = [({h: h for h in _HEADERS}, False)]
    for short in _SHORT_HEADERS:
        layouts.append(({h: short.get(h, h) for h in _HEADERS}, False))
    shortest = layouts[-1][0]
    layouts.append((shortest, True))
    kept = dict(shortest)
    for column in _DROPPABLE:
        del kept[column]
        layouts.append((dict(kept), True))
    unbounded = console.options.update_width(_UNBOUNDED)  # the table's natural width
    for headers, compact in layouts:
        table = _table(stages, headers, compact)
        if Measurement.get(console, unbounded, table).maximum <= console.width:
            return table
    return table  # the narrowest: the stage names still whole, other cells may wrap


def empty_stage_cause(counts: dict[str, Any], failures: list[dict[str, Any]]) -> str:
    """Why a stage kept no documents, from its manifest: what it rejected and why, or the fetch
    failures (by count, with the first failure of the most frequent reason spelled out)."""
    if counts["docs_in"]:
        reasons = ", ".join(f"{k} {v}" for k, v in by_count(counts["rejected_by_reason"]))
        why = f" (rejected: {reasons})" if reasons else ""
        return f"it kept none of its {counts['docs_in']:,} documents{why}"
    if not failures:
        return "it kept no documents: it read none"
    ordered = by_count(dict(Counter(f["reason"] for f in failures)))
    first = next(f for f in failures if f["reason"] == ordered[0][0])
    detail = first.get("detail") or ""
    if first.get("url") and first["url"] not in detail:
        status = f"{first['status']} " if first.get("status") else ""
        detail = f"{first['url']}: {status}{detail}".rstrip(": ")
    listed = ", ".join(f"{reason} {n}" for reason, n in ordered)
    return f"it kept no documents (fetch failures: {listed} — {detail})"


def stop_message(stopped: dict[str, Any]) -> str:
    """The line that says where a run stopped and why."""
    when = "after" if stopped["after"] else "before"
    return f"Stopped {when} {stopped['stage']}: {stopped['cause']}"


def print_documents_version(documents: dict[str, Any], console: Console) -> None:
    """The version of the documents the run published, and what its refresh found."""
    refresh = documents["refresh"]
    removed = ", ".join(f"{k} {v}" for k, v in by_count(refresh["removed_by_reason"]))
    text = (
        f"documents v{documents['version']:04d}: {documents['kept']} documents;"
        f" this version fetched {refresh['fetched']}, unchanged {refresh['unchanged']},"
        f" added {refresh['added']}, removed {refresh['removed']}"
        + (f" ({removed})" if removed else "")
    )
    _print_wrapped(console, "", _clauses(text, console.width - 2), "  ")


def _print_wrapped(console: Console, first: str, pieces: Sequence[str], indent: str) -> None:
    for line in wrap(first, pieces, console.width, indent):
        console.print(line, highlight=False, soft_wrap=True)


def _print_command(console: Console, label: str, command: str) -> None:
    """A command that must paste whole: beside its label when both fit, else on a line of its
    own, never wrapped (a terminal may fold it; the line is still one line)."""
    line = f"{label:<12} {command}"
    if cell_len(line) <= console.width:
        console.print(line, highlight=False, soft_wrap=True)
    else:
        console.print(label, highlight=False, soft_wrap=True)
        console.print(command, highlight=False, soft_wrap=True)


def print_summary(result: dict[str, Any], workdir: Path, console: Console) -> int:
    """Print what the run did; the exit code: 1 when it stopped early, else 0."""
    width = console.width
    # the documents version follows the stage whose documents it publishes (none: the last)
    documents_after = result.get("last_document_stage") or result["stages"][-1]["stage"]
    console.print(stage_table(result["stages"], console))
    for s in result["stages"]:
        _print_wrapped(console, f"{s['stage']}: ", [s["path"]], "  ")
        if s.get("summary"):
            _print_wrapped(console, "  ", _clauses(s["summary"], width - 4), "    ")
        if s["rejected_by_reason"]:
            _print_wrapped(console, "  rejected: ", _reasons(s["rejected_by_reason"]), " " * 12)
        if s["stage"] == documents_after and result.get("documents"):
            print_documents_version(result["documents"], console)
    stopped = result.get("stopped")
    if not stopped and all(s["units_skipped"] == s["units"] for s in result["stages"]):
        console.print("Nothing to do: every unit of work was already complete.")
    uri = result["mlflow_tracking_uri"]
    _print_wrapped(console, "MLflow run: ", [result["mlflow_run_id"], f"({uri})"], "  ")
    console.print(f"Prefect flow run: {result['prefect_flow_run_id']}", highlight=False)
    if os.environ.get("PREFECT_API_URL"):
        prefect_url = os.environ["PREFECT_API_URL"].removesuffix("/api")
        _print_command(console, "Prefect UI:", f"open {prefect_url}")
    # MLflow 3 opens an experiment on its GenAI overview unless the address asks for the runs
    # (flows/tracking.py's mlflow_page, repeated here to keep this module's imports cheap)
    page = f"#/experiments/{result.get('mlflow_experiment_id', '0')}/runs/{result['mlflow_run_id']}"
    page += "?workflowType=machine_learning"
    if uri.startswith("sqlite:"):
        _print_command(
            console, "MLflow UI:", f"{tool('mlflow')} ui --backend-store-uri {shlex.quote(uri)}"
        )
        # where that command serves it (mlflow ui's default address)
        _print_command(console, "Run page:", f"http://127.0.0.1:5000/{page}")
    else:
        _print_command(console, "Run page:", f"{uri.rstrip('/')}/{page}")
    # llmflow ui, not a bare `prefect server start`: it puts the API behind the workdir's auth
    # string and limits CORS to its own UI (README, Security).
    _print_command(
        console, "Both UIs:", f"{tool('llmflow')} ui --workdir {shlex.quote(str(workdir))}"
    )
    if not stopped:
        return 0
    # one line, whole: it names the stage, the cause and its counts, and greps as one line
    console.print(stop_message(stopped), style="bold red", highlight=False, soft_wrap=True)
    return 1
