"""Labels from a model (FineWeb-Edu's recipe): a causal LM rates a sample of the crawl.

FineWeb-Edu had a large model rate web pages for educational value on an additive 0-5 scale,
took the pages rated 3 or more as positives, and trained a small classifier on those labels to
score the whole crawl, since the rater itself is far too slow for that. Here the rater is any
model the evaluate stage loads (:func:`~llmflow.tasks.evaluate.model_loading.load_causal_lm`:
a Hugging Face folder, a GGUF file, an llmflow run) and the classifier is the same fast one as
the other label recipes'.

The rating is read, not generated: one forward pass per document, and the next token's
probabilities over the tokens "0".."5" (each digit alone or after a space, whichever the
tokenizer has as one token), renormalized over the six. The answer is begun for the model
(``Score:`` after the chat template's generation prompt, or on a line after a plain prompt) so
that the next token is the digit: on SmolLM2-135M-Instruct the digits' share of it rose from
0.14 to 0.65, and its ratings told 35 prose documents from 20 junk ones at a ROC AUC of 0.81
instead of 0.53. ``rater_digit_mass`` records that share: a low one says the model ignored the
prompt. The rating is the digits' expected value, not the argmax: a small model's likeliest
digit is the same for nearly every document (SmolLM2-135M: "2"), while the expected value still
orders them, so a cut between digits keeps a meaning and ties at it are rare.

Ratings cost a forward pass each (SmolLM2-135M on 2 CPU cores: ~0.5 documents a second at
up to 2,000 characters), so they are kept in ``_ratings/`` under the stage, keyed by the rater's
digest, the prompt, the character limit and the sample: a changed cut re-labels from them
without loading the model.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from llmflow.tasks.core import shards
from llmflow.tasks.core.progress import StepProgress
from llmflow.tasks.core.stage import cached_table
from llmflow.tasks.curate.quality_model_labels import Labelled, crawl_sample

if TYPE_CHECKING:
    from llmflow.tasks.curate.quality_model import QualityModelConfig

__all__ = ["DEFAULT_PROMPT", "RatedLabels", "labels_from_ratings", "rate_sample", "rater_labels"]

SCORES = "012345"
RATINGS_DIR = "_ratings"
RATINGS_VERSION = "1"  # bump when the same model and prompt would rate differently
ANSWER = "Score:"
BATCH_SIZE = 8  # documents a forward pass: bounded memory, as only the last logits are kept

# FineWeb-Edu's additive prompt, shortened for a small model's context and attention.
DEFAULT_PROMPT = """\
Below is an extract from a web page. Rate its educational value, for teaching from primary \
school to college, on an additive 0 to 5 scale:
- 0 points if it has no educational value: menus, ads, spam, boilerplate or gibberish.
- Add 1 point if it gives some basic information on an educational topic, even mixed with ads.
- Add 1 point if it covers parts of an educational topic but is incomplete or disorganized.
- Add 1 point if it suits teaching and introduces key concepts coherently.
- Add 1 point if it is highly relevant for teaching, clear and focused, like a textbook section.
- Add 1 point if it is outstanding for teaching: detailed, accurate and easy to follow.

Extract:
{text}

Answer with the total score only, a single digit from 0 to 5."""


@dataclass
class RatedLabels(Labelled):
    """Labels split from ratings, with what ``metrics.json`` records of how they were made."""

    details: dict[str, Any] = field(default_factory=dict)


def prompt_of(config: QualityModelConfig) -> str:
    return config.rater_prompt or DEFAULT_PROMPT


def score_token_ids(tokenizer: Any) -> list[list[int]]:
    """For each digit 0..5, its single-token forms ("3" and " 3" where each is one token)."""
    found = []
    for digit in SCORES:
        ids = {
            e[0]
            for e in (tokenizer.encode(f, add_special_tokens=False) for f in (digit, f" {digit}"))
            if len(e) == 1
        }
        if not ids:
            raise ValueError(f"rater: its tokenizer has no single token for the score {digit!r}")
        found.append(sorted(ids))
    return found


def answer_start(tokenizer: Any) -> str:
    """``Score:``, and a space after it where the tokenizer has no single token for a digit
    after a space (SmolLM2's: the space would be the next token, not the digit)."""
    spaced = all(len(tokenizer.encode(f" {d}", add_special_tokens=False)) == 1 for d in SCORES)
    return ANSWER if spaced else f"{ANSWER} "


def prompt_ids(tokenizer: Any, prompt: str, text: str) -> list[int]:
    """The prompt with the document in place of ``{text}`` (replaced, not ``format``ed: a
    document or a prompt may hold braces), as the user's turn of the tokenizer's chat
    template when it has one, else as plain text; then the answer's start."""
    content = prompt.replace("{text}", text)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return list(tokenizer.encode(rendered + answer_start(tokenizer), add_special_tokens=False))
    return list(tokenizer.encode(f"{content}\n{answer_start(tokenizer)}"))


def _fitted_ids(tokenizer: Any, prompt: str, text: str, limit: int | None) -> list[int]:
    """The prompt's ids, the document shortened until they fit the model's context."""
    ids = prompt_ids(tokenizer, prompt, text)
    while limit and len(ids) > limit and text:
        text = text[: max(0, len(text) * limit // len(ids) - 16)]
        ids = prompt_ids(tokenizer, prompt, text)
    if limit and len(ids) > limit:
        raise ValueError(f"rater: the prompt alone is {len(ids)} tokens, over its {limit}")
    return ids


def rate_texts(
    model: Any,
    tokenizer: Any,
    prompt: str,
    texts: list[str],
    advance: Callable[[int], None] = lambda n: None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each text's rating (expected score, 0..5) and the digits' share of the next token.

    Texts go by length in left-padded batches (positions counted from each row's first real
    token, so padding does not move them); the order is fixed, so the ratings are too.
    """
    import torch

    digits = score_token_ids(tokenizer)
    limit = getattr(model.config, "max_position_embeddings", None)
    encoded = [_fitted_ids(tokenizer, prompt, t, limit) for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    keep = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )
    values = torch.arange(len(SCORES), dtype=torch.float32)
    ratings = np.zeros(len(texts), np.float32)
    mass = np.zeros(len(texts), np.float32)
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    with torch.inference_mode():
        for start in range(0, len(order), BATCH_SIZE):
            batch = order[start : start + BATCH_SIZE]
            width = max(len(encoded[i]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(batch):
                ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                mask[row, width - len(encoded[i]) :] = 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(
                input_ids=ids.to(model.device),
                attention_mask=mask.to(model.device),
                position_ids=positions.to(model.device),
                **keep,
            )
            logprobs = torch.log_softmax(out.logits[:, -1].float().cpu(), dim=-1)
            per_digit = torch.stack([torch.logsumexp(logprobs[:, d], -1) for d in digits], -1)
            ratings[batch] = (torch.softmax(per_digit, -1) @ values).numpy()
            mass[batch] = per_digit.exp().sum(-1).numpy()
            advance(len(batch))
    return ratings, mass


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()


def rate_sample(
    texts: list[str], config: QualityModelConfig, stage_dir: str, rater_digest: str
) -> tuple[pa.Table, bool]:
    """The ratings (``text_sha256``, ``rating``, ``digit_mass``) of the sampled texts, in
    their order: from ``_ratings/`` when this rater, prompt and sample were rated already,
    else rated (the model is loaded only then). Returns them and whether they were reused."""
    prompt, limit = prompt_of(config), config.rater_max_chars
    sample = _digest(*texts)
    material = [RATINGS_VERSION, rater_digest, prompt, str(limit), sample]
    key = _digest(json.dumps(material))
    path = shards.join(stage_dir, RATINGS_DIR, f"{key[:16]}.parquet")

    def compute() -> pa.Table:
        ratings, mass = np.zeros(0, np.float32), np.zeros(0, np.float32)
        if texts:  # nothing sampled: no model to load
            from llmflow.tasks.evaluate.model_loading import load_causal_lm

            assert config.rater is not None
            model, tokenizer = load_causal_lm(config.rater, config.rater_device)
            label = f"quality_model: rating {len(texts)} documents"
            with StepProgress("quality_model-rater", label, len(texts)) as progress:
                shown = [t[:limit] for t in texts]
                ratings, mass = rate_texts(model, tokenizer, prompt, shown, progress.advance)
        digests = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).hexdigest() for t in texts]
        return pa.table(
            {"text_sha256": digests, "rating": pa.array(ratings), "digit_mass": pa.array(mass)}
        )

    return cached_table(path, key, compute)


def labels_from_ratings(texts: list[str], ratings: np.ndarray, cut: float) -> Labelled:
    """Texts rated at or above ``cut`` are positives, the rest negatives. A side may be empty:
    training then says so, and the stage handles it as for any label source."""
    labelled = Labelled()
    for text, rating in zip(texts, ratings.tolist(), strict=True):
        (labelled.positives if rating >= cut else labelled.negatives).append(text)
    return labelled


def rater_labels(
    config: QualityModelConfig, sample_dir: str, stage_dir: str, rater_digest: str
) -> RatedLabels:
    """The labels of ``labels: model``: ``rater_documents`` documents of the crawl sampled
    (as the reference recipe samples negatives), rated, split at ``rater_cut``; with the
    rater, prompt, cut, count and histogram (bin k: ratings in [k, k+1)) for ``metrics.json``."""
    texts = crawl_sample(sample_dir, config.rater_documents, config.classifier.max_chars)
    table, _ = rate_sample(texts, config, stage_dir, rater_digest)
    ratings = table.column("rating").to_numpy()
    split = labels_from_ratings(texts, ratings, config.rater_cut)
    bins = np.bincount(np.clip(ratings, 0, 5).astype(int), minlength=6)
    mass = table.column("digit_mass").to_numpy()
    details = {
        "rater": config.rater,
        "rater_prompt": prompt_of(config),
        "rater_cut": config.rater_cut,
        "rater_rated": len(texts),
        "rater_histogram": {str(k): int(n) for k, n in enumerate(bins)},
        "rater_mean": float(ratings.mean()) if len(texts) else 0.0,
        "rater_digit_mass": float(mass.mean()) if len(texts) else 0.0,
    }
    return RatedLabels(split.positives, split.negatives, split.skipped, details)
