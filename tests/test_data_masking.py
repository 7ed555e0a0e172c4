"""Masking rules: 15% selection, 80/10/10, >= 1 mask, [CLS]/[SEP]/pads never masked, regions 15% and >= 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniter_fast.data.collate import mlm_collate
from uniter_fast.data.masking import random_word, region_mask

MASK, V = 4, (5, 30000)


def _sigma_ok(count: int, n: int, p: float, k: float = 5.0) -> bool:
    return abs(count - n * p) <= k * np.sqrt(n * p * (1 - p))


def test_mlm_rates():
    rng = np.random.default_rng(0)
    tokens = rng.integers(V[0], V[1], size=200_000)
    out, labels = random_word(tokens, V, MASK, rng)
    selected = labels != -1
    n_sel = int(selected.sum())
    assert _sigma_ok(n_sel, tokens.size, 0.15)
    np.testing.assert_array_equal(labels[selected], tokens[selected])
    masked = selected & (out == MASK)
    kept = selected & (out == tokens)
    randomised = selected & ~masked & ~kept
    assert _sigma_ok(int(masked.sum()), n_sel, 0.8)
    assert _sigma_ok(int(randomised.sum()), n_sel, 0.1)
    assert _sigma_ok(int(kept.sum()), n_sel, 0.1 + 0.1 / (V[1] - V[0]))
    assert (out[randomised] >= V[0]).all() and (out[randomised] < V[1]).all()
    np.testing.assert_array_equal(out[~selected], tokens[~selected])


@pytest.mark.parametrize("n", [1, 2, 5])
def test_mlm_at_least_one_and_first_forced(n):
    forced = 0
    for seed in range(300):
        rng = np.random.default_rng(seed)
        tokens = rng.integers(V[0], V[1], size=n)
        out, labels = random_word(tokens, V, MASK, rng)
        assert (labels != -1).sum() >= 1
        if (labels != -1).sum() == 1 and labels[0] != -1 and out[0] == MASK:
            forced += 1
    assert forced > 0


def test_special_and_pad_never_masked():
    rng = np.random.default_rng(1)
    items = []
    for t in rng.integers(1, 12, size=20):
        tokens = rng.integers(V[0], 100, size=int(t))
        out, labels = random_word(tokens, V, MASK, rng)
        n = int(rng.integers(1, 5))
        items.append(
            {
                "input_ids": torch.tensor([2, *out.tolist(), 3]),
                "txt_labels": torch.tensor([-1, *labels.tolist(), -1]),
                "img_feat": torch.rand(n, 2048),
                "img_pos_feat": torch.rand(n, 7),
            }
        )
    batch = mlm_collate(items)
    labels, ids = batch["txt_labels"], batch["input_ids"]
    assert (labels[:, 0] == -1).all()
    assert (labels[ids == 3] == -1).all() and (labels[ids == 0] == -1).all()
    assert ((labels != -1).sum(1) >= 1).all()


def test_region_mask_rate_and_min():
    rng = np.random.default_rng(2)
    masks = [region_mask(int(n), rng) for n in rng.integers(1, 40, size=5000)]
    assert all(m.any() for m in masks)
    big = np.concatenate([m for m in masks if m.size >= 30])
    assert _sigma_ok(int(big.sum()), big.size, 0.15)
    with pytest.raises(ValueError, match="num_bb"):
        region_mask(0, rng)
    with pytest.raises(ValueError, match="tokens"):
        random_word(np.array([], dtype=np.int64), V, MASK, rng)
