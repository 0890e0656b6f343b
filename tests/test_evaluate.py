"""The evaluator end to end on a model whose log-likelihoods are known by hand, and the
`llmflow evaluate` command."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from uuid import UUID

import pytest
import torch
from document_datasets import write_texts
from mlflow.tracking import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL, temporary_settings
from pydantic import ValidationError
from typer.testing import CliRunner

from llmflow.flows.cli import app
from llmflow.flows.config import load_config
from llmflow.tasks.evaluate.benchmarks import load_task
from llmflow.tasks.evaluate.evaluate_config import EvaluateConfig
from llmflow.tasks.evaluate.evaluation import evaluate_task, find_benchmark
from llmflow.tasks.evaluate.loglikelihood import LoglikelihoodScorer
from llmflow.tasks.evaluate.model_loading import load_causal_lm, resolve_device
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


def save_uniform_model(root: Path) -> Path:
    """A saved Llama whose output layer is zero: every token has probability 1/VOCAB, so a
    continuation of n tokens has log-likelihood exactly -n·ln(VOCAB)."""
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


@pytest.fixture(scope="module")
def uniform_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_uniform_model(tmp_path_factory.mktemp("uniform"))


def write_arc(data_dir: Path, n: int) -> Path:
    """``n`` two-choice ARC-Easy items in ``data_dir/arc_easy.jsonl`` (where find_benchmark
    looks)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    records = [arc_record(i, f"Question {i}?", ["mat", "stone bridge"], i % 2) for i in range(n)]
    path = data_dir / "arc_easy.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


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
    args += ["--workdir", str(tmp_path / "work")]
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


def test_progress_advances_as_forward_passes_finish(uniform_model: Path, tmp_path: Path) -> None:
    """Each item counts as done when the forward pass that scores its last request ends, not
    once the whole chunk of up to 256 items is scored: a 200-item task would otherwise sit at
    0/200 until its end."""
    model = transformers.AutoModelForCausalLM.from_pretrained(uniform_model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(uniform_model)
    data = load_task("arc_easy", write_arc(tmp_path, 6))
    passes = 0

    def count_pass(*_: object) -> None:
        nonlocal passes
        passes += 1

    model.register_forward_hook(count_pass)
    passes_at_advance: list[int] = []
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=1, row_tokens=16)
    result = evaluate_task(scorer, data, lambda: passes_at_advance.append(passes))
    assert len(passes_at_advance) == result.items == 6  # one advance per item, all of them
    assert passes > 1
    assert len(set(passes_at_advance)) > 1, passes_at_advance  # between passes, not after all
    assert passes_at_advance[0] < passes
    # the scores do not depend on the batching: the default scorer gives the same numbers
    default = evaluate_task(LoglikelihoodScorer(model, tokenizer), data)
    assert default.metrics == pytest.approx(result.metrics)


def test_the_device_is_a_runtime_setting_named_when_wrong() -> None:
    """Where the model runs changes no score: the same evaluation keys the same on any device."""
    assert EvaluateConfig().device == "auto"
    hashes = {EvaluateConfig(device=d).output_hash() for d in ("auto", "cpu", "cuda:1", "mps")}
    assert len(hashes) == 1
    with pytest.raises(ValidationError, match="device"):
        EvaluateConfig(device="gpu")
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:0': CUDA is not available"):
            resolve_device("cuda:0")


def test_the_model_loads_on_the_device_asked_for(uniform_model: Path) -> None:
    model, _ = load_causal_lm(uniform_model, "auto")
    assert next(model.parameters()).device.type == resolve_device("auto").split(":")[0]


def _task_run_names(flow_run_id: str, wanted: str, timeout: float = 30.0) -> set[str]:
    """The task names of a flow run's task runs; task runs reach the API as events, a moment
    after the flow returns, so this waits (up to ``timeout``) for ``wanted`` to appear."""
    deadline = time.monotonic() + timeout
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(flow_run_id)]))
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=flow_runs)
        names = {r.name.rsplit("-", 1)[0] for r in runs}
        if wanted in names or time.monotonic() > deadline:
            return names
        time.sleep(0.5)


@pytest.mark.server
def test_the_evaluate_flow_scores_in_an_evaluate_task_and_groups_the_stderrs(
    uniform_model: Path, prefect_api: str, tmp_path: Path
) -> None:
    """The flow-run graph shows the scoring as a task named ``evaluate``; MLflow gets each
    score under ``eval/`` and its standard error under ``eval_stderr/`` (a chart section of
    their own, apart from the scores)."""
    from llmflow.flows.pipeline import evaluate as evaluate_flow

    write_arc(tmp_path / "bench", 6)
    overrides = [
        f"evaluate.model={uniform_model}",
        'evaluate.tasks=["arc_easy"]',
        f"evaluate.data_dir={tmp_path / 'bench'}",
        "evaluate.chat_prompts=[]",
        "evaluate.device=cpu",
    ]
    config = load_config(overrides=overrides, workdir=str(tmp_path / "work"))
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        result = evaluate_flow(config=config)
        names = _task_run_names(result["prefect_flow_run_id"], "evaluate")
    assert "evaluate" in names, names

    (report,) = result["stages"]
    client = MlflowClient(tracking_uri=result["mlflow_tracking_uri"])
    metrics = client.get_run(report["mlflow_run_id"]).data.metrics
    outcome = json.loads((tmp_path / "work" / "data" / "evaluate" / "manifest.json").read_text())
    scores = outcome["results"]["arc_easy"]
    for metric, value in scores["metrics"].items():
        assert metrics[f"eval/arc_easy/{metric}"] == pytest.approx(value)
        assert metrics[f"eval_stderr/arc_easy/{metric}"] == pytest.approx(scores["stderr"][metric])
    assert "eval/core" in metrics
    assert not [k for k in metrics if k.endswith("_stderr")]
    assert outcome["config"]["device"] == "cpu"
