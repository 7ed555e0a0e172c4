"""Caffe's image blob: the resize scale rule, OpenCV's output size rounding, bilinear resize with the scale's own
mapping (not the size ratio), and the float64 mean subtraction."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import extract_reference as ref
from uniter_fast.extract.config import PIXEL_MEANS_BGR
from uniter_fast.extract.preprocess import image_blob, resize_scale, resized_size


def test_resize_scale_both_regimes() -> None:
    assert resize_scale(480, 640) == 600 / 480  # shorter side to 600: 800 <= 1000
    assert resize_scale(300, 1000) == 1000 / 1000  # 600/300 * 1000 = 2000 > 1000: cap the longer side
    assert resize_scale(600, 512) == 600 / 512  # grace_hopper.jpg, portrait
    assert resize_scale(427, 640) == 600 / 427  # rocket.jpg: round(899.3) = 899
    # round(scale * max) is compared, not the product: 600/600 * 1000.4 rounds to 1000, allowed
    assert resize_scale(600, 1000, 600, 1000) == 1.0


def test_output_size_rounds_half_to_even_like_cvround() -> None:
    assert resized_size(5, 7, 0.5) == (2, 4)  # 2.5 -> 2, 3.5 -> 4
    assert resized_size(427, 640, 600 / 427) == (600, 899)


@pytest.mark.parametrize("shape,scale", [((37, 53), 1.37), ((41, 29), 0.61), ((7, 11), 600 / 7), ((64, 48), 0.5)])
def test_blob_equals_opencv_linear_resize(shape: tuple, scale: float) -> None:
    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    expected = ref.cv2_resize_linear(image.astype(np.float64) - np.array(PIXEL_MEANS_BGR), scale)
    got = image_blob(torch.from_numpy(image), scale).permute(1, 2, 0).numpy()
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)


def test_scale_not_size_ratio_sets_the_sampling() -> None:
    # 7 -> round(7 * 0.61) = 4 columns; sampling with 7/4 instead of 1/0.61 would move every tap
    image = np.tile(np.arange(7, dtype=np.uint8)[None, :, None] * 30, (3, 1, 3))
    got = image_blob(torch.from_numpy(image), 0.61)[0, 0].numpy() + PIXEL_MEANS_BGR[0]
    src = (np.arange(4) + 0.5) / 0.61 - 0.5
    np.testing.assert_allclose(got, np.clip(src, 0, 6) * 30, atol=1e-3)


def test_mean_subtracted_in_float64_then_rounded() -> None:
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    blob = image_blob(torch.from_numpy(image), 1.0)
    expected = (200.0 - np.array(PIXEL_MEANS_BGR)).astype(np.float32)
    assert blob[:, 0, 0].numpy().tolist() == expected.tolist()


def test_bad_shape_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        image_blob(torch.zeros(4, 4, dtype=torch.uint8), 1.0)
    with pytest.raises(ValueError, match="1 x 500 pixels resizes to 0 x 214"):
        image_blob(torch.zeros(1, 500, 3, dtype=torch.uint8), resize_scale(1, 500, 128, 214))
