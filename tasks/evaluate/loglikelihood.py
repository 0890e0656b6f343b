"""Log-likelihood scoring of continuations, as lm-evaluation-harness defines it, computing every
distinct token prefix once.

A multiple-choice item is a context and several continuations; the model's answer is the
continuation it finds most likely. The numbers are only worth anything if they are the reference
harness's numbers, so the tokenization of a (context, continuation) pair is lm-eval's
(``_encode_pair``: trailing spaces of the context move to the continuation, the pair is encoded as
one string and the continuation's tokens are what follows the context's own encoding), an empty
context is the model's prefix token, and a request longer than the model keeps its last
``max_length`` tokens.

What differs is the cost. A causal model's prediction at a position depends only on the tokens
before it, so requests that share a token prefix (an item's context, the few-shot examples,
continuations that begin alike, as PIQA's two solutions often do) need that prefix computed
once. The requests are sorted, their prefixes merged into a tree, and the tree's nodes packed
into rows of up to ``row_tokens`` tokens, one token per node, each attending only to its
ancestors (a 4D attention mask) at its depth in the sequence (position ids). No position is
padding and every row is long, which keeps the matrix products efficient; the vocabulary
projection runs only at the positions that predict a continuation token (``logits_to_keep``).

Models are anything transformers loads as a causal LM with the ``sdpa`` or ``eager`` attention
(they take a custom 4D mask): a Hugging Face directory, a GGUF file, or one of our checkpoints
through its export (:func:`llmflow.tasks.train.pretrain.export_hf`). Other attention implementations
are scored one request at a time, as lm-eval does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Attention implementations that honour a custom 4D mask (the tree of shared prefixes).
_MASKED_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class Score:
    """One continuation's summed log-probability given its context, and whether greedy decoding
    would have produced exactly it (lm-eval's ``is_greedy``: LAMBADA's accuracy)."""

    loglikelihood: float
    is_greedy: bool
    tokens: int


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's ``_encode_pair``: (context ids, continuation ids) for one request."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False)
    return context_ids, whole[len(context_ids) :]


def prefix_token_id(tokenizer: Any) -> int:
    """What stands for an empty context: lm-eval's choice (BOS if the tokenizer has one, else
    EOS)."""
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context")


@dataclass
class _Row:
    """One packed row: a forest of prefix trees, one token per node, parents before children."""

    tokens: list[int]
    parents: list[int]  # index of the node's parent in the row, -1 for a root
    depths: list[int]  # the node's position in its sequence: its position id

    def add(self, token: int, parent: int) -> int:
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1 if parent >= 0 else 0)
        return len(self.tokens) - 1


class LoglikelihoodScorer:
    """Scores (context, continuation) requests with a transformers causal LM.

    Each forward pass takes up to ``batch_size`` rows of up to ``row_tokens`` tokens; a row holds
    the merged prefixes of as many requests as fit (a request longer than that gets a row of its
    own). Rows are independent, so the scores do not depend on the batching beyond float
    rounding.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_length: int | None = None,
        batch_size: int = 8,
        row_tokens: int = 256,
    ) -> None:
        if batch_size < 1 or row_tokens < 1:
            raise ValueError(
                f"batch_size and row_tokens must be positive, not {batch_size} and {row_tokens}"
            )
        self.model = model.eval()
        self.batch_size = batch_size
        self.row_tokens = row_tokens
        self.tokenizer = tokenizer
        configured = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = max_length or configured
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        attention = getattr(model.config, "_attn_implementation", None) or "eager"
        self.packs = attention in _MASKED_ATTENTION
        self.slices_logits = _slices_logits_by_mask()

    def _pairs(
        self, contexts: Sequence[str], continuations: Sequence[str]
    ) -> list[tuple[list[int], list[int]]]:
        pairs = []
        for context, continuation in zip(contexts, continuations, strict=True):
            if context:
                context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
            else:
                context_ids = [prefix_token_id(self.tokenizer)]
                continuation_ids = self.tokenizer.encode(continuation, add_special_tokens=False)
            if not context_ids:
                raise ValueError(f"context {context!r} encodes to no tokens")
            if not continuation_ids:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            pairs.append((context_ids, continuation_ids))
        return pairs

    @torch.inference_mode()
    def score(
        self,
        contexts: Sequence[str],
        continuations: Sequence[str],
        on_scored: Callable[[list[int]], None] | None = None,
    ) -> list[Score]:
        """One score per (context, continuation), in order. Requests too long for the model are
        scored alone on their last ``max_length`` tokens, as lm-eval scores every request.

        ``on_scored`` is called after each forward pass with the indices of the requests it
        finished: progress that moves while a long call runs, not only when it returns.
        """
        return self.score_ids(self._pairs(contexts, continuations), on_scored)

    @torch.inference_mode()
    def score_ids(
        self,
        pairs: Sequence[tuple[list[int], list[int]]],
        on_scored: Callable[[list[int]], None] | None = None,
    ) -> list[Score]:
        """:meth:`score` on requests already encoded: (context ids, continuation ids), each
        non-empty."""
        scores: list[Score | None] = [None] * len(pairs)
        packed = []
        for i, (context_ids, continuation_ids) in enumerate(pairs):
            if self.packs and len(context_ids) + len(continuation_ids) - 1 <= self.max_length:
                packed.append(i)
            else:
                scores[i] = self._alone(context_ids, continuation_ids)
                if on_scored is not None:
                    on_scored([i])
        rows, placed = _pack([pairs[i] for i in packed], self.row_tokens)
        members: list[list[int]] = [[] for _ in rows]
        for k, (row, _) in enumerate(placed):
            members[row].append(k)
        # rows of similar length together: little padding between them
        order = sorted(range(len(rows)), key=lambda r: len(rows[r].tokens))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            requests = [
                (b, nodes, pairs[packed[k]][1], packed[k])
                for b, r in enumerate(batch)
                for k in members[r]
                for nodes in [placed[k][1]]
            ]
            finished = [i for *_, i in requests]
            for i, score in zip(
                finished,
                self._forward([rows[r] for r in batch], [q[:3] for q in requests]),
                strict=True,
            ):
                scores[i] = score
            if on_scored is not None:
                on_scored(finished)
        return [s for s in scores if s is not None]

    def _forward(
        self, rows: list[_Row], requests: list[tuple[int, list[int], list[int]]]
    ) -> list[Score]:
        """One forward pass over ``rows``; ``requests`` are (row in the batch, the nodes that
        predict the continuation's tokens, the continuation's tokens)."""
        width = max(len(row.tokens) for row in rows)
        ids = np.zeros((len(rows), width), dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        allowed = np.zeros((len(rows), width, width), dtype=bool)
        allowed[:, np.arange(width), np.arange(width)] = True  # padding sees itself only
        for b, row in enumerate(rows):
            ids[b, : len(row.tokens)] = row.tokens
            positions[b, : len(row.tokens)] = row.depths
            for node, parent in enumerate(row.parents):
                if parent >= 0:  # a node sees its ancestors (its parent's view) and itself
                    allowed[b, node, :node] = allowed[b, parent, :node]
        keep = np.zeros((len(rows), width), dtype=bool)
        for b, nodes, _ in requests:
            keep[b, nodes] = True
        # where each kept node's logits land: they come back flattened in row-major order
        where = np.cumsum(keep.ravel()).reshape(keep.shape) - 1
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~torch.from_numpy(allowed), torch.finfo(self.dtype).min)
        keep_t = torch.from_numpy(keep).to(self.device)
        out = self.model(
            input_ids=torch.from_numpy(ids).to(self.device),
            attention_mask=mask[:, None].to(self.device),
            position_ids=torch.from_numpy(positions).to(self.device),
            use_cache=False,
            logits_to_keep=keep_t if self.slices_logits else 0,
        )
        logits = out.logits if self.slices_logits else out.logits[keep_t]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        greedy = logprobs.argmax(dim=-1).cpu().numpy()
        at = np.concatenate([where[b, nodes] for b, nodes, _ in requests])
        targets = np.concatenate([continuation for *_, continuation in requests])
        picked = logprobs[torch.from_numpy(at), torch.from_numpy(targets)].cpu()
        hits = greedy[at] == targets
        results, offset = [], 0
        for *_, continuation in requests:
            end = offset + len(continuation)
            results.append(
                Score(
                    float(picked[offset:end].sum()),
                    bool(hits[offset:end].all()),
                    end - offset,
                )
            )
            offset = end
        return results

    @torch.inference_mode()
    def _alone(self, context: list[int], continuation: list[int]) -> Score:
        """lm-eval's way: the whole (left-truncated) request in one forward pass of its own."""
        whole = (context + continuation)[-(self.max_length + 1) :][:-1]
        logits = self.model(input_ids=torch.tensor([whole], device=self.device)).logits[0]
        # a continuation longer than the window itself (a small model's short context): only
        # its last max_length tokens have a prediction inside the window, and those are scored
        scored = continuation[-self.max_length :]
        logprobs = F.log_softmax(logits[-len(scored) :].float(), dim=-1)
        return _score(logprobs, scored)


def _pack(
    pairs: list[tuple[list[int], list[int]]], row_tokens: int
) -> tuple[list[_Row], list[tuple[int, list[int]]]]:
    """Rows of merged prefixes for the requests, and for each request (its row, the nodes whose
    outputs predict its continuation's tokens).

    A request's model input is its context and continuation but the last token. Sorted, each
    input shares with the one before it the longest prefix it shares with any earlier one, so
    one pass merges them; a row is closed when the next request's new tokens would overflow it.
    """
    inputs = [tuple(context + continuation[:-1]) for context, continuation in pairs]
    rows: list[_Row] = []
    placed: list[tuple[int, list[int]]] = [(0, [])] * len(pairs)
    path: list[int] = []  # the previous request's nodes in the current row
    previous: tuple[int, ...] = ()
    for i in sorted(range(len(pairs)), key=inputs.__getitem__):
        tokens = inputs[i]
        shared = 0
        for a, b in zip(previous, tokens, strict=False):
            if a != b:
                break
            shared += 1
        if not rows or (len(rows[-1].tokens) + len(tokens) - shared > row_tokens):
            rows.append(_Row([], [], []))
            shared = 0
        row = rows[-1]
        del path[shared:]
        for token in tokens[shared:]:
            path.append(row.add(token, path[-1] if path else -1))
        start = len(pairs[i][0]) - 1  # the context's last token predicts the first one
        placed[i] = (len(rows) - 1, path[start:])
        previous = tokens
    return rows, placed


def _slices_logits_by_mask() -> bool:
    """Whether this transformers computes logits only where a (batch, seq) boolean
    ``logits_to_keep`` says (5.x); otherwise all are computed and picked here."""
    try:
        from transformers.modeling_utils import slice_logits_to_keep
    except ImportError:
        return False
    keep = torch.tensor([[True, False], [False, True]])
    try:
        return tuple(slice_logits_to_keep(torch.zeros(2, 2, 1), keep).shape) == (2, 1)
    except (RuntimeError, IndexError, TypeError):
        return False


def _score(logprobs: torch.Tensor, continuation: list[int]) -> Score:
    """Sum the continuation's log-probabilities (one row of ``logprobs`` per token)."""
    target = torch.tensor(continuation, device=logprobs.device)
    picked = logprobs.gather(-1, target[:, None]).squeeze(-1)
    greedy = bool((logprobs.argmax(dim=-1) == target).all())
    return Score(float(picked.sum()), greedy, len(continuation))


def choice_metrics(loglikelihoods: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """lm-eval's multiple-choice metrics for one item.

    ``choices`` are the choice texts as lm-eval's ``doc_to_choice`` gives them: without the space
    that joins each to the context (the continuation scored is ``" " + choice``, the length that
    normalizes it is the choice's own). ``acc``: the most likely choice is the gold one.
    ``acc_norm``: the same after dividing each log-likelihood by the choice's length in
    characters; ``acc_bytes``: by its UTF-8 bytes.
    """
    lls = np.asarray(loglikelihoods, dtype=np.float64)
    chars = np.asarray([len(c) for c in choices], dtype=np.float64)
    nbytes = np.asarray([len(c.encode("utf-8")) for c in choices], dtype=np.float64)
    return {
        "acc": float(np.argmax(lls) == gold),
        "acc_norm": float(np.argmax(lls / chars) == gold),
        "acc_bytes": float(np.argmax(lls / nbytes) == gold),
    }


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports
    them."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = float(np.mean(values))
    stderr = float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return mean, stderr
