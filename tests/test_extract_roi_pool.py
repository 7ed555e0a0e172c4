"""RoI pooling with Caffe's integer semantics: the vectorised path against the ROIPoolingLayer loop, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import extract_reference as ref
from uniter_fast.extract.roi_pool import roi_pool, roi_pool_torch, torchvision_ops_available, window_maxima


def fresh_map(rng: np.random.Generator, channels: int, height: int, width: int) -> np.ndarray:
    return rng.normal(0, 1, (channels, height, width)).astype(np.float32)


def random_rois(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    """Boxes in image pixels (16 x the map), fractional, some tiny, some covering everything, within the image."""
    x = np.sort(rng.uniform(0, width * 16 - 1, (n, 2)), axis=1)
    y = np.sort(rng.uniform(0, height * 16 - 1, (n, 2)), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).astype(np.float32)
    boxes[0] = [0, 0, width * 16 - 1, height * 16 - 1]
    boxes[1] = [5.0, 5.0, 6.0, 6.0]
    return boxes


@pytest.mark.parametrize("shape,size", [((7, 9, 13), 14), ((5, 23, 17), 14), ((3, 6, 40), 7)])
def test_vectorised_equals_caffe_loop(shape: tuple, size: int) -> None:
    rng = np.random.default_rng(sum(shape))
    fmap = fresh_map(rng, *shape)
    boxes = random_rois(rng, 25, shape[1], shape[2])
    got = roi_pool_torch(torch.from_numpy(fmap), torch.from_numpy(boxes), size, 1 / 16)
    np.testing.assert_array_equal(got.numpy(), ref.roi_pool(fmap, boxes, size, 1 / 16))


@pytest.mark.parametrize("shape,windows", [((4, 9, 13), (3, 5)), ((2, 1, 7), (1, 4)), ((3, 6, 2), (6, 2))])
def test_window_maxima_equal_max_pool(shape: tuple, windows: tuple) -> None:
    """maps[kh - 1, kw - 1] = stride-1 max pooling with a kh x kw window, channels last, wherever the window fits."""
    fmap = torch.from_numpy(fresh_map(np.random.default_rng(len(shape) + sum(windows)), *shape))
    maps = window_maxima(fmap, *windows)
    for kh in range(1, windows[0] + 1):
        for kw in range(1, windows[1] + 1):
            pooled = torch.nn.functional.max_pool2d(fmap[None], (kh, kw), stride=1)[0].permute(1, 2, 0)
            assert torch.equal(maps[kh - 1, kw - 1, : shape[1] - kh + 1, : shape[2] - kw + 1], pooled), (kh, kw)


def test_half_pixel_corners_round_away_from_zero() -> None:
    # x1 * 1/16 = 2.5 rounds to 3 (C round), not 2 (torch.round): the pooled window starts one column later
    fmap = torch.arange(1 * 4 * 8, dtype=torch.float32).view(1, 4, 8)
    boxes = torch.tensor([[40.0, 0.0, 40.0, 0.0]])  # 40 / 16 = 2.5 -> column 3, a 1 x 1 RoI
    out = roi_pool_torch(fmap, boxes, 2, 1 / 16)
    assert out[0, 0].tolist() == [[3.0, 3.0], [3.0, 3.0]]
    np.testing.assert_array_equal(out.numpy(), ref.roi_pool(fmap.numpy(), boxes.numpy(), 2, 1 / 16))


def test_bins_outside_the_map_are_zero() -> None:
    fmap = -torch.ones(2, 3, 3)  # negative everywhere: an empty bin's 0 differs from any max
    boxes = torch.tensor([[16.0, 16.0, 200.0, 200.0]])  # runs past the 3 x 3 map: the last bins are empty
    out = roi_pool_torch(fmap, boxes, 14, 1 / 16)
    expected = ref.roi_pool(fmap.numpy(), boxes.numpy(), 14, 1 / 16)
    np.testing.assert_array_equal(out.numpy(), expected)
    assert (out == 0).any() and (out == -1).any()


def test_no_rois_and_dtypes() -> None:
    fmap = torch.randn(4, 5, 6)
    assert roi_pool_torch(fmap, torch.zeros(0, 4), 14, 1 / 16).shape == (0, 4, 14, 14)
    boxes = torch.tensor([[3.0, 7.0, 60.0, 70.0]])
    half = roi_pool_torch(fmap.bfloat16(), boxes, 14, 1 / 16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, roi_pool_torch(fmap.bfloat16().float(), boxes, 14, 1 / 16).bfloat16())


@pytest.mark.skipif(not torchvision_ops_available(), reason="torchvision.ops does not load beside this torch")
def test_torchvision_roi_pool_is_the_same_op() -> None:
    rng = np.random.default_rng(5)
    fmap = torch.from_numpy(fresh_map(rng, 8, 19, 31))
    boxes = torch.from_numpy(random_rois(rng, 40, 19, 31))
    assert torch.equal(roi_pool(fmap, boxes, 14, 1 / 16, "torchvision"), roi_pool(fmap, boxes, 14, 1 / 16, "torch"))
