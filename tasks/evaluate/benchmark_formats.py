"""Benchmark formats: one record of each benchmark -> lm-eval's prompt for it, as a :class:`Doc`.

lm-eval's numbers are only comparable with ours when the strings are the same to the character,
so each parser here renders the query the way lm-eval's task YAML / ``utils.py`` does (checked
against lm-eval's main branch, ``lm_eval/tasks/<task>/``). The files on disk are not lm-eval's HF
datasets: the llm-foundry JSONL records carry already rendered ``query`` strings with other
conventions ("Passage: ...", a COPA comma, no "\\nAnswer:"), which each parser converts back to
lm-eval's form; it also accepts the original/HF schemas, detected by their keys. A record that
fits no schema, or lacks a field, raises :class:`~llmflow.tasks.evaluate.benchmark_items.BadRecord`
with the skip reason. MMLU's CSV rows are rendered where they are read
(:func:`~llmflow.tasks.evaluate.benchmarks.read_mmlu_csv`).
"""

from __future__ import annotations

import re
from typing import Any

from llmflow.tasks.evaluate.benchmark_items import BadRecord, Doc, checked_gold, checked_options

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
    options = [
        hellaswag_preprocess(e) if isinstance(e, str) else e for e in checked_options(endings)
    ]
    gold_raw = rec.get("label", rec.get("gold"))
    return Doc(idx, query, options, checked_gold(gold_raw, len(options)))


# ---------------------------------------------------------------------------------------------
# Per-task record parsers (JSONL, schema detected by keys)


def _arc_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"query", "choices", "gold"} <= rec.keys():  # llm-foundry: query "Question: <q>"
        query = _text(rec, "query")
        if not query.startswith("Question: "):
            raise BadRecord("llm-foundry ARC query lacks the 'Question: ' prefix")
        options = checked_options(rec["choices"])
        return Doc(idx, query + "\nAnswer:", options, checked_gold(rec["gold"], len(options)))
    question, options, labels = _question_and_choices(rec)
    return Doc(idx, f"Question: {question}\nAnswer:", options, _answer_key(rec, labels))


def _openbookqa_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"query", "choices", "gold"} <= rec.keys():  # llm-foundry: query is question_stem
        options = checked_options(rec["choices"])
        return Doc(idx, _text(rec, "query"), options, checked_gold(rec["gold"], len(options)))
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
    return stem, checked_options(texts), [str(x) for x in labels]


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
        options = checked_options(rec["choices"])
        return Doc(idx, query + "Answer:", options, checked_gold(rec["gold"], len(options)))
    if {"goal", "sol1", "sol2"} <= rec.keys():
        options = checked_options([rec["sol1"], rec["sol2"]])
        if "label" not in rec:
            raise BadRecord("missing field 'label' (original PIQA: labels in *-labels.lst)")
        return Doc(
            idx, f"Question: {_text(rec, 'goal')}\nAnswer:", options, checked_gold(rec["label"], 2)
        )
    raise BadRecord(_no_schema(rec))


def _winogrande_doc(rec: dict[str, Any], idx: str) -> Doc:
    if {"context_options", "continuation", "gold"} <= rec.keys():  # llm-foundry
        options = checked_options(rec["context_options"])
        target = _text(rec, "continuation").strip()
        return Doc(idx, "", options, checked_gold(rec["gold"], len(options)), target, partial=True)
    if {"sentence", "option1", "option2", "answer"} <= rec.keys():  # HF / original
        sentence = _text(rec, "sentence")
        if sentence.count("_") < 1:
            raise BadRecord("sentence has no '_' blank")
        cut = sentence.index("_")
        options = checked_options(
            [sentence[:cut] + rec["option1"], sentence[:cut] + rec["option2"]]
        )
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
        return Doc(
            idx, query[len("Passage: ") :] + "\nAnswer:", options, checked_gold(rec["gold"], 2)
        )
    if {"passage", "question"} <= rec.keys() and ("label" in rec or "answer" in rec):
        if "label" in rec:
            gold = checked_gold(rec["label"], 2)
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
        choices = checked_options(rec["choices"])
        options = [" " + _copa_lower_first(c) for c in choices]
        return Doc(idx, f"{body} {connector}", options, checked_gold(rec["gold"], len(options)))
    if {"premise", "choice1", "choice2", "question", "label"} <= rec.keys():
        word = {"cause": "because", "effect": "therefore"}.get(rec["question"])
        if word is None:
            raise BadRecord("COPA question is not cause/effect")
        choices = checked_options([rec["choice1"], rec["choice2"]])
        options = [" " + _copa_lower_first(c) for c in choices]
        query = _text(rec, "premise").strip()[:-1] + f" {word}"
        return Doc(idx, query, options, checked_gold(rec["label"], 2))
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


PARSERS = {
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


# ---------------------------------------------------------------------------------------------
# Record field checks


def _text(rec: dict[str, Any], key: str) -> str:
    value = rec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BadRecord(f"missing field '{key}'")
    return value


def _no_schema(rec: dict[str, Any]) -> str:
    return f"record fits no known schema (keys: {', '.join(sorted(rec))})"
