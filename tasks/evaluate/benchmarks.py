"""Benchmark readers: published benchmark files -> items with lm-evaluation-harness's prompts.

The evaluator scores a multiple-choice item by the log-likelihood of each continuation given its
context, exactly as lm-evaluation-harness (lm-eval) does. Its numbers are only comparable with
lm-eval's when the strings are the same to the character: a missing "\\nAnswer:", a capitalised
fragment or one extra space moves accuracy by whole points. So every reader renders the query the
way lm-eval's task YAML / ``utils.py`` does (per benchmark:
:mod:`~llmflow.tasks.evaluate.benchmark_formats`), and builds the continuation the way lm-eval's
``construct_requests`` does: ``target_delimiter`` (" ") + ``doc_to_choice(doc)[i]``
(:mod:`~llmflow.tasks.evaluate.benchmark_items`). ``item.context + item.choices[i]`` is then
lm-eval's request string for option ``i``.

This module reads the files: JSONL (llm-foundry, HF or original schema), the HellaSwag text file
(llama.cpp's 6-lines-an-item form, preprocessed, which keeps the last context fragment
lower-case), PIQA's original release with its labels file, and MMLU's CSV folders; and
:func:`load_task`, the entry point, which picks the reader for a task and path.

Bad records (missing field, gold out of range, empty choice, unknown schema, bad JSON) are
counted per reason in ``TaskData.skipped`` and logged (first few per reason, with file and line);
they never sink a run. A missing file, an unknown task, or a file with no usable record at all is a
``ValueError`` naming it.
"""

from __future__ import annotations

import bz2
import csv
import json
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmflow.tasks.evaluate.benchmark_formats import (
    PARSERS,
    hellaswag_preprocess,
    hellaswag_text_query,
)
from llmflow.tasks.evaluate.benchmark_items import (
    BadRecord,
    ChoiceItem,
    Doc,
    build_items,
    checked_gold,
    checked_options,
    make_item,
    shot_text,
)

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = (
    "hellaswag",
    "arc_easy",
    "arc_challenge",
    "piqa",
    "winogrande",
    "boolq",
    "openbookqa",
    "copa",
    "mmlu",
    "lambada",
)

# lm-eval's metric_list per task (acc_norm divides the summed log-likelihood by the length in
# characters of doc_to_choice, i.e. WITHOUT the target delimiter: see ChoiceItem.norm_lengths).
METRICS: dict[str, tuple[str, ...]] = {
    "hellaswag": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "piqa": ("acc", "acc_norm"),
    "openbookqa": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "boolq": ("acc",),
    "copa": ("acc",),
    "mmlu": ("acc",),
    "lambada": ("perplexity", "acc"),
}

# What each task asks, in a few words (``llmflow evaluate --tasks list``).
DESCRIPTIONS: dict[str, str] = {
    "hellaswag": "everyday scenes: the likely continuation (4 endings)",
    "arc_easy": "grade-school science questions, easy set",
    "arc_challenge": "grade-school science questions, hard set",
    "piqa": "physical commonsense: the better of two solutions",
    "winogrande": "commonsense: which of two names fills a blank",
    "boolq": "yes/no questions about a Wikipedia passage",
    "openbookqa": "elementary science with an open book of facts",
    "copa": "the more plausible cause or effect of a premise",
    "mmlu": "exam questions in 57 subjects (letters A-D)",
    "lambada": "the last word of a passage, from its context",
}

MMLU_DEFAULT_SHOTS = 5


def default_shots(task: str) -> int:
    """lm-eval's shot count for ``task`` when none is asked for: 5 for MMLU, else 0."""
    return MMLU_DEFAULT_SHOTS if task == "mmlu" else 0


MMLU_LETTERS = ("A", "B", "C", "D")
_WARN_PER_REASON = 3


@dataclass
class TaskData:
    """A loaded task: items, per-reason skip counts, and how lm-eval scores it."""

    task: str
    items: list[ChoiceItem]
    skipped: Counter[str]
    metrics: tuple[str, ...]
    output_type: str  # "multiple_choice" or "loglikelihood" (LAMBADA)
    source: str
    num_fewshot: int


# ---------------------------------------------------------------------------------------------
# HellaSwag's text form


def read_hellaswag_text(path: Path, lm_eval_form: bool = True) -> tuple[list[Doc], Counter[str]]:
    """Read the 6-lines-an-item text form (``.txt`` or ``.txt.bz2``).

    Lines: ``activity_label: ctx``, gold index, 4 endings. ``lm_eval_form`` converts the context
    to lm-eval's query (see :func:`hellaswag_text_query`); False keeps the text as on disk
    (llama.cpp's form).
    """
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    docs: list[Doc] = []
    skipped: Counter[str] = Counter()
    for start in range(0, len(lines), 6):
        block = lines[start : start + 6]
        where = f"{path}:{start + 1}"
        try:
            if len(block) < 6:
                raise BadRecord("truncated record (fewer than 6 lines)")
            try:
                gold = int(block[1])
            except ValueError as e:
                raise BadRecord("gold is not an integer") from e
            ctx = block[0]
            if not ctx.strip():
                raise BadRecord("empty context")
            query = hellaswag_text_query(ctx) if lm_eval_form else ctx
            options = [hellaswag_preprocess(e) if lm_eval_form else e for e in block[2:6]]
            docs.append(
                Doc(str(start // 6), query, checked_options(options), checked_gold(gold, 4))
            )
        except BadRecord as e:
            _skip(skipped, str(e), where)
    return docs, skipped


# ---------------------------------------------------------------------------------------------
# JSONL files (records parsed by benchmark_formats.PARSERS)


def iter_jsonl(path: Path, skipped: Counter[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each JSON object line; bad lines are counted and skipped."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                _skip(skipped, "invalid JSON", f"{path}:{lineno}")
                continue
            if not isinstance(rec, dict):
                _skip(skipped, "record is not a JSON object", f"{path}:{lineno}")
                continue
            yield lineno, rec


def read_jsonl_task(
    task: str, path: Path, labels: list[str] | None = None
) -> tuple[list[Doc], Counter[str]]:
    """Parse a task's JSONL file (llm-foundry, HF or original schema, detected per record).

    ``labels`` (PIQA's ``*-labels.lst`` lines) supplies the gold of records without one.
    """
    parse = PARSERS[task]
    skipped: Counter[str] = Counter()
    docs: list[Doc] = []
    for n, (lineno, rec) in enumerate(iter_jsonl(path, skipped)):
        if labels is not None and "label" not in rec:
            if n >= len(labels):
                _skip(skipped, "no label line for record", f"{path}:{lineno}")
                continue
            rec = {**rec, "label": labels[n].strip()}
        try:
            docs.append(parse(rec, str(lineno - 1)))
        except BadRecord as e:
            _skip(skipped, str(e), f"{path}:{lineno}")
    return docs, skipped


def read_piqa_original(jsonl: Path, labels: Path) -> tuple[list[Doc], Counter[str]]:
    """PIQA's original release: ``valid.jsonl`` (goal, sol1, sol2) + ``valid-labels.lst``."""
    _require_file(labels, "piqa")
    return read_jsonl_task("piqa", jsonl, labels.read_text(encoding="utf-8").splitlines())


# ---------------------------------------------------------------------------------------------
# MMLU


def mmlu_description(subject: str, variant: str = "default") -> str:
    """lm-eval's per-subject description (``_generate_configs.py``)."""
    kind = "multiple choice questions" if variant == "default" else "questions"
    return f"The following are {kind} (with answers) about {' '.join(subject.split('_'))}.\n\n"


def read_mmlu_csv(
    path: Path, subject: str, variant: str = "default"
) -> tuple[list[Doc], Counter[str]]:
    """One MMLU CSV: with header ``question,choice0..3,answer`` (answer 0-3) or the original
    headerless Hendrycks form (answer A-D).

    ``variant`` "default" is lm-eval's ``mmlu`` (letters A-D scored after the lettered
    options), "continuation" its ``mmlu_continuation`` (cloze: the option texts are scored).
    """
    skipped: Counter[str] = Counter()
    docs: list[Doc] = []
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if rows and [c.strip().lower() for c in rows[0]][:1] == ["question"]:
        rows = rows[1:]
        first = 2
    else:
        first = 1
    for n, row in enumerate(rows):
        where = f"{path}:{first + n}"
        try:
            if len(row) != 6:
                raise BadRecord("row does not have 6 fields")
            question, *choices, answer = row
            if not question.strip():
                raise BadRecord("missing field 'question'")
            choices = checked_options(choices)
            answer = answer.strip()
            gold = MMLU_LETTERS.index(answer) if answer in MMLU_LETTERS else checked_gold(answer, 4)
            q = question.strip()
            if variant == "default":
                lettered = "".join(
                    f"\n{k}. {c}" for k, c in zip(MMLU_LETTERS, choices, strict=True)
                )
                doc = Doc(f"{subject}/{n}", f"{q}{lettered}\nAnswer:", list(MMLU_LETTERS), gold)
            else:
                doc = Doc(f"{subject}/{n}", f"Question: {q}\nAnswer:", choices, gold)
            docs.append(Doc(doc.id, doc.query, doc.options, doc.gold, subset=subject))
        except BadRecord as e:
            _skip(skipped, str(e), where)
    return docs, skipped


def load_mmlu(
    root: Path,
    num_fewshot: int = MMLU_DEFAULT_SHOTS,
    limit: int | None = None,
    variant: str = "default",
) -> tuple[list[ChoiceItem], Counter[str]]:
    """All subjects under ``root/test`` with k-shot prefixes from ``root/dev`` (lm-eval's
    ``first_n`` sampler: the first k dev questions, in file order). ``limit`` applies per subject,
    as lm-eval's ``--limit`` does per subtask. ``root`` may also be one ``<subject>_test.csv``."""
    if variant not in ("default", "continuation"):
        raise ValueError(f"unknown MMLU variant {variant!r}: use 'default' or 'continuation'")
    if root.is_file():
        tests = [root]
        dev_dir = root.parent.parent / "dev"
    else:
        tests = sorted((root / "test").glob("*_test.csv"))
        dev_dir = root / "dev"
        if not tests:
            raise ValueError(f"mmlu: no test/*_test.csv files under {root}")
    items: list[ChoiceItem] = []
    skipped: Counter[str] = Counter()
    for test in tests:
        subject = test.name.removesuffix("_test.csv")
        docs, bad = read_mmlu_csv(test, subject, variant)
        skipped.update(bad)
        shots: list[Doc] = []
        if num_fewshot > 0:
            dev = dev_dir / f"{subject}_dev.csv"
            _require_file(dev, "mmlu")
            dev_docs, dev_bad = read_mmlu_csv(dev, subject, variant)
            skipped.update({f"dev: {k}": v for k, v in dev_bad.items()})
            if num_fewshot > len(dev_docs):
                raise ValueError(
                    f"mmlu: {num_fewshot} shots asked but {dev} has only {len(dev_docs)} questions"
                )
            shots = dev_docs[:num_fewshot]
        prefix = mmlu_description(subject, variant) + "".join(shot_text(s) for s in shots)
        for doc in docs[:limit] if limit is not None else docs:
            items.append(make_item("mmlu", doc, prefix))
    return items, skipped


# ---------------------------------------------------------------------------------------------
# Entry point


def load_task(
    task: str,
    path: str | Path,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = 1234,
    variant: str | None = None,
) -> TaskData:
    """Read ``task`` from ``path`` into lm-eval-form items.

    ``path``: a JSONL file (llm-foundry, HF or original schema); for HellaSwag also the text form
    (``.txt``/``.txt.bz2``); for PIQA also the original ``valid.jsonl`` (its ``valid-labels.lst``
    beside it is used) or the folder holding both; for MMLU the folder with ``dev/`` and ``test/``.
    ``num_fewshot`` defaults to lm-eval's (5 for MMLU, 0 elsewhere). ``variant``: MMLU "default"
    (letters) or "continuation" (cloze); HellaSwag text form "lm_eval" (default) or "raw".
    """
    if task not in TASKS:
        raise ValueError(f"unknown benchmark task {task!r}; known: {', '.join(TASKS)}")
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{task}: input file {path} does not exist")
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"{task}: num_fewshot must be >= 0, got {num_fewshot}")
    if task == "mmlu":
        shots = MMLU_DEFAULT_SHOTS if num_fewshot is None else num_fewshot
        items, skipped = load_mmlu(path, shots, limit, variant or "default")
        return _finish(task, items, skipped, path, shots)

    shots = num_fewshot or 0
    if task == "hellaswag" and path.name.endswith((".txt", ".txt.bz2")):
        if variant not in (None, "lm_eval", "raw"):
            raise ValueError(f"unknown HellaSwag variant {variant!r}: use 'lm_eval' or 'raw'")
        docs, skipped = read_hellaswag_text(path, lm_eval_form=variant != "raw")
    elif task == "piqa" and (path.is_dir() or _labels_beside(path).is_file()):
        jsonl = path / "valid.jsonl" if path.is_dir() else path
        _require_file(jsonl, task)
        docs, skipped = read_piqa_original(jsonl, _labels_beside(jsonl))
    else:
        if not path.is_file():
            raise ValueError(f"{task}: {path} is not a file")
        docs, skipped = read_jsonl_task(task, path)
    return _finish(task, build_items(task, docs, shots, limit, seed), skipped, path, shots)


def _finish(
    task: str, items: list[ChoiceItem], skipped: Counter[str], path: Path, shots: int
) -> TaskData:
    if not items:
        reasons = ", ".join(f"{r} x{n}" for r, n in skipped.most_common(3)) or "empty input"
        raise ValueError(f"{task}: no usable record in {path} ({reasons})")
    output_type = "loglikelihood" if task == "lambada" else "multiple_choice"
    return TaskData(task, items, skipped, METRICS[task], output_type, str(path), shots)


# ---------------------------------------------------------------------------------------------
# Small validators


def _labels_beside(jsonl: Path) -> Path:
    return jsonl.with_name(jsonl.stem + "-labels.lst")


def _require_file(path: Path, task: str) -> None:
    if not path.is_file():
        raise ValueError(f"{task}: input file {path} does not exist")


def _skip(skipped: Counter[str], reason: str, where: str) -> None:
    skipped[reason] += 1
    if skipped[reason] <= _WARN_PER_REASON:
        log.warning("skipping benchmark record %s: %s", where, reason)
