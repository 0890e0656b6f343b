"""The data shipped for the embedded default read with zero skipped records and carry licenses.

These files are what ``make run`` trains and evaluates on with no network and no user file, so a
record that a reader skips, a task that no longer loads or a dataset without its license is a
product bug, not a data quirk. Nothing here reads ../shared/data.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from llmflow.tasks.evaluate.benchmarks import MMLU_DEFAULT_SHOTS, TASKS, load_task
from llmflow.tasks.evaluate.evaluation import find_benchmark
from llmflow.tasks.ingest.embedded_data import (
    BENCHMARKS_DIR,
    EMBEDDED_DIR,
    EMBEDDED_TASKS,
    INSTRUCTIONS_FILE,
)
from llmflow.tasks.train.sft_data import read_conversations

# items each shipped task must load (README: the first 200 of each source; MMLU 4 subjects x 50)
EXPECTED_ITEMS = dict.fromkeys(EMBEDDED_TASKS, 200)

# per task, the license file shipped with it (relative to BENCHMARKS_DIR) and its license name
LICENSE_FILES: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/LICENSE.hellaswag", "MIT"),
    "arc_easy": ("LICENSES.md", "CC-BY-SA-4.0"),
    "arc_challenge": ("LICENSES.md", "CC-BY-SA-4.0"),
    "piqa": ("piqa/README.md", "AFL-3.0"),
    "winogrande": ("LICENSE.llm-foundry", "Apache-2.0"),
    "boolq": ("LICENSES.md", "CC-BY-SA-3.0"),
    "mmlu": ("mmlu/LICENSE.hendrycks-test", "MIT"),
    "lambada": ("LICENSES.md", "CC-BY-4.0"),
}


def test_paths_point_inside_the_package() -> None:
    assert EMBEDDED_DIR.is_dir()
    assert INSTRUCTIONS_FILE.is_file()
    assert BENCHMARKS_DIR.is_dir()
    # a data folder, not a Python package
    assert not (EMBEDDED_DIR / "__init__.py").exists()


def test_instructions_read_with_nothing_skipped() -> None:
    conversations, skipped = read_conversations(str(INSTRUCTIONS_FILE))
    assert sum(skipped.values()) == 0, skipped
    assert len(conversations) >= 200
    lines = [ln for ln in INSTRUCTIONS_FILE.read_text(encoding="utf-8").splitlines() if ln.strip()]
    assert len(conversations) == len(lines)
    for conversation in conversations:
        assert conversation[-1]["role"] == "assistant"
        assert all(m["content"].strip() for m in conversation)
    # the mix the README promises: some with a system turn, some with several user turns
    assert any(c[0]["role"] == "system" for c in conversations)
    assert any(sum(m["role"] == "user" for m in c) > 1 for c in conversations)


def test_instructions_have_a_license() -> None:
    license_text = (INSTRUCTIONS_FILE.parent / "LICENSE").read_text(encoding="utf-8")
    assert "CC0 1.0 Universal" in license_text
    readme = (EMBEDDED_DIR / "README.md").read_text(encoding="utf-8")
    assert "instructions/LICENSE" in readme and "CC0-1.0" in readme


def test_embedded_tasks_are_known_tasks() -> None:
    assert set(EMBEDDED_TASKS) <= set(TASKS)
    assert len(set(EMBEDDED_TASKS)) == len(EMBEDDED_TASKS)
    assert set(LICENSE_FILES) == set(EMBEDDED_TASKS)


@pytest.mark.parametrize("task", EMBEDDED_TASKS)
def test_task_loads_every_item(task: str) -> None:
    path = find_benchmark(task, BENCHMARKS_DIR)
    assert BENCHMARKS_DIR in path.parents
    data = load_task(task, path)  # lm-eval's default shots: 5 for MMLU, 0 elsewhere
    assert sum(data.skipped.values()) == 0, data.skipped
    assert len(data.items) == EXPECTED_ITEMS[task]
    if task == "mmlu":
        assert data.num_fewshot == MMLU_DEFAULT_SHOTS
        assert len({item.subset for item in data.items}) == 4
        # each prompt carries its subject's five dev questions
        assert all(item.context.count("\nAnswer:") == MMLU_DEFAULT_SHOTS + 1 for item in data.items)


@pytest.mark.parametrize("task", EMBEDDED_TASKS)
def test_task_has_a_license_named_in_the_readme(task: str) -> None:
    relative, license_name = LICENSE_FILES[task]
    license_file = BENCHMARKS_DIR / relative
    assert license_file.is_file(), license_file
    readme = (EMBEDDED_DIR / "README.md").read_text(encoding="utf-8")
    row = next(
        (ln for ln in readme.splitlines() if ln.startswith(f"| {task} |")), None
    )  # the task's row of the benchmarks table
    assert row is not None, f"README has no row for {task}"
    assert license_name in row
    assert Path(relative).name in row
    text = license_file.read_text(encoding="utf-8")
    if relative == "LICENSES.md":  # CC licenses: named with their URI
        number = re.search(r"\d\.\d", license_name).group()
        kind = "by-sa" if "SA" in license_name else "by"
        assert f"https://creativecommons.org/licenses/{kind}/{number}/" in text
    else:
        assert license_name.split("-")[0].replace("AFL", "Academic Free License") in text
