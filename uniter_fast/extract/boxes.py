"""Box arithmetic with the py-faster-rcnn conventions: inclusive pixel boxes (width = x2 - x1 + 1), Caffe anchors.

Everything is float32, in the order of operations of the numpy/Cython originals (``generate_anchors.py``,
``bbox_transform.py``, ``proposal_layer.py``, ``cpu_nms.pyx``), so that results match them to the last bit where the
arithmetic is the same.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from uniter_fast.extract.config import ANCHOR_RATIOS, ANCHOR_SCALES


def caffe_anchors(
    base_size: int = 16, ratios: Sequence[float] = ANCHOR_RATIOS, scales: Sequence[int] = ANCHOR_SCALES
) -> torch.Tensor:
    """The cell anchors of ``generate_anchors.py``: [len(ratios) * len(scales), 4] float32, ratio-major.

    Widths are ``round(sqrt(size / ratio))`` with Python's (banker's) rounding, like ``np.round``; centres sit at
    7.5 (the box [0, 0, 15, 15]), so the anchors are "shifted" by half a pixel from detectron2's (kept for parity).
    """
    x_ctr = y_ctr = 0.5 * (base_size - 1)
    rows = []
    for ratio in ratios:
        ws = round(math.sqrt(base_size * base_size / ratio))
        hs = round(ws * ratio)
        for scale in scales:
            w, h = ws * scale, hs * scale
            rows.append([x_ctr - 0.5 * (w - 1), y_ctr - 0.5 * (h - 1), x_ctr + 0.5 * (w - 1), y_ctr + 0.5 * (h - 1)])
    return torch.tensor(rows, dtype=torch.float32)


def shifted_anchors(cell: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """All anchors of a [height, width] feature map, [height * width * A, 4], in (h, w, a) order; shifts 0, 16, ..."""
    ys = torch.arange(height, device=cell.device, dtype=torch.float32) * stride
    xs = torch.arange(width, device=cell.device, dtype=torch.float32) * stride
    sy, sx = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
    """``bbox_transform_inv``: anchors [..., 4] + deltas (dx, dy, dw, dh) [..., 4] -> boxes [..., 4] float32.

    w = x2 - x1 + 1, ctr = x1 + 0.5 w, x1' = ctr' - 0.5 w', x2' = ctr' + 0.5 w' (no -1 and no clamp on dw).
    """
    widths = anchors[..., 2] - anchors[..., 0] + 1.0
    heights = anchors[..., 3] - anchors[..., 1] + 1.0
    ctr_x = anchors[..., 0] + 0.5 * widths
    ctr_y = anchors[..., 1] + 0.5 * heights
    pred_ctr_x = deltas[..., 0] * widths + ctr_x
    pred_ctr_y = deltas[..., 1] * heights + ctr_y
    pred_w = torch.exp(deltas[..., 2]) * widths
    pred_h = torch.exp(deltas[..., 3]) * heights
    return torch.stack(
        [pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h, pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h],
        dim=-1,
    )


def clip_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Clip [..., 4] boxes to [0, width - 1] x [0, height - 1] (``clip_boxes``)."""
    x = boxes[..., 0::2].clamp(max=width - 1).clamp(min=0)
    y = boxes[..., 1::2].clamp(max=height - 1).clamp(min=0)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def large_enough(boxes: torch.Tensor, min_size: torch.Tensor) -> torch.Tensor:
    """``_filter_boxes``: bool [...] where x2 - x1 + 1 >= min_size and y2 - y1 + 1 >= min_size.

    min_size: float32, broadcastable to boxes[..., 0] (the proposal layer's ``RPN_MIN_SIZE * im_info[2]``, a float32
    product since ``im_info`` is a float32 blob)."""
    ws = boxes[..., 2] - boxes[..., 0] + 1
    hs = boxes[..., 3] - boxes[..., 1] + 1
    return (ws >= min_size) & (hs >= min_size)


def legacy_areas(boxes: torch.Tensor) -> torch.Tensor:
    """(x2 - x1 + 1) * (y2 - y1 + 1) of [..., 4] boxes."""
    return (boxes[..., 2] - boxes[..., 0] + 1) * (boxes[..., 3] - boxes[..., 1] + 1)


def legacy_iou(a: torch.Tensor, b: torch.Tensor, areas_a: torch.Tensor, areas_b: torch.Tensor) -> torch.Tensor:
    """``cpu_nms``'s overlap of broadcastable boxes a [..., 4] and b [..., 4]: inter / (area_a + area_b - inter).

    inter = max(0, min(x2) - max(x1) + 1) * max(0, min(y2) - max(y1) + 1), all in float32 like the Cython code.
    """
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0]) + 1).clamp(min=0.0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1]) + 1).clamp(min=0.0)
    inter = w * h
    return inter / (areas_a + areas_b - inter)


def float32_at_least(threshold: float) -> float:
    """The smallest float32 t with t >= ``threshold``, so that ``x >= t`` on float32 x equals the original's
    ``double(x) >= threshold`` (a plain float32 cast of 0.7 rounds *down* and would suppress one more value)."""
    t = np.float32(threshold)
    if float(t) < threshold:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """C's ``round()``: halves go away from zero (``torch.round`` rounds halves to even). Exact for every float:
    ``x - trunc(x)`` is representable, unlike ``floor(x + 0.5)`` which rounds 0.49999997 up."""
    whole = torch.trunc(x)
    return torch.where((x - whole).abs() >= 0.5, whole + torch.sign(x), whole)
