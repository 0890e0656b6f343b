"""Benchmark readers against lm-evaluation-harness's prompt definitions.

Expected strings are written from lm-eval's task YAML / utils.py (quoted beside each), not copied
from the reader's output: ARC ``"Question: {{question}}\\nAnswer:"``, PIQA
``"Question: {{goal}}\\nAnswer:"``, BoolQ ``"{{passage}}\\nQuestion: {{question}}?\\nAnswer:"``,
COPA ``premise.strip()[:-1] + " because|therefore"`` with choices ``" " + lower-first``, HellaSwag
``preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())``, WinoGrande partial
evaluation, MMLU's description + first-n dev shots, LAMBADA's ``text.split(' ')``. Every
continuation carries lm-eval's target delimiter " ".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmflow.tasks.evaluate.benchmark_formats import (
    hellaswag_preprocess,
    hellaswag_query,
    hellaswag_text_query,
)
from llmflow.tasks.evaluate.benchmarks import TASKS, load_task


@pytest.fixture(scope="module")
def bench(shared_data: Path) -> Path:
    path = shared_data / "benchmarks"
    if not path.is_dir():
        pytest.skip(f"benchmark data not found at {path}")
    return path


def write_jsonl(path: Path, records: list[object], raw_lines: list[str] = ()) -> Path:
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- HellaSwag --------------------------------------------------------------------------------


def test_hellaswag_preprocess_hand_made() -> None:
    # strip first, " [title]" -> ". ", any [..] removed, "  " -> " " once; no strip afterwards
    assert hellaswag_preprocess("  [header] How to x [title] Do y. [step] Z  ") == (
        " How to x. Do y. Z"
    )
    assert hellaswag_preprocess("no markup here") == "no markup here"
    # Python str.capitalize also lower-cases the rest of ctx_b, as lm-eval's does
    assert (
        hellaswag_query("Label", "A sentence.", "the TV shows") == "Label: A sentence. The tv shows"
    )
    # a WikiHow item (ctx_b empty): the known lm-eval rendering keeps the ".." artefacts
    ctx_a = (
        "[header] How to make a liquid into a solid [title] Place a small open container of water"
        " in the freezer compartment of a class or home refrigerator. [title] Leave the water"
        " there for several hours or overnight. [title] Remove from the freezer and note what"
        " has occurred."
    )
    assert hellaswag_query("Education and Communications", ctx_a, "") == (
        "Education and Communications: How to make a liquid into a solid. Place a small open"
        " container of water in the freezer compartment of a class or home refrigerator.. Leave"
        " the water there for several hours or overnight.. Remove from the freezer and note what"
        " has occurred."
    )


def test_hellaswag_text_query_recapitalizes_only_a_lower_case_last_fragment() -> None:
    assert hellaswag_text_query("Clean and jerk: A lady walks. the lady") == (
        "Clean and jerk: A lady walks. The lady"
    )
    kept = "Health: How to use oils. Know what oils help. Basil works."
    assert hellaswag_text_query(kept) == kept


def test_hellaswag_text_form_first_item(bench: Path) -> None:
    data = load_task("hellaswag", bench / "hellaswag" / "hellaswag_val_full.txt.bz2")
    assert len(data.items) == 10042 and not data.skipped
    assert data.metrics == ("acc", "acc_norm")
    first = data.items[0]
    # HF row: activity_label "Roof shingle removal", ctx_a "A man is sitting on a roof.", ctx_b "he"
    assert first.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert first.choices == [
        " is using wrap to wrap a pair of skis.",
        " is ripping level tiles off.",
        " is holding a rubik's cube.",
        " starts pulling up roofing on a roof.",
    ]
    assert first.gold == 3
    assert first.norm_lengths == [len(c) - 1 for c in first.choices]  # acc_norm: no delimiter
    second = data.items[1]
    assert second.context == (
        "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"
    )
    raw = load_task("hellaswag", bench / "hellaswag" / "hellaswag_val_full.txt.bz2", variant="raw")
    assert raw.items[0].context == "Roof shingle removal: A man is sitting on a roof. he"


def test_hellaswag_hf_jsonl_matches_text_form(tmp_path: Path) -> None:
    rec = {
        "activity_label": "Roof shingle removal",
        "ctx_a": "A man is sitting on a roof.",
        "ctx_b": "he",
        "endings": ["is using wrap.", "is ripping tiles off.", "is holding a cube.", "starts [x]."],
        "label": "3",
    }
    data = load_task("hellaswag", write_jsonl(tmp_path / "hs.jsonl", [rec]))
    item = data.items[0]
    assert item.context == "Roof shingle removal: A man is sitting on a roof. He"
    assert item.choices[3] == " starts ." and item.gold == 3


# --- ARC, OpenBookQA, PIQA, BoolQ, COPA ----------------------------------------------------------


def test_arc_easy_and_challenge_first_items(bench: Path) -> None:
    easy = load_task("arc_easy", bench / "llm-foundry" / "arc_easy.jsonl")
    assert len(easy.items) == 2376
    item = easy.items[0]
    assert item.context == (
        "Question: Which statement best explains why photosynthesis is the foundation of most"
        " food webs?\nAnswer:"
    )
    assert item.choices[0] == " Sunlight is the source of energy for nearly all ecosystems."
    assert item.gold == 0
    hard = load_task("arc_challenge", bench / "llm-foundry" / "arc_challenge.jsonl")
    assert hard.items[0].context.startswith("Question: An astronomer observes")
    assert hard.items[0].context.endswith("increase in rotation?\nAnswer:")
    assert hard.items[0].gold == 2


def test_arc_hf_and_original_schemas(tmp_path: Path) -> None:
    hf = {
        "id": "x",
        "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam", "rock"], "label": ["1", "2", "3"]},
        "answerKey": "2",
    }
    original = {
        "id": "y",
        "question": {
            "stem": "Which is a gas?",
            "choices": [{"text": "ice", "label": "A"}, {"text": "steam", "label": "B"}],
        },
        "answerKey": "B",
    }
    items = load_task("arc_easy", write_jsonl(tmp_path / "arc.jsonl", [hf, original])).items
    for item in items:
        assert item.context == "Question: Which is a gas?\nAnswer:"
        assert item.choices[:2] == [" ice", " steam"] and item.gold == 1


def test_openbookqa_first_item(bench: Path) -> None:
    item = load_task("openbookqa", bench / "llm-foundry" / "openbook_qa.jsonl").items[0]
    # doc_to_text: question_stem, nothing added
    assert item.context == (
        "A person wants to start saving money so that they can afford a nice vacation at the end"
        " of the year. After looking over their budget and expenses, they decide the best way to"
        " save money is to"
    )
    assert item.choices[1] == " quit eating lunch out" and item.gold == 1


def test_piqa_original_files_and_foundry(bench: Path) -> None:
    data = load_task("piqa", bench / "piqa" / "valid.jsonl")
    assert len(data.items) == 1838 and not data.skipped
    first, second = data.items[:2]
    assert (
        first.context
        == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert first.choices[0].startswith(" Provide the guinea pig with a cage full")
    assert first.gold == 0  # valid-labels.lst line 1
    assert second.context == "Question: dresser\nAnswer:"
    # lm-eval uses sol1/sol2 verbatim: the original's trailing space stays
    assert second.choices == [
        " replace drawer with bobby pin ",
        " finish, woodgrain with  bobby pin ",
    ]
    assert second.gold == 1
    foundry = load_task("piqa", bench / "llm-foundry" / "piqa.jsonl")
    assert [i.context for i in foundry.items] == [i.context for i in data.items]
    assert [i.gold for i in foundry.items] == [i.gold for i in data.items]
    # the foundry file stripped the choices
    assert foundry.items[1].choices[0] == " replace drawer with bobby pin"


def test_boolq_first_item_and_hf_schema(bench: Path, tmp_path: Path) -> None:
    item = load_task("boolq", bench / "llm-foundry" / "boolq.jsonl").items[0]
    assert item.context.startswith("All biomass goes through at least some of these steps")
    assert item.context.endswith(
        "than producing gasoline.\nQuestion: does ethanol take more energy make that produces?"
        "\nAnswer:"
    )
    assert item.choices == [" no", " yes"] and item.gold == 0
    hf = {"passage": "Water is wet.", "question": "is water wet", "label": 1}
    original = {"passage": "Water is wet.", "question": "is water wet", "answer": True}
    items = load_task("boolq", write_jsonl(tmp_path / "b.jsonl", [hf, original])).items
    for it in items:
        assert it.context == "Water is wet.\nQuestion: is water wet?\nAnswer:" and it.gold == 1


def test_copa_first_item_and_hf_schema(bench: Path, tmp_path: Path) -> None:
    item = load_task("copa", bench / "llm-foundry" / "copa.jsonl").items[0]
    # lm-eval: "The man turned on the faucet." -> drop the period, add " therefore"
    assert item.context == "The man turned on the faucet therefore"
    # doc_to_choice " " + lower-first, then the target delimiter " ": two spaces
    assert item.choices == ["  the toilet filled with water.", "  water flowed from the spout."]
    assert item.norm_lengths == [
        len(" the toilet filled with water."),
        len(" water flowed from the spout."),
    ]
    assert item.gold == 1
    hf = {
        "premise": "The man turned on the faucet.",
        "choice1": "The toilet filled with water.",
        "choice2": "Water flowed from the spout.",
        "question": "effect",
        "label": 1,
    }
    same = load_task("copa", write_jsonl(tmp_path / "c.jsonl", [hf])).items[0]
    assert (same.context, same.choices, same.gold) == (item.context, item.choices, item.gold)


# --- WinoGrande (partial evaluation) ------------------------------------------------------------


def test_winogrande_partial_items(bench: Path, tmp_path: Path) -> None:
    data = load_task("winogrande", bench / "llm-foundry" / "winogrande.jsonl")
    assert len(data.items) == 1267 and data.metrics == ("acc",)
    item = data.items[0]
    assert item.contexts == [
        "Sarah was a much better surgeon than Maria so Sarah",
        "Sarah was a much better surgeon than Maria so Maria",
    ]
    assert item.choices == [" always got the easier cases."] and item.gold == 1
    assert item.requests()[1] == (item.contexts[1], " always got the easier cases.")
    assert item.num_options == 2
    hf = {
        "sentence": "Sarah was a much better surgeon than Maria so _ always got the easier cases.",
        "option1": "Sarah",
        "option2": "Maria",
        "answer": "2",
    }
    same = load_task("winogrande", write_jsonl(tmp_path / "w.jsonl", [hf])).items[0]
    assert (same.contexts, same.choices, same.gold) == (item.contexts, item.choices, item.gold)


# --- MMLU ---------------------------------------------------------------------------------------


def test_mmlu_five_shot_prompt_shape(bench: Path) -> None:
    data = load_task("mmlu", bench / "mmlu")
    assert len(data.items) == 14042 and data.num_fewshot == 5
    item = data.items[0]  # abstract_algebra, first test question
    assert item.subset == "abstract_algebra"
    ctx = item.context
    assert ctx.startswith(
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\n"
        "Answer: B\n\n"
    )
    assert ctx.count("\nAnswer:") == 6 and ctx.count("\nAnswer: ") == 5
    assert ctx.endswith(
        "\n\nFind the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q."
        "\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:"
    )
    assert item.choices == [" A", " B", " C", " D"] and item.gold == 1
    # every subject's items share one prefix: the same first 5 dev questions
    anatomy = [i for i in data.items if i.subset == "anatomy"]
    assert len(anatomy) == 135
    assert all(
        i.context.startswith(
            "The following are multiple choice questions (with answers) about anatomy.\n\n"
            "What is the embryological origin"
        )
        for i in anatomy
    )


def test_mmlu_zero_shot_cloze_and_limit(bench: Path) -> None:
    data = load_task(
        "mmlu",
        bench / "mmlu" / "test" / "abstract_algebra_test.csv",
        0,
        limit=3,
        variant="continuation",
    )
    assert len(data.items) == 3
    item = data.items[0]
    assert item.context == (
        "The following are questions (with answers) about abstract algebra.\n\n"
        "Question: Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18))"
        " over Q.\nAnswer:"
    )
    assert item.choices == [" 0", " 4", " 2", " 6"] and item.gold == 1


def test_mmlu_headerless_letter_csv(tmp_path: Path) -> None:
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "toy_subject_test.csv").write_text('"  What is 2+2? ",3,4,5,6,B\n')
    data = load_task("mmlu", tmp_path, num_fewshot=0)
    assert data.items[0].context == (
        "The following are multiple choice questions (with answers) about toy subject.\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:"
    )
    assert data.items[0].gold == 1


# --- LAMBADA ------------------------------------------------------------------------------------


def test_lambada_first_item_and_hf_text(bench: Path, tmp_path: Path) -> None:
    data = load_task("lambada", bench / "llm-foundry" / "lambada_openai.jsonl")
    assert len(data.items) == 5153 and data.output_type == "loglikelihood"
    item = data.items[0]
    assert item.context.endswith("in a confident grin, I don't care about")
    assert item.choices == [" signs"] and item.gold == 0
    # lm-eval splits on ' ' only: "saw the\n\nrecorder" is one "word"
    odd = next(i for i in data.items if i.choices[0].endswith("\n\nrecorder"))
    assert odd.choices == [" the\n\nrecorder"]
    assert odd.context.endswith("when she returned and saw")
    hf = load_task("lambada", write_jsonl(tmp_path / "l.jsonl", [{"text": "a b  c"}])).items[0]
    assert (hf.context, hf.choices) == ("a b ", [" c"])


# --- few-shot, bad records, errors --------------------------------------------------------------


def test_fewshot_prefix_shape_and_determinism(tmp_path: Path) -> None:
    recs = [
        {"query": f"Question: q{i}", "choices": [f"a{i}", f"b{i}"], "gold": i % 2} for i in range(6)
    ]
    path = write_jsonl(tmp_path / "arc.jsonl", recs)
    items = load_task("arc_easy", path, num_fewshot=2, seed=7).items
    again = load_task("arc_easy", path, num_fewshot=2, seed=7).items
    assert [i.context for i in items] == [i.context for i in again]
    for n, item in enumerate(items):
        shots = item.context.split("\n\n")
        assert len(shots) == 3 and shots[-1] == f"Question: q{n}\nAnswer:"
        for shot in shots[:2]:
            k = int(shot.split("\n")[0].removeprefix("Question: q"))
            assert k != n
            assert shot == f"Question: q{k}\nAnswer: {'ab'[k % 2]}{k}"


def test_bad_records_counted_and_skipped(tmp_path: Path) -> None:
    good = {"query": "Question: ok", "choices": ["x", "y"], "gold": 1}
    path = write_jsonl(
        tmp_path / "arc.jsonl",
        [
            good,
            {"query": "Question: q", "choices": ["x", "y"], "gold": 2},
            {"query": "Question: q", "choices": ["x", " "], "gold": 0},
            {"choices": ["x", "y"], "gold": 0, "query": ""},
            {"stem": "?", "answer": "A"},
            [1, 2],
        ],
        raw_lines=["{not json"],
    )
    data = load_task("arc_easy", path)
    assert len(data.items) == 1 and data.items[0].gold == 1
    assert data.skipped == {
        "gold out of range": 1,
        "empty choice": 1,
        "missing field 'query'": 1,
        "record fits no known schema (keys: answer, stem)": 1,
        "record is not a JSON object": 1,
        "invalid JSON": 1,
    }


def test_hellaswag_text_bad_blocks(tmp_path: Path) -> None:
    lines = ["L: A b. he", "1", "e0", "e1", "e2", "e3", "L: A b. he", "7", "e0", "e1", "e2", "e3"]
    lines += ["L: x", "0", "e0"]
    path = tmp_path / "hs.txt"
    path.write_text("\n".join(lines) + "\n")
    data = load_task("hellaswag", path)
    assert [i.context for i in data.items] == ["L: A b. He"]
    assert data.skipped == {"gold out of range": 1, "truncated record (fewer than 6 lines)": 1}


def test_errors_name_the_problem(tmp_path: Path) -> None:
    assert "mmlu" in TASKS and len(TASKS) == 10
    with pytest.raises(ValueError, match="unknown benchmark task 'squad'"):
        load_task("squad", tmp_path)
    with pytest.raises(ValueError, match="nope.jsonl does not exist"):
        load_task("copa", tmp_path / "nope.jsonl")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}])
    with pytest.raises(ValueError, match=r"no usable record in .*bad.jsonl \(record fits no known"):
        load_task("copa", bad)
