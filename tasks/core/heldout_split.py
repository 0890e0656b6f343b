"""Which records are held out: a pure function of each record's id.

One rule for every split llmflow makes (the tokenizer's measurement documents, the token shards'
validation split, SFT's held-out conversations), so that the held-out set never leaks into
training, does not depend on the order records arrive in, and adding records never moves old
ones between the splits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def is_validation(ids: Sequence[str], fraction: float) -> list[bool]:
    """Whether each id is in the validation split.

    sha256 of the id, first 8 bytes as a big-endian integer, over 2**64: a uniform number in
    [0, 1) that depends on nothing but the id.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"validation fraction must be in [0, 1], got {fraction}")
    return [
        int.from_bytes(hashlib.sha256(i.encode("utf-8")).digest()[:8], "big") / 2**64 < fraction
        for i in ids
    ]
