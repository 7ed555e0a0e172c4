"""Masking rules of the pretraining tasks (``data/mlm.py``, ``data/mrm.py``), drawn for a whole batch at once from
one generator.

MLM: each wordpiece ([CLS]/[SEP] are not passed in) is selected with p = 0.15; a selected token becomes [MASK]
(80 %), a uniform random id from ``v_range`` (10 %) or stays (10 %), and is labelled with its original id; a text
with no selected token gets its first wordpiece masked and labelled. MRM: each region is masked with p = 0.15 (no
80/10/10); a text-image pair with no masked region gets one region, chosen uniformly, masked.

The draws of a batch, in order: one uniform per wordpiece (or region) of the batch, examples in batch order; then
(MLM) one random id per randomised token in that order, or (MRM) one index per example that had no masked region.
"""

from __future__ import annotations

import numpy as np

MASK_PROB = 0.15


def _check_lengths(name: str, lengths: np.ndarray, total: int) -> np.ndarray:
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.ndim != 1 or lengths.size == 0 or (lengths < 1).any() or int(lengths.sum()) != total:
        raise ValueError(f"{name} must be positive counts summing to {total}, got {lengths.tolist()}")
    return lengths


def mask_words(
    tokens: np.ndarray,
    lengths: np.ndarray,
    vocab_range: tuple[int, int],
    mask_id: int,
    rng: np.random.Generator,
    prob: float = MASK_PROB,
) -> tuple[np.ndarray, np.ndarray]:
    """The original ``random_word`` over a batch of texts.

    Args:
        tokens: int64 [W], the wordpieces (no [CLS]/[SEP]) of every text, one after the other.
        lengths: int64 [B] >= 1, wordpieces per text (sum W).
        vocab_range: [lo, hi) of the random replacement ids. mask_id: the [MASK] id.
        rng: the batch's generator. prob: selection probability.

    Returns:
        masked tokens int64 [W] and labels int64 [W] (original id where selected, else -1).
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    lengths = _check_lengths("lengths", lengths, tokens.size)
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
    starts = np.cumsum(lengths) - lengths
    none = np.add.reduceat(selected, starts) == 0
    forced = starts[none]
    selected[forced] = True
    out[forced] = mask_id
    return out, np.where(selected, tokens, -1)


def mask_regions(num_bbs: np.ndarray, rng: np.random.Generator, prob: float = MASK_PROB) -> np.ndarray:
    """bool [Σn]: each region of every example (examples in order) masked with ``prob``; one forced where none was.

    num_bbs: int64 [B] >= 1, regions per example.
    """
    num_bbs = np.asarray(num_bbs, dtype=np.int64)
    if num_bbs.ndim != 1 or num_bbs.size == 0 or (num_bbs < 1).any():
        raise ValueError(f"num_bbs must be a non-empty list of counts >= 1, got {num_bbs.tolist()}")
    if not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    mask = rng.random(int(num_bbs.sum())) < prob
    starts = np.cumsum(num_bbs) - num_bbs
    none = np.flatnonzero(np.add.reduceat(mask, starts) == 0)
    mask[starts[none] + rng.integers(0, num_bbs[none])] = True
    return mask
