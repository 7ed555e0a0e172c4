"""Masking rules: 15% selection, 80/10/10, >= 1 mask per text (the first wordpiece), regions 15% and >= 1 per pair;
the batch-wide vectorised draws equal the original per-token rule applied example by example to the same draws;
[CLS]/[SEP]/pads are never masked in a collated batch."""

from __future__ import annotations

import numpy as np
import pytest

from uniter_fast.data import DetectFeatLmdb, MlmDataset, TxtTokLmdb, build_corpus
from uniter_fast.data.masking import mask_regions, mask_words

MASK, V = 4, (5, 30000)


def _sigma_ok(count: int, n: int, p: float, k: float = 5.0) -> bool:
    return abs(count - n * p) <= k * np.sqrt(n * p * (1 - p))


def _original_random_word(tokens: list[int], uniforms: list[float], random_ids: list[int]) -> tuple[list, list]:
    """The original ``random_word`` loop, token by token, fed with given uniforms and replacement ids."""
    out, labels = list(tokens), []
    for i, token in enumerate(tokens):
        prob = uniforms[i]
        if prob < 0.15:
            prob /= 0.15
            if prob < 0.8:
                out[i] = MASK
            elif prob < 0.9:
                out[i] = random_ids.pop(0)
            labels.append(token)
        else:
            labels.append(-1)
    if all(label == -1 for label in labels):
        labels[0] = tokens[0]
        out[0] = MASK
    return out, labels


def test_mask_words_equals_the_original_rule_per_text():
    rng = np.random.default_rng(7)
    lengths = rng.integers(1, 9, size=400)
    tokens = rng.integers(V[0], V[1], size=int(lengths.sum()))
    out, labels = mask_words(tokens, lengths, V, MASK, np.random.default_rng(11))
    # replay the same draws: one uniform per token, then one id per randomised token, in batch order
    replay = np.random.default_rng(11)
    uniforms = replay.random(tokens.size)
    n_random = int(((uniforms < 0.15) & (uniforms / 0.15 >= 0.8) & (uniforms / 0.15 < 0.9)).sum())
    random_ids = replay.integers(V[0], V[1], size=n_random).tolist()
    start = 0
    for n in lengths.tolist():
        want_out, want_labels = _original_random_word(
            tokens[start : start + n].tolist(), uniforms[start : start + n].tolist(), random_ids
        )
        assert out[start : start + n].tolist() == want_out and labels[start : start + n].tolist() == want_labels
        start += n
    assert not random_ids  # every replacement id was used, in order


def test_mlm_rates():
    tokens = np.random.default_rng(0).integers(V[0], V[1], size=200_000)
    out, labels = mask_words(tokens, np.array([tokens.size]), V, MASK, np.random.default_rng(1))
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
def test_mlm_at_least_one_per_text_and_first_forced(n):
    rng = np.random.default_rng(3)
    lengths = np.full(3000, n)
    tokens = rng.integers(V[0], V[1], size=lengths.sum())
    out, labels = mask_words(tokens, lengths, V, MASK, rng)
    per_text = (labels != -1).reshape(-1, n)
    assert per_text.any(axis=1).all()
    forced = (per_text.sum(1) == 1) & per_text[:, 0] & (out.reshape(-1, n)[:, 0] == MASK)
    assert forced.sum() > 0


def test_region_mask_rate_and_min():
    rng = np.random.default_rng(2)
    num_bbs = rng.integers(1, 40, size=5000)
    mask = mask_regions(num_bbs, rng)
    pieces = np.split(mask, np.cumsum(num_bbs)[:-1])
    assert all(piece.any() for piece in pieces)
    big = np.concatenate([p for p in pieces if p.size >= 30])
    assert _sigma_ok(int(big.sum()), big.size, 0.15)
    forced = mask_regions(np.full(5000, 5), rng, prob=1e-12).reshape(5000, 5)  # nothing selected: all forced
    assert (forced.sum(1) == 1).all()
    assert all(_sigma_ok(int(c), 5000, 0.2) for c in forced.sum(0))  # the forced region is uniform over the five


def test_bad_masking_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="num_bbs"):
        mask_regions(np.array([3, 0]), rng)
    with pytest.raises(ValueError, match="lengths must be positive counts summing to 3"):
        mask_words(np.array([7, 8, 9]), np.array([2, 2]), V, MASK, rng)
    with pytest.raises(ValueError, match="vocab_range"):
        mask_words(np.array([7]), np.array([1]), (9, 9), MASK, rng)


def test_special_and_pad_never_masked(tmp_path):
    paths = build_corpus(str(tmp_path / "c"), seed=2, n_train_images=20, n_val_images=4)
    txt = TxtTokLmdb(paths.txt_db)
    ds = MlmDataset(txt, DetectFeatLmdb(paths.img_db))
    batch = ds.batch(list(range(len(ds))), 0, layout="padded")
    labels, ids = batch["txt_labels"], batch["input_ids"]
    assert (labels[:, 0] == -1).all() and (ids[:, 0] == txt.cls_).all()
    assert (labels[ids == txt.sep] == -1).all() and (labels[ids == 0] == -1).all()
    assert ((labels != -1).sum(1) >= 1).all()
