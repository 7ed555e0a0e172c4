"""Masking rules of the pretraining tasks (uniter.md §2): MLM 15% with 80/10/10, MRM 15% of regions, >= 1 each."""

from __future__ import annotations

import numpy as np

MASK_PROB = 0.15


def random_word(
    tokens: np.ndarray, vocab_range: tuple[int, int], mask_id: int, rng: np.random.Generator, prob: float = MASK_PROB
) -> tuple[np.ndarray, np.ndarray]:
    """The original ``random_word`` on wordpieces without [CLS]/[SEP].

    tokens: int64 [n], n >= 1. Each token is selected with ``prob``; selected tokens become [MASK] (80%), a uniform
    random id from ``vocab_range`` = [lo, hi) (10%) or stay (10%), and are labelled with their original id. If none
    was selected the first token is forced to [MASK]. Returns (masked tokens int64 [n], labels int64 [n], -1 = not
    masked).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ValueError(f"tokens must be a non-empty 1-d array, got shape {tokens.shape}")
    lo, hi = vocab_range
    if not 0 <= lo < hi:
        raise ValueError(f"vocab_range must be [lo, hi) with 0 <= lo < hi, got {vocab_range}")
    u = rng.random(tokens.size)
    selected = u < prob
    kind = u / prob
    out = tokens.copy()
    out[selected & (kind < 0.8)] = mask_id
    rand = selected & (kind >= 0.8) & (kind < 0.9)
    out[rand] = rng.integers(lo, hi, size=int(rand.sum()))
    labels = np.where(selected, tokens, -1)
    if not selected.any():
        labels[0] = tokens[0]
        out[0] = mask_id
    return out, labels


def region_mask(num_bb: int, rng: np.random.Generator, prob: float = MASK_PROB) -> np.ndarray:
    """bool [num_bb]: each region masked with ``prob`` (no 80/10/10); one random region forced if none was."""
    if num_bb < 1:
        raise ValueError(f"num_bb must be >= 1, got {num_bb}")
    mask = rng.random(num_bb) < prob
    if not mask.any():
        mask[rng.integers(num_bb)] = True
    return mask
