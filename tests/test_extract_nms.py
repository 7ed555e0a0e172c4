"""Batched greedy NMS against the cpu_nms loop, and the vectorised max-confidence loop against generate_npz.py's
1,600-NMS loop (tests/extract_reference.py), on fresh random boxes, ragged batches, ties and exact thresholds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import extract_reference as ref
from uniter_fast.extract.nms import max_confidence, pack_bits, rpn_nms
from uniter_fast.extract.roi_pool import torchvision_ops_available


def random_boxes(rng: np.random.Generator, n: int, extent: float = 300.0, size: float = 120.0) -> np.ndarray:
    """n float32 boxes with fractional corners, clustered so that many overlap."""
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(4, size, (n, 2))
    return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpn_nms_equals_cpu_nms_on_a_ragged_batch(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts, n = [150, 90, 0], 150
    boxes = np.zeros((3, n, 4), dtype=np.float32)
    expected = []
    for b, count in enumerate(counts):
        bx = random_boxes(rng, count)
        scores = rng.random(count).astype(np.float32)
        order = np.array(sorted(range(count), key=lambda i: (-scores[i], i)), dtype=np.int64)
        boxes[b, :count] = bx[order]
        keep = ref.cpu_nms(np.hstack([bx, scores[:, None]]), 0.7)
        expected.append(sorted(int(np.where(order == k)[0][0]) for k in keep))  # ranks of the kept boxes
    keep = rpn_nms(torch.from_numpy(boxes), torch.tensor(counts), 0.7, max_keep=n)
    for b in range(3):
        assert keep[b].nonzero().squeeze(1).tolist() == expected[b]
    capped = rpn_nms(torch.from_numpy(boxes), torch.tensor(counts), 0.7, max_keep=10)
    for b in range(3):
        assert capped[b].nonzero().squeeze(1).tolist() == expected[b][:10]


def test_threshold_is_compared_as_the_original_double() -> None:
    # IoU = 70 / 100 computes to float32(0.7) = 0.69999999 < 0.7: cpu_nms keeps both; at 0.3, 30/100 suppresses.
    big, small = [0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 6.0]
    boxes = torch.tensor([[big, small]])
    assert rpn_nms(boxes, torch.tensor([2]), 0.7, 10)[0].tolist() == [True, True]
    assert ref.cpu_nms(np.array([big + [1.0], small + [0.5]]), 0.7) == [0, 1]
    third = torch.tensor([[big, [0.0, 0.0, 9.0, 2.0]]])  # 30 / 100 = float32(0.3) > 0.3
    assert rpn_nms(third, torch.tensor([2]), 0.3, 10)[0].tolist() == [True, False]
    assert ref.cpu_nms(np.array([big + [1.0], [0.0, 0.0, 9.0, 2.0, 0.5]]), 0.3) == [0]


def test_pack_bits_round_trip() -> None:
    mask = torch.rand(3, 5, 70) > 0.5
    words = pack_bits(mask)
    assert words.shape == (3, 5, 3)
    bits = (words[..., :, None] >> torch.arange(32)) & 1
    assert torch.equal(bits.reshape(3, 5, 96)[..., :70].bool(), mask)


@pytest.mark.parametrize("seed", [0, 1])
def test_max_confidence_equals_the_per_class_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    counts, classes = [70, 41, 1], 40
    longest = max(counts)
    boxes = np.zeros((len(counts), longest, 4), dtype=np.float32)
    probs = np.zeros((len(counts), longest, classes + 1), dtype=np.float32)
    valid = np.zeros((len(counts), longest), dtype=bool)
    expected = []
    for b, count in enumerate(counts):
        boxes[b, :count] = random_boxes(rng, count)
        logits = rng.normal(0, 2.0, (count, classes + 1))
        probs[b, :count] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
        valid[b, :count] = True
        expected.append(ref.max_conf_loop(boxes[b, :count], probs[b, :count], 0.3))
    conf = max_confidence(torch.from_numpy(boxes), torch.from_numpy(probs[:, :, 1:]), torch.from_numpy(valid), 0.3)
    for b, count in enumerate(counts):
        np.testing.assert_array_equal(conf[b, :count].numpy(), expected[b].astype(np.float32))
        assert (conf[b, count:] == 0).all()


def test_max_confidence_ties_visit_the_lower_index_first() -> None:
    # two identical-score, heavily overlapping boxes: the lower index is kept, the other gets nothing from this class
    boxes = torch.tensor([[[0.0, 0.0, 50.0, 50.0], [1.0, 1.0, 51.0, 51.0], [200.0, 200.0, 240.0, 240.0]]])
    scores = torch.tensor([[[0.4], [0.4], [0.1]]])
    conf = max_confidence(boxes, scores, torch.ones(1, 3, dtype=torch.bool), 0.3)
    assert conf.tolist() == [[pytest.approx(0.4), 0.0, pytest.approx(0.1)]]
    np.testing.assert_array_equal(
        ref.max_conf_loop(boxes[0].numpy(), np.concatenate([np.zeros((3, 1)), scores[0].numpy()], 1)),
        conf[0].numpy().astype(np.float64),
    )


@pytest.mark.skipif(not torchvision_ops_available(), reason="torchvision.ops does not load beside this torch")
def test_torchvision_nms_on_shifted_boxes_matches_away_from_ties() -> None:
    from torchvision.ops import nms

    rng = np.random.default_rng(3)
    bx = random_boxes(rng, 200)
    scores = rng.random(200).astype(np.float32)
    expected = ref.cpu_nms(np.hstack([bx, scores[:, None]]), 0.7)
    got = nms(torch.from_numpy(bx) + torch.tensor([0.0, 0.0, 1.0, 1.0]), torch.from_numpy(scores), 0.7)
    assert got.tolist() == expected
