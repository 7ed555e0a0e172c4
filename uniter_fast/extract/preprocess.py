"""Caffe's test-time image blob (``lib/fast_rcnn/test.py`` ``_get_image_blob``), on any device.

float32 BGR minus ``PIXEL_MEANS``, then ``cv2.resize(fx=fy=scale, INTER_LINEAR)``: output size ``round(w * scale)``
(half to even, like OpenCV's cvRound), bilinear with half-pixel centres, no antialiasing, and the source coordinate
computed from ``scale`` itself (not from the rounded size ratio). ``aten::upsample_bilinear2d`` takes both the size
and the scale, which is exactly that mapping.
"""

from __future__ import annotations

import torch

from uniter_fast.extract.config import PIXEL_MEANS_BGR


def resize_scale(height: int, width: int, test_scale: int = 600, max_size: int = 1000) -> float:
    """``im_scale``: shorter side to ``test_scale`` unless the longer side would pass ``max_size`` (Python float)."""
    scale = float(test_scale) / float(min(height, width))
    if round(scale * max(height, width)) > max_size:
        scale = float(max_size) / float(max(height, width))
    return scale


def resized_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """(H', W') = (round(height * scale), round(width * scale)), as cv2.resize computes its output size."""
    return round(height * scale), round(width * scale)


def image_blob(image: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """image [H, W, 3] uint8 BGR (any device) -> [3, H', W'] mean-subtracted, resized, in ``dtype``.

    The mean is subtracted in float64 and rounded once to float32, as numpy's in-place ``im -= PIXEL_MEANS`` does.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape [H, W, 3] (BGR), got {tuple(image.shape)}")
    height, width = image.shape[:2]
    means = torch.tensor(PIXEL_MEANS_BGR, dtype=torch.float64, device=image.device)
    x = (image.double() - means).float().permute(2, 0, 1)[None]
    size = resized_size(height, width, scale)
    if min(size) < 1:
        raise ValueError(f"image of {height} x {width} pixels resizes to {size[0]} x {size[1]} (scale {scale:.4g})")
    if size != (height, width):
        x = torch.ops.aten.upsample_bilinear2d(x, list(size), False, scale, scale)
    return x[0].to(dtype)
