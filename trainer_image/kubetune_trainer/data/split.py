"""Deterministic train/eval split by content hash: identical examples always land on the same side."""

from __future__ import annotations

import hashlib
import math
from collections import Counter

from .conversation import Conversation


def _rank(seed: int, content_hash: str) -> str:
    return hashlib.sha256(f"{seed}:{content_hash}".encode()).hexdigest()


def split_by_hash(examples: list[Conversation], eval_fraction: float, seed: int
                  ) -> tuple[list[Conversation], list[Conversation]]:
    """Hold out round(eval_fraction x distinct examples) distinct contents (at least one when the fraction > 0)."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"evalSplit must be in [0, 1), got {eval_fraction}")
    hashes = [ex.content_hash() for ex in examples]
    distinct = sorted(set(hashes), key=lambda h: _rank(seed, h))
    if eval_fraction == 0.0 or len(distinct) < 2:
        return list(examples), []
    n_eval = min(len(distinct) - 1, max(1, math.floor(eval_fraction * len(distinct) + 0.5)))
    held_out = set(distinct[:n_eval])
    train = [ex for ex, h in zip(examples, hashes) if h not in held_out]
    evals = [ex for ex, h in zip(examples, hashes) if h in held_out]
    return train, evals


def duplicate_count(examples: list[Conversation]) -> int:
    """How many examples repeat an earlier example's content."""
    counts = Counter(ex.content_hash() for ex in examples)
    return sum(c - 1 for c in counts.values())
