"""The summary ``llmflow run`` prints, rendered at 80 columns: nothing cut, nothing wrapped inside.

The result is the shape ``flows.pipeline._result`` returns (one ``reporting.StageReport`` dict per
stage), with the numbers and paths of README's sample run.
"""

from __future__ import annotations

import re
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
from rich.cells import cell_len
from rich.console import Console

from llmflow.flows.run_summary import empty_stage_cause, print_summary, stop_message, tool
from llmflow.tasks.stage_names import DOCUMENT_STAGE_NAMES

WORK = "/home/me/llmflow/llmflow-work"
QUALITY_REASONS = {
    "c4_curly_bracket": 11,
    "fineweb_dup_line_char_ratio": 60,
    "fineweb_line_punct_ratio": 81,
    "gopher_alpha_words": 270,
    "gopher_max_mean_word_length": 17,
    "gopher_min_words": 7,
    "gopher_rep_dup_10gram": 1,
    "gopher_rep_dup_5gram": 58,
    "gopher_rep_dup_6gram": 3,
    "gopher_rep_dup_7gram": 2,
    "gopher_rep_dup_8gram": 2,
    "gopher_rep_dup_9gram": 1,
    "gopher_rep_dup_line_char_frac": 9,
    "gopher_rep_dup_line_frac": 37,
    "gopher_rep_dup_para_char_frac": 10,
    "gopher_rep_dup_para_frac": 17,
    "gopher_rep_top_2gram": 5,
    "gopher_rep_top_3gram": 13,
    "gopher_rep_top_4gram": 21,
    "lang": 26,
}
# stage, in, kept, rejected, bytes, seconds, units, summary, rejected by reason
ROWS: list[tuple[str, int, int, int, int, float, int, str, dict[str, int]]] = [
    ("crawl", 849, 847, 2, 1_572_864, 13.5, 2, "", {"undecodable": 2}),
    ("normalize", 847, 847, 0, 1_468_006, 5.3, 2, "", {}),
    ("quality", 847, 196, 651, 99_020, 23.2, 2, "", QUALITY_REASONS),
    ("dedup", 196, 20, 176, 68_608, 1.1, 2, "", {"exact_duplicate": 3, "near_duplicate": 173}),
    ("quality_model", 20, 20, 0, 69_120, 2.2, 2, "", {}),
    ("toxicity", 20, 20, 0, 69_836, 0.5, 2, "", {}),
    ("pii", 20, 20, 0, 73_113, 0.5, 2, "", {}),
    (
        "decontaminate",
        20,
        20,
        0,
        73_728,
        0.9,
        2,
        "1,600 items of 8 tasks (13-grams, reject); documents overlapping them: none",
        {},
    ),
    ("tokenizer", 20, 16, 0, 23_756, 0.4, 1, "vocab 1024, 2.61 bytes/token on validation", {}),
    ("tokenize", 20, 20, 0, 3_584, 0.4, 1, "39,789 train tokens, 10,194 val tokens", {}),
    (
        "pretrain",
        20,
        20,
        0,
        3_984_588,
        136.1,
        1,
        "200 steps, 984,192 parameters; val loss 4.474 nats/token (2.474 bits/byte) vs unigram"
        f" entropy 5.920; export {WORK}/data/pretrain/runs/1c0bfdefbe74012d/hf",
        {},
    ),
    (
        "sft",
        307,
        307,
        0,
        3_984_588,
        38.5,
        1,
        "282 conversations; 60 steps, 984,192 parameters; val loss 3.957 nats/token"
        " (2.450 bits/byte) on held-out replies",
        {},
    ),
    (
        "evaluate",
        1600,
        1600,
        0,
        0,
        36.4,
        1,
        "held-out 2.874 bits/byte; CORE -0.085; hellaswag acc_norm 0.195, arc_easy acc_norm"
        " 0.210, arc_challenge acc_norm 0.215, piqa acc_norm 0.440, winogrande acc 0.435, boolq"
        " acc 0.365, mmlu acc 0.260, lambada acc 0.000; contaminated items: none",
        {},
    ),
]


def stage(row: tuple[str, int, int, int, int, float, int, str, dict[str, int]]) -> dict[str, Any]:
    name, docs_in, kept, rejected, size, seconds, units, summary, reasons = row
    folder = f"documents/v0001/{name}" if name in DOCUMENT_STAGE_NAMES else name
    return {
        "stage": name,
        "docs_in": docs_in,
        "kept": kept,
        "rejected": rejected,
        "fetch_failures": 0,
        "bytes": size,
        "seconds": seconds,
        "units": units,
        "units_skipped": 0,
        "rejected_by_reason": reasons,
        "path": f"{WORK}/data/{folder}",
        "mlflow_run_id": "0" * 32,
        "summary": summary,
    }


def result_of(rows: list[Any], **extra: Any) -> dict[str, Any]:
    return {
        "mlflow_run_id": "30d5877f936145a6b83a3c2a1c9077e4",
        "mlflow_tracking_uri": f"sqlite:///{WORK}/mlflow.db",
        "prefect_flow_run_id": "43b8d305-6969-4cd0-90a2-4cab4d26ac87",
        "last_document_stage": "decontaminate",
        "stages": [stage(r) for r in rows],
        "documents": {
            "version": 1,
            "kept": 20,
            "refresh": {
                "fetched": 849,
                "unchanged": 0,
                "added": 20,
                "removed": 0,
                "removed_by_reason": {},
            },
        },
    } | extra


def render(result: dict[str, Any], width: int = 80) -> tuple[str, int]:
    buffer = StringIO()
    console = Console(width=width, file=buffer, color_system=None, legacy_windows=False)
    code = print_summary(result, Path(WORK), console)
    return buffer.getvalue(), code


def commands(text: str) -> list[str]:
    """The printed commands, each on the line after its label (or beside it)."""
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        for label in ("MLflow UI:", "Run page:", "Both UIs:", "Prefect UI:"):
            if line.startswith(label):
                rest = line.removeprefix(label).strip()
                found.append(rest or lines[i + 1])
    return found


@pytest.mark.parametrize("width", [80, 100])
def test_the_summary_fits_the_terminal_and_cuts_nothing(width: int) -> None:
    text, code = render(result_of(ROWS), width)
    assert code == 0
    lines = text.splitlines()
    cmds = commands(text)
    assert [c.split(" ui ")[0].rsplit("/", 1)[-1] for c in cmds if " ui " in c] == [
        "mlflow",
        "llmflow",
    ]
    long = [line for line in lines if cell_len(line) > width and line not in cmds]
    assert not long, "\n".join(long)
    rows = [line for line in lines if line.startswith("│") or re.match(r"^ ?\w+ +\d", line)]
    names = [re.split(r"[│ ]+", row.strip("│ "))[0] for row in rows]
    assert names == [r[0] for r in ROWS], text  # every stage on its row, its name whole


def test_commands_are_whole_lines_that_paste() -> None:
    """Each command is on one line (alone when it does not fit beside its label), so a
    terminal folds it at most, and a triple-click pastes it whole."""
    text, _ = render(result_of(ROWS), 80)
    lines = text.splitlines()
    mlflow_ui = f"{tool('mlflow')} ui --backend-store-uri sqlite:///{WORK}/mlflow.db"
    both = f"{tool('llmflow')} ui --workdir {WORK}"
    assert cell_len(mlflow_ui) > 80
    assert mlflow_ui in lines  # too long for its label's line: a line of its own
    assert f"Both UIs:    {both}" in lines
    # the run's page where that command serves it, in MLflow's model-training view
    page = "http://127.0.0.1:5000/#/experiments/0/runs/"
    page += f"{result_of(ROWS)['mlflow_run_id']}?workflowType=machine_learning"
    assert page in lines
    assert commands(text) == [mlflow_ui, page, both]


def test_rejected_reasons_by_count_wrapped_between_reasons() -> None:
    text, _ = render(result_of(ROWS), 80)
    lines = text.splitlines()
    start = lines.index(f"quality: {WORK}/data/documents/v0001/quality") + 1
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" " * 12):
            break
        block.append(line)
    assert block[0].startswith("  rejected: gopher_alpha_words 270, fineweb_line_punct_ratio 81")
    assert len(block) > 1 and all(cell_len(line) <= 80 for line in block)
    pieces = " ".join(line.strip() for line in block).removeprefix("rejected: ").split(", ")
    pairs = [piece.rsplit(" ", 1) for piece in pieces]
    assert {name: int(n) for name, n in pairs} == QUALITY_REASONS  # every reason N whole
    counts = [int(n) for _, n in pairs]
    assert counts == sorted(counts, reverse=True)


def test_a_stopped_run_names_the_stage_and_cause_and_exits_1() -> None:
    failures = [
        {
            "url": "http://127.0.0.1:8000/",
            "reason": "robots_unreachable",
            "detail": "robots.txt at http://127.0.0.1:8000/robots.txt answered 500"
            " Internal Server Error (3 attempts)",
            "status": None,
        }
    ]
    counts = {"docs_in": 0, "kept": 0, "rejected_by_reason": {}}
    cause = empty_stage_cause(counts, failures)
    assert cause == (
        "it kept no documents (fetch failures: robots_unreachable 1 — robots.txt at"
        " http://127.0.0.1:8000/robots.txt answered 500 Internal Server Error (3 attempts))"
    )
    crawl = (*ROWS[0][:1], 0, 0, 0, 978, 2.1, 1, "", {})
    stopped = {"stage": "crawl", "after": True, "cause": cause}
    text, code = render(result_of([crawl], documents=None, stopped=stopped), 80)
    assert code == 1
    last = text.splitlines()[-1]
    assert last == stop_message(stopped) == f"Stopped after crawl: {cause}"
    assert "Nothing to do" not in text


def test_the_cause_of_a_stage_that_rejected_everything_lists_reasons_by_count() -> None:
    counts = {"docs_in": 12, "kept": 0, "rejected_by_reason": {"lang": 2, "gopher_min_words": 10}}
    cause = empty_stage_cause(counts, [])
    assert cause == "it kept none of its 12 documents (rejected: gopher_min_words 10, lang 2)"
