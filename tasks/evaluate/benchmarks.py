"""Benchmark readers: published benchmark files -> items with lm-evaluation-harness's prompts.

The evaluator scores a multiple-choice item by the log-likelihood of each continuation given its
context, exactly as lm-evaluation-harness (lm-eval) does. Its numbers are only comparable with
lm-eval's when the strings are the same to the character: a missing "\\nAnswer:", a capitalised
fragment or one extra space moves accuracy by whole points. So every reader here renders the
query the way lm-eval's task YAML / ``utils.py`` does (checked against lm-eval's main branch,
``lm_eval/tasks/<task>/``), and builds the continuation the way lm-eval's ``construct_requests``
does: ``target_delimiter`` (" ") + ``doc_to_choice(doc)[i]``. ``item.context + item.choices[i]``
is then lm-eval's request string for option ``i``.

The files on disk are not lm-eval's HF datasets. The llm-foundry JSONL files have their own
schemas (already rendered ``query`` strings with other conventions: "Passage: ...", a COPA comma,
no "\\nAnswer:"), the HellaSwag text file (llama.cpp's 6-lines-an-item form) is preprocessed and
keeps the last context fragment lower-case. Each reader converts those back to lm-eval's form and
also accepts the original/HF schemas, detected by their keys.

Item shapes (one type, :class:`ChoiceItem`, so one scoring engine serves every task):

* multiple choice (most tasks): shared ``context``, one continuation per option in ``choices``.
* partial evaluation (WinoGrande): lm-eval puts the options in the CONTEXT ("Sarah was ... so
  Maria") and scores one shared continuation (" always got the harder cases."). Such items set
  ``contexts`` (one full context per option) and ``choices`` holds the single shared
  continuation; ``context`` is then the shared few-shot prefix only. Use :meth:`ChoiceItem.requests`
  to get the (context, continuation) pairs in either case.
* LAMBADA (``output_type: loglikelihood`` in lm-eval): one choice, gold 0; the context is the text
  without its last word and the continuation " " + last word. Its metrics are perplexity and
  whether the continuation is the model's greedy output, not an argmax over options.

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
import random
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter
MMLU_DEFAULT_SHOTS = 5
MMLU_LETTERS = ("A", "B", "C", "D")
_WARN_PER_REASON = 3


@dataclass(frozen=True)
class ChoiceItem:
    """One benchmark item as lm-eval scores it.

    ``choices`` are continuations exactly as lm-eval requests them (leading target delimiter
    included), so ``context + choices[i]`` is lm-eval's string for option ``i``. For partial
    evaluation (WinoGrande) ``contexts`` holds one context per option and ``choices`` the one
    shared continuation; see :meth:`requests`.
    """

    task: str
    id: str
    context: str
    choices: list[str]
    gold: int
    contexts: list[str] | None = None
    # length lm-eval divides by for acc_norm: len(doc_to_choice[i]) (no target delimiter)
    norm_lengths: list[int] = field(default_factory=list)
    subset: str = ""  # MMLU subject; "" elsewhere

    @property
    def num_options(self) -> int:
        return len(self.contexts) if self.contexts is not None else len(self.choices)

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per option: what the scorer must score, in option order."""
        if self.contexts is not None:
            return [(ctx, self.choices[0]) for ctx in self.contexts]
        return [(self.context, choice) for choice in self.choices]


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


@dataclass(frozen=True)
class Doc:
    """One parsed record in lm-eval's terms, before few-shot prefixing.

    ``query`` is doc_to_text, ``options`` doc_to_choice (no delimiter), ``gold`` doc_to_target.
    For partial items ``options`` are the per-option contexts and ``target`` the shared
    continuation text (no delimiter); for LAMBADA ``target`` is " " + last word and options is
    empty.
    """

    id: str
    query: str
    options: list[str]
    gold: int
    target: str = ""
    partial: bool = False
    subset: str = ""


class BadRecord(Exception):
    """A record that cannot become an item; the message is the skip reason (a short category)."""


# ---------------------------------------------------------------------------------------------
# HellaSwag


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: WikiHow bracket markup out, " [title]" -> ". "."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def hellaswag_query(activity_label: str, ctx_a: str, ctx_b: str) -> str:
    """lm-eval's HellaSwag query: ``activity_label: ctx_a Ctx_b`` (Python capitalize, which also
    lower-cases the rest of ctx_b), then preprocessed."""
    return hellaswag_preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())


_SENTENCE_END = re.compile(r"[.!?] ")


def hellaswag_text_query(line: str) -> str:
    """Turn a text-form context line (``label: ctx_a ctx_b``, ctx_b left lower-case) into lm-eval's
    query.

    The text form has lost the ctx_a/ctx_b boundary. ctx_b is the unfinished sentence the endings
    complete: ActivityNet items have a lower-case one ("... on a roof. he"), WikiHow items mostly
    an empty one. So the fragment after the last sentence end is re-capitalised (Python
    ``str.capitalize``, as lm-eval does) when it starts lower-case; otherwise the line is kept.
    """
    head, sep, ctx = line.partition(": ")
    if sep:
        ends = list(_SENTENCE_END.finditer(ctx))
        if ends:
            start = ends[-1].end()
            fragment = ctx[start:]
            if fragment[:1].islower():
                ctx = ctx[:start] + fragment.capitalize()
        line = head + sep + ctx
    return hellaswag_preprocess(line)


def _hellaswag_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"ctx_a", "ctx_b", "endings"} <= rec.keys():
        query = hellaswag_query(_text(rec, "activity_label"), _text(rec, "ctx_a"), rec["ctx_b"])
        endings = rec["endings"]
    elif {"query", "choices", "gold"} <= rec.keys():  # llm-foundry: query "label: ctx"
        query = hellaswag_text_query(_text(rec, "query"))
        endings = rec["choices"]
    else:
        raise BadRecord(_no_schema(rec))
    options = [hellaswag_preprocess(e) if isinstance(e, str) else e for e in _options(endings)]
    gold_raw = rec.get("label", rec.get("gold"))
    return Doc(idx, query, options, _gold(gold_raw, len(options)))


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
            docs.append(Doc(str(start // 6), query, _options(options), _gold(gold, 4)))
        except BadRecord as e:
            _skip(skipped, str(e), where)
    return docs, skipped


# ---------------------------------------------------------------------------------------------
# Per-task record parsers (JSONL, schema detected by keys)


def _arc_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"query", "choices", "gold"} <= rec.keys():  # llm-foundry: query "Question: <q>"
        query = _text(rec, "query")
        if not query.startswith("Question: "):
            raise BadRecord("llm-foundry ARC query lacks the 'Question: ' prefix")
        options = _options(rec["choices"])
        return Doc(idx, query + "\nAnswer:", options, _gold(rec["gold"], len(options)))
    question, options, labels = _question_and_choices(rec)
    return Doc(idx, f"Question: {question}\nAnswer:", options, _answer_key(rec, labels))


def _openbookqa_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"query", "choices", "gold"} <= rec.keys():  # llm-foundry: query is question_stem
        options = _options(rec["choices"])
        return Doc(idx, _text(rec, "query"), options, _gold(rec["gold"], len(options)))
    question, options, labels = _question_and_choices(rec)
    return Doc(idx, question, options, _answer_key(rec, labels))


def _question_and_choices(rec: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """ARC/OpenBookQA HF schema (question|question_stem, choices{text,label}) or the original
    AI2 schema (question{stem, choices[{text,label}]})."""
    texts: Any  # the record's values, checked below
    labels: Any
    q = rec.get("question")
    if isinstance(q, dict) and "stem" in q and "choices" in q:  # original AI2 JSONL
        stem = q["stem"]
        choices = q["choices"]
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise BadRecord("choices is not a list of {text, label}")
        texts = [c.get("text") for c in choices]
        labels = [c.get("label") for c in choices]
    elif (
        "choices" in rec
        and isinstance(rec["choices"], dict)
        and ("question" in rec or "question_stem" in rec)
    ):
        stem = rec.get("question_stem", rec.get("question"))
        texts = rec["choices"].get("text")
        labels = rec["choices"].get("label")
    else:
        raise BadRecord(_no_schema(rec))
    if not isinstance(stem, str) or not stem.strip():
        raise BadRecord("missing field 'question'")
    if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
        raise BadRecord("choices text/label missing or of different lengths")
    return stem, _options(texts), [str(x) for x in labels]


def _answer_key(rec: dict[str, Any], labels: list[str]) -> int:
    key = rec.get("answerKey")
    if not isinstance(key, str) or not key.strip():
        raise BadRecord("missing field 'answerKey'")
    key = key.lstrip()  # lm-eval: choices.label.index(answerKey.lstrip())
    if key not in labels:
        raise BadRecord("gold out of range")
    return labels.index(key)


def _piqa_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"query", "choices", "gold"} <= rec.keys():  # llm-foundry: query "Question: <goal>\n"
        query = _text(rec, "query")
        if not query.startswith("Question: ") or not query.endswith("\n"):
            raise BadRecord("llm-foundry PIQA query is not 'Question: <goal>\\n'")
        options = _options(rec["choices"])
        return Doc(idx, query + "Answer:", options, _gold(rec["gold"], len(options)))
    if {"goal", "sol1", "sol2"} <= rec.keys():
        options = _options([rec["sol1"], rec["sol2"]])
        if "label" not in rec:
            raise BadRecord("missing field 'label' (original PIQA: labels in *-labels.lst)")
        return Doc(idx, f"Question: {_text(rec, 'goal')}\nAnswer:", options, _gold(rec["label"], 2))
    raise BadRecord(_no_schema(rec))


def _winogrande_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"context_options", "continuation", "gold"} <= rec.keys():  # llm-foundry
        options = _options(rec["context_options"])
        target = _text(rec, "continuation").strip()
        return Doc(idx, "", options, _gold(rec["gold"], len(options)), target, partial=True)
    if {"sentence", "option1", "option2", "answer"} <= rec.keys():  # HF / original
        sentence = _text(rec, "sentence")
        if sentence.count("_") < 1:
            raise BadRecord("sentence has no '_' blank")
        cut = sentence.index("_")
        options = _options([sentence[:cut] + rec["option1"], sentence[:cut] + rec["option2"]])
        answer = str(rec["answer"])
        if answer not in ("1", "2"):
            raise BadRecord("gold out of range")
        target = sentence[cut + 1 :].strip()
        if not target:
            raise BadRecord("empty choice")
        return Doc(idx, "", options, int(answer) - 1, target, partial=True)
    raise BadRecord(_no_schema(rec))


def _boolq_doc(rec: dict[str, Any], idx: str) -> Doc:
    options = ["no", "yes"]
    if {"query", "choices", "gold"} <= rec.keys():  # llm-foundry "Passage: P\nQuestion: Q?"
        query = _text(rec, "query")
        if not query.startswith("Passage: ") or "\nQuestion: " not in query:
            raise BadRecord("llm-foundry BoolQ query is not 'Passage: ...\\nQuestion: ...'")
        if rec["choices"] != options:
            raise BadRecord("BoolQ choices are not ['no', 'yes']")
        return Doc(idx, query[len("Passage: ") :] + "\nAnswer:", options, _gold(rec["gold"], 2))
    if {"passage", "question"} <= rec.keys() and ("label" in rec or "answer" in rec):
        if "label" in rec:
            gold = _gold(rec["label"], 2)
        elif isinstance(rec["answer"], bool):  # original BoolQ: answer true/false
            gold = int(rec["answer"])
        else:
            raise BadRecord("BoolQ answer is not a boolean")
        query = f"{_text(rec, 'passage')}\nQuestion: {_text(rec, 'question')}?\nAnswer:"
        return Doc(idx, query, options, gold)
    raise BadRecord(_no_schema(rec))


def _copa_lower_first(choice: str) -> str:
    return choice[0].lower() + choice[1:]


def _copa_doc(rec: dict[str, Any], idx: str) -> Doc:
    # lm-eval: premise without its final period + " because|therefore"; choices
    # " " + first letter lower-cased (then the target delimiter adds another space).
    if {"query", "choices", "gold"} <= rec.keys():  # llm-foundry "Premise body, connector"
        query = _text(rec, "query")
        body, sep, connector = query.rpartition(", ")
        if not sep or connector not in ("because", "therefore"):
            raise BadRecord("llm-foundry COPA query does not end in ', because|therefore'")
        choices = _options(rec["choices"])
        options = [" " + _copa_lower_first(c) for c in choices]
        return Doc(idx, f"{body} {connector}", options, _gold(rec["gold"], len(options)))
    if {"premise", "choice1", "choice2", "question", "label"} <= rec.keys():
        word = {"cause": "because", "effect": "therefore"}.get(rec["question"])
        if word is None:
            raise BadRecord("COPA question is not cause/effect")
        choices = _options([rec["choice1"], rec["choice2"]])
        options = [" " + _copa_lower_first(c) for c in choices]
        query = _text(rec, "premise").strip()[:-1] + f" {word}"
        return Doc(idx, query, options, _gold(rec["label"], 2))
    raise BadRecord(_no_schema(rec))


def lambada_split(text: str) -> tuple[str, str]:
    """lm-eval's lambada_openai: context = all but the last ' '-separated word, target ' ' + it."""
    words = text.split(" ")
    if len(words) < 2 or not words[-1]:
        raise BadRecord("text has no last word")
    return " ".join(words[:-1]), " " + words[-1]


def _lambada_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"context", "continuation"} <= rec.keys():  # llm-foundry
        context, cont = _text(rec, "context"), _text(rec, "continuation")
        # rebuild the passage, then split it as lm-eval does (one foundry item has "\n\nword")
        text = context + cont if cont[:1].isspace() else context + " " + cont
    elif "text" in rec:
        text = _text(rec, "text")
    else:
        raise BadRecord(_no_schema(rec))
    query, target = lambada_split(text)
    return Doc(idx, query, [], 0, target)


_PARSERS = {
    "hellaswag": _hellaswag_doc,
    "arc_easy": _arc_doc,
    "arc_challenge": _arc_doc,
    "piqa": _piqa_doc,
    "winogrande": _winogrande_doc,
    "boolq": _boolq_doc,
    "openbookqa": _openbookqa_doc,
    "copa": _copa_doc,
    "lambada": _lambada_doc,
}


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
    parse = _PARSERS[task]
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
            choices = _options(choices)
            answer = answer.strip()
            gold = MMLU_LETTERS.index(answer) if answer in MMLU_LETTERS else _gold(answer, 4)
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
        prefix = mmlu_description(subject, variant) + "".join(_shot_text(s) for s in shots)
        for doc in docs[:limit] if limit is not None else docs:
            items.append(_item("mmlu", doc, prefix))
    return items, skipped


# ---------------------------------------------------------------------------------------------
# Few-shot and item assembly


def _shot_text(doc: Doc) -> str:
    """A solved example as lm-eval renders it: question, target delimiter, answer, "\\n\\n"."""
    if doc.partial:  # multiple input: the gold context, then the shared target
        return doc.options[doc.gold] + TARGET_DELIMITER + doc.target + FEWSHOT_DELIMITER
    answer = doc.options[doc.gold] if doc.options else doc.target
    return doc.query + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER


def _item(task: str, doc: Doc, prefix: str) -> ChoiceItem:
    if doc.partial:
        return ChoiceItem(
            task=task,
            id=doc.id,
            context=prefix,
            choices=[TARGET_DELIMITER + doc.target],
            gold=doc.gold,
            contexts=[prefix + option for option in doc.options],
            norm_lengths=[len(doc.target)] * len(doc.options),
            subset=doc.subset,
        )
    if not doc.options:  # loglikelihood (LAMBADA): the target carries its own space
        return ChoiceItem(
            task, doc.id, prefix + doc.query, [doc.target], 0, None, [len(doc.target)], doc.subset
        )
    return ChoiceItem(
        task=task,
        id=doc.id,
        context=prefix + doc.query,
        choices=[TARGET_DELIMITER + option for option in doc.options],
        gold=doc.gold,
        norm_lengths=[len(option) for option in doc.options],
        subset=doc.subset,
    )


def build_items(
    task: str, docs: list[Doc], num_fewshot: int = 0, limit: int | None = None, seed: int = 1234
) -> list[ChoiceItem]:
    """Docs -> items, with ``num_fewshot`` solved examples before each.

    lm-eval draws these tasks' shots from the TRAIN split, which these files do not have; here
    they come from the same file, drawn as lm-eval does when the shot split is the eval split:
    one ``random.Random(seed)`` per task, ``sample(pool, k + 1)`` per item in order, the item
    itself removed. The prompt FORM matches lm-eval; the chosen shots cannot.
    """
    rnd = random.Random(seed)
    selected = docs[:limit] if limit is not None else docs
    items = []
    for doc in selected:
        prefix = ""
        if num_fewshot > 0:
            if len(docs) <= num_fewshot:
                raise ValueError(f"{task}: {num_fewshot} shots asked but only {len(docs)} items")
            shots = [d for d in rnd.sample(docs, num_fewshot + 1) if d is not doc][:num_fewshot]
            prefix = "".join(_shot_text(s) for s in shots)
        items.append(_item(task, doc, prefix))
    return items


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


def _text(rec: dict[str, Any], key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"missing field '{key}'")
    return value


def _options(values: Any) -> list[str]:
    if not isinstance(values, list) or len(values) < 2:
        raise BadRecord("fewer than 2 choices")
    if not all(isinstance(v, str) for v in values):
        raise BadRecord("choice is not a string")
    if any(not v.strip() for v in values):
        raise BadRecord("empty choice")
    return list(values)


def _gold(value: Any, n: int) -> int:
    if value is None or value == "":
        raise BadRecord("missing gold")
    if isinstance(value, bool):
        raise BadRecord("gold is not an integer")
    try:
        gold = int(value)
    except (TypeError, ValueError) as e:
        raise BadRecord("gold is not an integer") from e
    if not 0 <= gold < n:
        raise BadRecord("gold out of range")
    return gold


def _no_schema(rec: dict[str, Any]) -> str:
    return f"record fits no known schema (keys: {', '.join(sorted(rec))})"


def _skip(skipped: Counter[str], reason: str, where: str) -> None:
    skipped[reason] += 1
    if skipped[reason] <= _WARN_PER_REASON:
        log.warning("skipping benchmark record %s: %s", where, reason)
