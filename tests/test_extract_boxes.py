"""Anchors, box decoding, clipping, size filter, legacy IoU, C rounding, thresholds: each against the py-faster-rcnn
definition (tests/extract_reference.py) or a hand-checked value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import extract_reference as ref
from uniter_fast.extract.boxes import (
    caffe_anchors,
    clip_boxes,
    decode_boxes,
    float32_at_least,
    large_enough,
    legacy_areas,
    legacy_iou,
    round_half_away,
    shifted_anchors,
)

# The anchors of the BUTD test.prototxt's ProposalLayer (peteanderson80/bottom-up-attention, feat_stride 16,
# scales (4, 8, 16, 32), lib/rpn/proposal_layer.py), written out: ratio-major.
SPEC_ANCHORS = [
    [-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-24, -24, 39, 39], [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-14, -36, 29, 51], [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]  # fmt: skip


def test_caffe_anchors_are_the_exact_list() -> None:
    assert caffe_anchors().tolist() == SPEC_ANCHORS
    assert np.array_equal(ref.generate_anchors(), np.array(SPEC_ANCHORS, dtype=float))


def test_anchors_end_short_of_the_stride_grid() -> None:
    # airsplay issue #1: the Caffe anchors are "shifted" (centre 7.5, not 8); kept for parity.
    a = caffe_anchors()
    assert torch.equal((a[:, 0] + a[:, 2]) / 2, torch.full((12,), 7.5))


def test_shifted_anchors_order_is_h_w_a() -> None:
    cell = caffe_anchors()
    grid = shifted_anchors(cell, 3, 5, 16)
    assert grid.shape == (3 * 5 * 12, 4)
    h, w, a = 2, 3, 7
    expected = cell[a] + torch.tensor([w * 16, h * 16, w * 16, h * 16], dtype=torch.float32)
    assert torch.equal(grid[(h * 5 + w) * 12 + a], expected)
    assert torch.equal(grid[:12], cell)  # shifts start at 0, no half-stride offset


def test_decode_clip_filter_match_numpy() -> None:
    rng = np.random.default_rng(1)
    anchors = ref.generate_anchors().astype(np.float32)[rng.integers(0, 12, 500)]
    anchors += rng.integers(0, 600, (500, 1)).astype(np.float32) * np.array([1, 0, 1, 0], dtype=np.float32)
    deltas = rng.normal(0, 0.5, (500, 4)).astype(np.float32)
    expected = ref.clip_boxes(ref.bbox_transform_inv(anchors, deltas), (400, 600))
    got = clip_boxes(decode_boxes(torch.from_numpy(anchors), torch.from_numpy(deltas)), 400, 600)
    # exp may differ by an ulp, and x1 = ctr - w/2 cancels digits
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=2e-4)
    min_size = torch.tensor(16 * np.float32(0.8))
    ws, hs = expected[:, 2] - expected[:, 0] + 1, expected[:, 3] - expected[:, 1] + 1
    keep = (ws >= np.float32(16) * np.float32(0.8)) & (hs >= np.float32(16) * np.float32(0.8))
    assert torch.equal(large_enough(torch.from_numpy(expected), min_size), torch.from_numpy(keep))


def test_decode_uses_plus_one_widths_and_no_minus_one_on_x2() -> None:
    # anchor [0, 0, 15, 15]: w = 16, ctr = 8; zero deltas give [0, 0, 16, 16] (x2 = ctr + w/2, not ctr + w/2 - 1)
    box = decode_boxes(torch.tensor([[0.0, 0.0, 15.0, 15.0]]), torch.zeros(1, 4))
    assert box.tolist() == [[0.0, 0.0, 16.0, 16.0]]


def test_size_filter_keeps_equality() -> None:
    boxes = torch.tensor([[0.0, 0.0, 15.0, 15.0], [0.0, 0.0, 14.9, 20.0]])
    assert large_enough(boxes, torch.tensor(16.0)).tolist() == [True, False]


def test_legacy_iou_plus_one() -> None:
    a = torch.tensor([0.0, 0.0, 9.0, 9.0])  # area 100 with +1
    b = torch.tensor([5.0, 0.0, 14.0, 9.0])  # overlap 5 x 10 = 50
    iou = legacy_iou(a, b, legacy_areas(a), legacy_areas(b))
    assert iou.item() == pytest.approx(50 / 150)
    touching = torch.tensor([10.0, 0.0, 19.0, 9.0])  # x1 = 10 > 9: no overlap even with +1
    assert legacy_iou(a, touching, legacy_areas(a), legacy_areas(touching)).item() == 0.0


@pytest.mark.parametrize("threshold", [0.3, 0.7, 0.2, 0.5, 0.1])
def test_float32_threshold_equals_double_comparison(threshold: float) -> None:
    t = float32_at_least(threshold)
    below = np.nextafter(np.float32(t), np.float32(0))
    assert float(t) >= threshold and float(below) < threshold
    values = np.array([below, t, np.nextafter(np.float32(t), np.float32(1))], dtype=np.float32)
    as_double = values.astype(np.float64) >= threshold
    assert np.array_equal(torch.from_numpy(values) >= t, torch.from_numpy(as_double))


def test_plain_float32_cast_of_0_7_would_suppress_one_value_more() -> None:
    v = np.float32(0.7)  # rounds down below 0.7
    assert float(v) < 0.7 and not float(v) >= 0.7
    assert not (torch.tensor(v) >= float32_at_least(0.7)).item()


def test_round_half_away_from_zero() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 2.4999998, 0.49999997, 3.0, -3.7], dtype=torch.float32)
    expected = [1.0, 2.0, 3.0, -1.0, -3.0, 2.0, 0.0, 3.0, -4.0]
    assert round_half_away(x).tolist() == expected
    assert torch.round(torch.tensor(2.5)).item() == 2.0  # why torch.round is not enough
