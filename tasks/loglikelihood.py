"""Log-likelihood scoring of continuations, as lm-evaluation-harness defines it, computed once per
shared context.

A multiple-choice item is a context and several continuations; the model's answer is the
continuation it finds most likely. The numbers are only worth anything if they are the reference
harness's numbers, so the tokenization of a (context, continuation) pair is lm-eval's
(``_encode_pair``: trailing spaces of the context move to the continuation, the pair is encoded as
one string and the continuation's tokens are what follows the context's own encoding), an empty
context is the model's prefix token, and a request longer than the model keeps its last
``max_length`` tokens. What differs is the cost: lm-eval runs the whole sequence once per
continuation; here the context runs once, its key/value cache is repeated for the choices, and
only the continuations are computed per choice.

Models are anything transformers loads as a causal LM: a Hugging Face directory, a GGUF file, or
one of our checkpoints through its export (:func:`llmflow.tasks.pretrain.export_hf`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


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


class LoglikelihoodScorer:
    """Scores groups of continuations that share a context with a transformers causal LM."""

    def __init__(
        self, model: Any, tokenizer: Any, max_length: int | None = None, batch_size: int = 8
    ) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.tokenizer = tokenizer
        configured = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_length = max_length or configured
        self.device = next(model.parameters()).device

    def _pairs(
        self, contexts: Sequence[str], continuations: Sequence[str]
    ) -> list[tuple[list[int], list[int]]]:
        pairs = []
        for context, continuation in zip(contexts, continuations, strict=True):
            context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
            if not context:
                context_ids = [prefix_token_id(self.tokenizer)]
                continuation_ids = self.tokenizer.encode(continuation, add_special_tokens=False)
            if not continuation_ids:
                raise ValueError(f"continuation {continuation!r} encodes to no tokens")
            pairs.append((context_ids, continuation_ids))
        return pairs

    @torch.no_grad()
    def score(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[Score]:
        """One score per (context, continuation). Requests with the same context ids share one
        forward pass over it, and up to ``batch_size`` such contexts with the same number of
        continuations run together; requests too long to share are scored alone, as lm-eval
        scores every request."""
        pairs = self._pairs(contexts, continuations)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context_ids, _) in enumerate(pairs):
            groups.setdefault(tuple(context_ids), []).append(i)
        scores: list[Score | None] = [None] * len(pairs)
        by_size: dict[int, list[tuple[list[int], list[int]]]] = {}
        for context_key, members in groups.items():
            conts = [pairs[i][1] for i in members]
            if len(context_key) + max(map(len, conts)) - 1 <= self.max_length:
                by_size.setdefault(len(members), []).append((list(context_key), members))
            else:  # too long to share: truncate on the left per request, as lm-eval does
                for i in members:
                    scores[i] = self._alone(*pairs[i])
        for same_size in by_size.values():
            # Similar lengths batched together waste least on padding (lm-eval sorts too): the
            # continuations' pass has n rows a context, so their length comes first.
            same_size.sort(key=lambda g: (max(len(pairs[i][1]) for i in g[1]), len(g[0])))
            for start in range(0, len(same_size), self.batch_size):
                batch = same_size[start : start + self.batch_size]
                work = [(ctx, [pairs[i][1] for i in members]) for ctx, members in batch]
                for (_, members), group_scores in zip(batch, self._shared(work), strict=True):
                    for i, score in zip(members, group_scores, strict=True):
                        scores[i] = score
        return [s for s in scores if s is not None]

    @torch.no_grad()
    def _shared(self, groups: list[tuple[list[int], list[list[int]]]]) -> list[list[Score]]:
        """Contexts (left-padded, one forward) and then all their continuations (one forward
        over the cache repeated per continuation). Every group has the same number of
        continuations."""
        n = len(groups[0][1])
        width = max(len(ctx) for ctx, _ in groups)
        pad = groups[0][0][0]  # any id: padded positions are masked out
        ids = torch.tensor([[pad] * (width - len(c)) + c for c, _ in groups], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(c)) + [1] * len(c) for c, _ in groups], device=self.device
        )
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        first = F.log_softmax(out.logits[:, -1].float(), dim=-1)
        conts = [c for _, group in groups for c in group]
        longest = max(map(len, conts))
        rest = None
        if longest > 1:
            cache = out.past_key_values
            cache.batch_repeat_interleave(n)
            rows = torch.tensor(
                [c[:-1] + [pad] * (longest - len(c)) for c in conts], device=self.device
            )
            lengths = torch.tensor([len(c) for c, _ in groups], device=self.device)
            follow = self.model(
                input_ids=rows,
                attention_mask=torch.cat(
                    [mask.repeat_interleave(n, 0), torch.ones_like(rows)], dim=1
                ),
                position_ids=lengths.repeat_interleave(n)[:, None]
                + torch.arange(longest - 1, device=self.device),
                past_key_values=cache,
                use_cache=True,
            )
            rest = F.log_softmax(follow.logits.float(), dim=-1)
        results = []
        for g in range(len(groups)):
            group_scores = []
            for j in range(n):
                row = g * n + j
                continuation = conts[row]
                logprobs = [first[g]]
                if rest is not None:
                    logprobs += [rest[row, k] for k in range(len(continuation) - 1)]
                group_scores.append(_score(torch.stack(logprobs), continuation))
            results.append(group_scores)
        return results

    @torch.no_grad()
    def _alone(self, context: list[int], continuation: list[int]) -> Score:
        whole = (context + continuation)[-(self.max_length + 1) :][:-1]
        logits = self.model(input_ids=torch.tensor([whole], device=self.device)).logits[0]
        # a continuation longer than the window itself (a small model's short context): only
        # its last max_length tokens have a prediction inside the window, and those are scored
        scored = continuation[-self.max_length :]
        logprobs = F.log_softmax(logits[-len(scored) :].float(), dim=-1)
        return _score(logprobs, scored)


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
