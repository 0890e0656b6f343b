"""Benchmark items: the one item type every task becomes, and lm-eval's few-shot prompt assembly.

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

Readers (:mod:`~llmflow.tasks.evaluate.benchmark_formats` for one record of each benchmark,
:mod:`~llmflow.tasks.evaluate.benchmarks` for whole files) first parse records into a :class:`Doc`,
lm-eval's view of a record, rejecting bad ones with :class:`BadRecord`; :func:`build_items` then
adds the few-shot prefix and the target delimiter exactly as lm-eval's ``construct_requests`` does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

TARGET_DELIMITER = " "  # lm-eval's default target_delimiter
FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default fewshot_delimiter


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
# Field checks shared by every reader


def checked_options(values: Any) -> list[str]:
    """The record's options, or :class:`BadRecord` when an item could not be scored fairly with
    them (fewer than two, not strings, or an empty one)."""
    if not isinstance(values, list) or len(values) < 2:
        raise BadRecord("fewer than 2 choices")
    if not all(isinstance(v, str) for v in values):
        raise BadRecord("choice is not a string")
    if any(not v.strip() for v in values):
        raise BadRecord("empty choice")
    return list(values)


def checked_gold(value: Any, n: int) -> int:
    """The gold option's index, or :class:`BadRecord` when it is missing, not an integer (a bool
    is refused, though ``int(True)`` works) or not one of the ``n`` options."""
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


# ---------------------------------------------------------------------------------------------
# Few-shot and item assembly


def shot_text(doc: Doc) -> str:
    """A solved example as lm-eval renders it: question, target delimiter, answer, "\\n\\n"."""
    if doc.partial:  # multiple input: the gold context, then the shared target
        return doc.options[doc.gold] + TARGET_DELIMITER + doc.target + FEWSHOT_DELIMITER
    answer = doc.options[doc.gold] if doc.options else doc.target
    return doc.query + TARGET_DELIMITER + answer + FEWSHOT_DELIMITER


def make_item(task: str, doc: Doc, prefix: str) -> ChoiceItem:
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
            prefix = "".join(shot_text(s) for s in shots)
        items.append(make_item(task, doc, prefix))
    return items
