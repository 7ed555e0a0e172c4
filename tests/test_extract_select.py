"""Box selection and npz fields as generate_npz.py writes them, and the agreement figures used by the benchmarks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import extract_reference as ref
from uniter_fast.extract import DetectorConfig
from uniter_fast.extract.agreement import agreement
from uniter_fast.extract.select import Detections, normalized_boxes, npz_record, select_boxes


@pytest.mark.parametrize(
    "passing,lo,hi",
    [(150, 100, 100), (40, 100, 100), (100, 100, 100), (5, 10, 100), (50, 10, 100), (130, 10, 100)],
)
def test_selection_matches_generate_npz(passing: int, lo: int, hi: int) -> None:
    rng = np.random.default_rng(passing + lo)
    conf = np.concatenate([rng.uniform(0.2, 1.0, passing), rng.uniform(0.0, 0.2, 300 - passing)]).astype(np.float32)
    conf[passing + rng.integers(0, 300 - passing, 5)] = 0.0  # ties at zero (boxes that no class kept)
    rng.shuffle(conf)
    got = select_boxes(torch.from_numpy(conf), 0.2, lo, hi).numpy()
    expected = ref.select_boxes(conf.astype(np.float64), 0.2, lo, hi)
    assert np.array_equal(got, expected)
    if lo <= passing <= hi:  # RoI order, not confidence order
        assert np.all(np.diff(got) > 0)


def test_threshold_compares_the_float32_value_in_float64() -> None:
    below = np.nextafter(np.float32(0.2), np.float32(0))
    conf = torch.tensor([np.float32(0.2), below, 0.9], dtype=torch.float32)
    assert select_boxes(conf, 0.2, 1, 3).tolist() == [0, 2]  # float32(0.2) > 0.2 passes; the one below does not


def test_norm_bb_and_record_fields() -> None:
    boxes = torch.tensor([[10.0, 20.0, 110.0, 70.0], [0.0, 0.0, 199.0, 99.0]])
    bb = normalized_boxes(boxes, height=100, width=200)
    expected = [[0.05, 0.2, 0.55, 0.7, 0.5, 0.5], [0.0, 0.0, 0.995, 0.99, 0.995, 0.99]]
    np.testing.assert_allclose(bb.numpy(), expected, rtol=1e-6)
    det = Detections(boxes, torch.randn(2, 2048), torch.softmax(torch.randn(2, 1601), 1), torch.tensor([0.1, 0.7]),
                     torch.softmax(torch.randn(2, 401), 1), (100, 200))  # fmt: skip
    record = npz_record(det, DetectorConfig(), attributes=True)
    assert {k: v.shape for k, v in record.items()} == {
        "features": (2, 2048), "norm_bb": (2, 6), "conf": (2,), "soft_labels": (2, 1601), "attr_prob": (2, 401),
    }  # fmt: skip
    assert all(v.dtype == np.float16 for v in record.values())
    assert record["conf"].tolist() == [np.float16(0.7), np.float16(0.1)]  # fewer than 100: by confidence
    assert np.array_equal(record["features"], det.features[[1, 0]].numpy().astype(np.float16))


def test_agreement_figures() -> None:
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(30, 2, generator=gen) * 300
    boxes = torch.cat([boxes, boxes + 20 + torch.rand(30, 2, generator=gen) * 100], 1)
    probs = torch.softmax(torch.randn(30, 1601, generator=gen) * 3, 1)
    det = Detections(boxes, torch.rand(30, 2048, generator=gen), probs, probs[:, 1:].amax(1), None, (400, 400))
    same = agreement([det], [det], DetectorConfig())
    assert same["roi_match"] == 1.0 and same["selected_overlap"] == 1.0
    assert same["feature_cosine_min"] == pytest.approx(1.0) and same["cls_prob_max_abs"] == 0.0
    perm = torch.randperm(30, generator=gen)
    noisy = Detections(boxes[perm][:20], det.features[perm][:20] + 0.1 * torch.randn(20, 2048, generator=gen),
                       probs[perm][:20], det.conf[perm][:20], None, (400, 400))  # fmt: skip
    out = agreement([det], [noisy], DetectorConfig())
    assert out["roi_match"] == pytest.approx(20 / 30) and 0.9 < out["feature_cosine_min"] < 1.0
    with pytest.raises(ValueError, match="same images"):
        agreement([det], [], DetectorConfig())
