"""Log-likelihood scoring: the shared-context path equals scoring each request alone, the pair
encoding is lm-eval's, and the multiple-choice metrics pick what they should."""

from __future__ import annotations

import pytest
import torch
from document_datasets import write_texts

from llmflow.tasks.evaluate.loglikelihood import (
    LoglikelihoodScorer,
    _pack,
    choice_metrics,
    encode_pair,
    mean_and_stderr,
)
from llmflow.tasks.evaluate.model_loading import load_causal_lm
from llmflow.tasks.train.bpe_tokenizer import TokenizerConfig, train_tokenizer

transformers = pytest.importorskip("transformers")

WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", "while", "seven", "dogs", "ran", "across"),
    *("the", "old", "stone", "bridge", "at", "noon"),
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("scoring")
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) for i in range(60)]
    write_texts(str(root / "docs"), texts)
    train_tokenizer(str(root / "docs"), str(root / "tok"), TokenizerConfig(vocab_size=300), 0.0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config).eval(), tokenizer


def test_trailing_spaces_move_to_the_continuation_as_lm_eval_does(model_and_tokenizer) -> None:
    _, tokenizer = model_and_tokenizer
    context_ids, continuation_ids = encode_pair(tokenizer, "the cat sat ", "on a mat")
    assert context_ids == tokenizer.encode("the cat sat", add_special_tokens=False)
    whole = tokenizer.encode("the cat sat on a mat", add_special_tokens=False)
    assert context_ids + continuation_ids == whole


def test_shared_context_scores_equal_scoring_each_request_alone(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    scorer = LoglikelihoodScorer(model, tokenizer)
    contexts = ["the cat sat on", "the cat sat on", "the cat sat on", "seven dogs ran ", ""]
    continuations = [" a mat", " the old stone bridge", " noon", "across", "the cat"]
    shared = scorer.score(contexts, continuations)
    for context, continuation, score in zip(contexts, continuations, shared, strict=True):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not context:
            ctx, cont = [tokenizer.bos_token_id], tokenizer.encode(continuation)
        alone = scorer._alone(ctx, cont)
        assert score.tokens == alone.tokens == len(cont)
        assert score.loglikelihood == pytest.approx(alone.loglikelihood, abs=1e-4)
        assert score.is_greedy == alone.is_greedy
        # and by hand: the sum of log-softmax over the full sequence
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        expected = sum(float(logprobs[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))
        assert score.loglikelihood == pytest.approx(expected, abs=1e-4)


def test_too_long_requests_keep_their_last_tokens(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    scorer = LoglikelihoodScorer(model, tokenizer, max_length=16)
    context = " ".join(WORDS * 3)
    (score,) = scorer.score([context], [" the cat"])
    ctx, cont = encode_pair(tokenizer, context, " the cat")
    window = (ctx + cont)[-17:-1]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window])).logits[0]
    logprobs = torch.log_softmax(logits[-len(cont) :].float(), dim=-1)
    expected = sum(float(logprobs[i, t]) for i, t in enumerate(cont))
    assert score.loglikelihood == pytest.approx(expected, abs=1e-4)


def test_a_continuation_longer_than_the_window_scores_its_last_tokens(model_and_tokenizer) -> None:
    """A small model's context can be shorter than one answer (PIQA's longest solutions are 300+
    tokens for a 256-token model): the tokens predicted inside the window are the ones scored."""
    model, tokenizer = model_and_tokenizer
    scorer = LoglikelihoodScorer(model, tokenizer, max_length=8)
    continuation = " " + " ".join(WORDS[:6])
    (score,) = scorer.score(["the cat"], [continuation])
    ctx, cont = encode_pair(tokenizer, "the cat", continuation)
    assert len(cont) > 8
    window = (ctx + cont)[-9:]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([window[:-1]])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    expected = sum(float(logprobs[i, t]) for i, t in enumerate(window[1:]))
    assert score.tokens == 8
    assert score.loglikelihood == pytest.approx(expected, abs=1e-4)


def test_acc_and_acc_norm_differ_where_length_decides() -> None:
    # The long choice has the lower total but the higher per-character log-likelihood.
    item = choice_metrics([-10.0, -12.0], ["a", "bbbbbbbb"], gold=1)
    assert item == {"acc": 0.0, "acc_norm": 1.0, "acc_bytes": 1.0}
    # Characters and bytes disagree on multi-byte text: 2 characters, 6 bytes against 3 and 3.
    item = choice_metrics([-4.0, -3.0], ["中文", "abc"], gold=0)
    assert item["acc_norm"] == 0.0 and item["acc_bytes"] == 1.0
    # The joining space is not counted: with it, 2 and 3 characters would flip the decision.
    assert choice_metrics([-2.0, -3.5], ["a", "bb"], gold=1)["acc_norm"] == 1.0
    assert choice_metrics([-1.0, -2.0], ["x", "y"], gold=0)["acc"] == 1.0


def test_mean_and_stderr() -> None:
    mean, stderr = mean_and_stderr([1.0, 0.0, 1.0, 0.0])
    assert mean == 0.5
    assert stderr == pytest.approx((1 / 3) ** 0.5 / 2)


def test_models_load_from_a_directory_or_a_run_folder(model_and_tokenizer, tmp_path) -> None:
    model, tokenizer = model_and_tokenizer
    run = tmp_path / "runs" / "abc"
    model.save_pretrained(run / "hf")
    tokenizer.save_pretrained(run / "hf")
    for path in (run / "hf", run):
        loaded, loaded_tokenizer = load_causal_lm(path)
        ids = torch.tensor([tokenizer.encode("the cat sat")])
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        assert loaded_tokenizer.encode("the cat") == tokenizer.encode("the cat")
    with pytest.raises(ValueError, match="expected a Hugging Face model directory"):
        load_causal_lm(tmp_path)


def test_contexts_of_different_lengths_batched_together_score_as_alone(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=3)
    contexts, continuations = [], []
    for i in range(7):  # 7 contexts of 1 to 13 words, two continuations each: 3 + 3 + 1 batches
        context = " ".join(WORDS[: 1 + 2 * i])
        contexts += [context, context]
        continuations += [" the old stone bridge", " a"]
    scores = scorer.score(contexts, continuations)
    for context, continuation, score in zip(contexts, continuations, scores, strict=True):
        alone = scorer._alone(*encode_pair(tokenizer, context, continuation))
        assert score.loglikelihood == pytest.approx(alone.loglikelihood, abs=1e-4)
        assert score.is_greedy == alone.is_greedy


def test_pack_merges_shared_prefixes_into_one_tree() -> None:
    # Inputs (context + continuation but its last token): 1 2 3 4 | 1 2 3 4 | 1 2 | 1 5
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [4, 6]), ([1, 2], [7]), ([1], [5, 9])]
    (row,), placed = _pack(pairs, row_tokens=16)
    assert sorted(row.tokens) == [1, 2, 3, 4, 5]  # five distinct prefixes, five nodes
    by_token = {t: n for n, t in enumerate(row.tokens)}
    assert row.depths[by_token[4]] == 3 and row.depths[by_token[5]] == 1
    assert row.parents[by_token[5]] == by_token[1] and row.parents[by_token[1]] == -1
    # each request's nodes predict its continuation: from the context's last token on
    assert placed[0] == placed[1] == (0, [by_token[3], by_token[4]])
    assert placed[2] == (0, [by_token[2]])
    assert placed[3] == (0, [by_token[1], by_token[5]])


def test_pack_starts_a_new_row_when_the_next_request_does_not_fit() -> None:
    pairs = [([1, 2, 3], [4, 5]), ([1, 2, 3], [6, 7]), ([8], [9])]
    rows, placed = _pack(pairs, row_tokens=5)
    # 1 2 3 4 and 1 2 3 6 share three nodes: five in all; 8 does not fit beside them
    assert [r.tokens for r in rows] == [[1, 2, 3, 4, 6], [8]]
    assert placed[2] == (1, [0])
    rows, _ = _pack(pairs, row_tokens=2)  # longer than a row: a row of its own, whole
    assert [r.tokens for r in rows] == [[1, 2, 3, 4], [1, 2, 3, 6], [8]]


def _mixed_requests() -> tuple[list[str], list[str]]:
    """Contexts of 1 to 13 words, some sharing their start, continuations that share a prefix
    and some that do not, one longer than the small rows used below."""
    contexts, continuations = [], []
    for i in range(7):
        context = " ".join(WORDS[: 1 + 2 * i])
        contexts += [context] * 3
        continuations += [" the old stone bridge", " the old", " noon"]
    contexts += ["seven dogs ran ", "seven dogs", "", " ".join(WORDS)]
    continuations += ["across", " ran across the", "the cat", " at noon"]
    return contexts, continuations


@pytest.mark.parametrize(("row_tokens", "batch_size"), [(256, 8), (12, 2), (5, 1), (40, 3)])
def test_packed_rows_score_as_each_request_alone(model_and_tokenizer, row_tokens, batch_size):
    model, tokenizer = model_and_tokenizer
    scorer = LoglikelihoodScorer(model, tokenizer, batch_size=batch_size, row_tokens=row_tokens)
    contexts, continuations = _mixed_requests()
    scores = scorer.score(contexts, continuations)
    pairs = scorer._pairs(contexts, continuations)
    assert len(scores) == len(pairs)
    for (ctx, cont), score in zip(pairs, scores, strict=True):
        alone = scorer._alone(ctx, cont)
        assert score.tokens == len(cont)
        assert score.loglikelihood == pytest.approx(alone.loglikelihood, abs=1e-4)
        assert score.is_greedy == alone.is_greedy


def test_without_custom_masks_or_logit_slicing_the_scores_are_the_same(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    contexts, continuations = _mixed_requests()
    packed = LoglikelihoodScorer(model, tokenizer).score(contexts, continuations)
    unsliced = LoglikelihoodScorer(model, tokenizer)
    unsliced.slices_logits = False  # transformers < 5: all logits, picked by the scorer
    alone = LoglikelihoodScorer(model, tokenizer)
    alone.packs = False  # an attention that ignores 4D masks: every request on its own
    for other in (unsliced.score(contexts, continuations), alone.score(contexts, continuations)):
        for a, b in zip(packed, other, strict=True):
            assert a.loglikelihood == pytest.approx(b.loglikelihood, abs=1e-4)
            assert (a.is_greedy, a.tokens) == (b.is_greedy, b.tokens)


def test_greedy_continuations_are_flagged(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    scorer = LoglikelihoodScorer(model, tokenizer, row_tokens=6, batch_size=2)
    context = tokenizer.encode("the cat sat on a", add_special_tokens=False)
    greedy: list[int] = []
    with torch.no_grad():
        for _ in range(3):
            logits = model(input_ids=torch.tensor([context + greedy])).logits[0, -1]
            greedy.append(int(logits.argmax()))
    other = greedy[:2] + [(greedy[2] + 1) % 300]
    hit, miss, first = scorer.score_ids(
        [(context, greedy), (context, other), (context, greedy[:1])]
    )
    assert hit.is_greedy and first.is_greedy and not miss.is_greedy
    assert hit.loglikelihood > miss.loglikelihood


def test_a_context_that_encodes_to_nothing_is_an_error(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="context '  ' encodes to no tokens"):
        LoglikelihoodScorer(model, tokenizer).score(["  "], ["the cat"])


def test_each_forward_pass_reports_the_requests_it_finished(model_and_tokenizer) -> None:
    """Progress comes per forward pass: every request is reported once, by the pass (packed
    rows, or a too-long request alone) that scored it, and the scores are unchanged."""
    model, tokenizer = model_and_tokenizer
    contexts = ["the cat sat on", "the cat sat on", "seven dogs ran", " ".join(WORDS * 2)]
    continuations = [" a mat", " noon", " across", " the cat"]
    scorer = LoglikelihoodScorer(model, tokenizer, max_length=16, batch_size=1, row_tokens=8)
    reports: list[list[int]] = []
    scores = scorer.score(contexts, continuations, reports.append)
    assert len(reports) > 1
    assert sorted(i for report in reports for i in report) == [0, 1, 2, 3]
    assert scores == scorer.score(contexts, continuations)
