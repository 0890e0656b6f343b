"""The evaluator end to end on a model whose log-likelihoods are known by hand, and the
`llmflow evaluate` command."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from document_datasets import write_texts
from typer.testing import CliRunner

from llmflow.flows.cli import app
from llmflow.tasks.evaluate.benchmarks import load_task
from llmflow.tasks.evaluate.evaluation import evaluate_task, find_benchmark
from llmflow.tasks.evaluate.loglikelihood import LoglikelihoodScorer
from llmflow.tasks.evaluate.summary_scores import clean_result, core_score
from llmflow.tasks.train.bpe_tokenizer import TokenizerConfig, train_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 320
TEXT = "the cat sat on a mat while seven dogs ran across the old stone bridge at noon"


def arc_record(i: int, stem: str, choices: list[str], answer: int) -> dict:
    labels = ["A", "B", "C", "D"][: len(choices)]
    return {
        "id": f"q{i}",
        "question": {
            "stem": stem,
            "choices": [{"text": c, "label": lb} for c, lb in zip(choices, labels, strict=True)],
        },
        "answerKey": labels[answer],
    }


@pytest.fixture(scope="module")
def uniform_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved Llama whose output layer is zero: every token has probability 1/VOCAB, so a
    continuation of n tokens has log-likelihood exactly -n·ln(VOCAB)."""
    root = tmp_path_factory.mktemp("uniform")
    write_texts(str(root / "docs"), [TEXT] * 40)
    train_tokenizer(str(root / "docs"), str(root / "tok"), TokenizerConfig(vocab_size=300), 0.0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tok")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def test_a_model_with_known_likelihoods_scores_as_computed_by_hand(
    uniform_model: Path, tmp_path: Path
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(uniform_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(uniform_model)
    # Choices of different token counts and character lengths: acc prefers fewer tokens,
    # acc_norm the most characters per token.
    records = [
        arc_record(0, "Where did the cat sit?", ["mat", "the old stone bridge at noon"], 0),
        arc_record(1, "Who ran?", ["seven dogs ran across the old stone", "a"], 0),
    ]
    path = tmp_path / "arc_easy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    data = load_task("arc_easy", path)
    result = evaluate_task(LoglikelihoodScorer(model, tokenizer), data)

    acc, acc_norm = [], []
    for record in records:
        texts = [c["text"] for c in record["question"]["choices"]]
        context = f"Question: {record['question']['stem']}\nAnswer:"
        lls = []
        for text in texts:
            whole = tokenizer.encode(context + " " + text, add_special_tokens=False)
            n = len(whole) - len(tokenizer.encode(context, add_special_tokens=False))
            lls.append(-n * math.log(VOCAB))
        gold = ["A", "B"].index(record["answerKey"])
        acc.append(float(max(range(2), key=lambda i: lls[i]) == gold))
        acc_norm.append(float(max(range(2), key=lambda i: lls[i] / len(texts[i])) == gold))
    assert acc != acc_norm  # the case is built so that the two metrics disagree
    assert result.metrics["acc"] == pytest.approx(sum(acc) / 2)
    assert result.metrics["acc_norm"] == pytest.approx(sum(acc_norm) / 2)
    assert result.items == 2


def test_clean_subset_and_core_equal_a_computation_by_hand(
    uniform_model: Path, tmp_path: Path
) -> None:
    """The clean score is the metric over the items left when the contaminated ones are taken
    out; CORE centres each task's accuracy on its chance (mean 1/options) and averages."""
    model = transformers.AutoModelForCausalLM.from_pretrained(uniform_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(uniform_model)
    records = [
        arc_record(0, "Where did the cat sit?", ["mat", "the old stone bridge at noon"], 0),
        arc_record(1, "Who ran?", ["seven dogs ran across the old stone", "a"], 0),
        arc_record(2, "When?", ["noon", "at the old stone bridge", "a mat"], 2),
    ]
    path = tmp_path / "arc_easy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = asdict(
        evaluate_task(LoglikelihoodScorer(model, tokenizer), load_task("arc_easy", path))
    )
    per_item = result["item_values"]["acc_norm"]
    assert result["item_ids"] == ["0", "1", "2"] and len(per_item) == 3

    clean = clean_result(result, {"1"})
    assert (clean["items"], clean["contaminated"]) == (2, 1)
    assert clean["metrics"]["acc_norm"] == pytest.approx((per_item[0] + per_item[2]) / 2)
    assert clean["metrics"]["acc"] == pytest.approx(
        (result["item_values"]["acc"][0] + result["item_values"]["acc"][2]) / 2
    )
    assert clean_result(result, set())["metrics"] == pytest.approx(result["metrics"])

    chance = (1 / 2 + 1 / 2 + 1 / 3) / 3
    assert result["chance"] == pytest.approx(chance)
    acc_norm = sum(per_item) / 3
    lambada = {"metrics": {"acc": 0.4, "perplexity": 9.0}, "chance": 0.0}
    core, centred = core_score({"arc_easy": result, "lambada": lambada})
    assert centred["arc_easy"] == pytest.approx((acc_norm - chance) / (1 - chance))
    assert core == pytest.approx(((acc_norm - chance) / (1 - chance) + 0.4) / 2)


def test_lambada_perplexity_of_a_uniform_model_is_its_vocabulary(
    uniform_model: Path, tmp_path: Path
) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(uniform_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(uniform_model)
    path = tmp_path / "lambada.jsonl"
    path.write_text(json.dumps({"text": "the cat sat on a mat"}) + "\n")
    result = evaluate_task(LoglikelihoodScorer(model, tokenizer), load_task("lambada", path))
    n = len(tokenizer.encode(" mat", add_special_tokens=False))
    assert result.metrics["perplexity"] == pytest.approx(VOCAB**n, rel=1e-4)


def test_evaluate_command_prints_and_writes_the_scores(uniform_model: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "bench"
    data_dir.mkdir()
    records = [arc_record(i, f"Question {i}?", ["mat", "stone bridge"], i % 2) for i in range(6)]
    (data_dir / "arc_easy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (data_dir / "lambada_openai.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    assert find_benchmark("arc_easy", data_dir) == data_dir / "arc_easy.jsonl"
    output = tmp_path / "results.json"
    args = ["evaluate", "--model", str(uniform_model), "--tasks", "arc_easy,lambada"]
    args += ["--data-dir", str(data_dir), "--limit", "4", "--output", str(output)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "arc_easy" in result.output and "perplexity" in result.output
    scores = json.loads(output.read_text())["results"]
    assert scores["arc_easy"]["items"] == 4
    assert 0.0 <= scores["arc_easy"]["metrics"]["acc"] <= 1.0
    assert scores["arc_easy"]["stderr"]["acc"] >= 0.0
    core, _ = core_score(scores)
    assert f"CORE {core:.4f}" in result.output and "arc_easy, lambada" in result.output

    bad = CliRunner().invoke(app, [*args[:4], "arc_easy,hellaswagg", *args[5:]])
    assert bad.exit_code == 2 and "hellaswagg" in bad.output
    missing = CliRunner().invoke(app, [*args[:4], "piqa", *args[5:]])
    assert missing.exit_code == 2 and "piqa: no benchmark file" in " ".join(missing.output.split())
