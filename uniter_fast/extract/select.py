"""From raw detections to UNITER's npz record (``tools/generate_npz.py``): max-confidence, box selection, fields.

- boxes: the RPN RoIs divided by the resize scale (float32), **not** the regressed boxes;
- conf: per RoI, the best class probability among the classes whose NMS (0.3, legacy IoU) keeps it;
- keep: ``conf >= 0.2`` in RoI order, unless fewer than MIN_BOXES or more than MAX_BOXES pass; then the top
  MIN_BOXES / MAX_BOXES by conf (descending; ties lowest RoI first, numpy's argsort leaves them unspecified).
  UNITER uses MIN = MAX = 100, so its files hold the top 100 by conf, except that exactly 100 passing boxes stay in
  RoI order;
- fields, all float16: features [n, 2048], norm_bb [n, 6] = (x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H),
  conf [n], soft_labels [n, 1601] (background in column 0).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
import torch

from uniter_fast.config import GIVEN_BOXES_FIELD
from uniter_fast.extract.config import DetectorConfig
from uniter_fast.extract.detector import RawDetections
from uniter_fast.extract.nms import max_confidence


def batch_max_confidence(boxes: Sequence[torch.Tensor], cls_probs: Sequence[torch.Tensor], thresh: float) -> list:
    """Per image conf [R_i] fp32 for original-image boxes [R_i, 4] and cls_prob [R_i, 1601], padded into one batch."""
    longest = max((b.shape[0] for b in boxes), default=0)
    n, device = len(boxes), boxes[0].device if boxes else torch.device("cpu")
    padded_boxes = torch.zeros(n, longest, 4, device=device)
    padded_scores = torch.zeros(n, longest, cls_probs[0].shape[1] - 1 if cls_probs else 0, device=device)
    valid = torch.zeros(n, longest, dtype=torch.bool, device=device)
    for i, (b, p) in enumerate(zip(boxes, cls_probs)):
        padded_boxes[i, : b.shape[0]] = b
        padded_scores[i, : b.shape[0]] = p[:, 1:]
        valid[i, : b.shape[0]] = True
    conf = max_confidence(padded_boxes, padded_scores, valid, thresh)
    return [conf[i, : b.shape[0]] for i, b in enumerate(boxes)]


def select_boxes(conf: torch.Tensor, conf_thresh: float, min_boxes: int, max_boxes: int) -> torch.Tensor:
    """Indices of the kept RoIs (``generate_npz.py``), int64 [n] on conf's device; compared in float64 as numpy."""
    passing = (conf.double() >= conf_thresh).nonzero().squeeze(1)
    if min_boxes <= passing.numel() <= max_boxes:
        return passing
    count = min_boxes if passing.numel() < min_boxes else max_boxes
    return torch.sort(conf, descending=True, stable=True).indices[:count]


def divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / float32(divisor) as a true division on every device (CUDA turns division by a Python scalar into a
    multiplication by its reciprocal, which rounds differently from numpy)."""
    return x / torch.full((1,), divisor, dtype=torch.float32, device=x.device)


def normalized_boxes(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """boxes [n, 4] in original pixels -> norm_bb [n, 6] float32 (no +1, no clipping)."""
    x1, y1, x2, y2 = boxes.float().unbind(1)
    parts = [divide(x1, width), divide(y1, height), divide(x2, width), divide(y2, height)]
    return torch.stack(parts + [divide(x2 - x1, width), divide(y2 - y1, height)], 1)


@dataclasses.dataclass
class Detections:
    """Detections of one image in original-image pixels (``generate_npz.py``'s arrays before selection).

    boxes [R, 4] float32 (RPN RoIs / scale), features [R, 2048], cls_prob [R, 1601], conf [R] (max-confidence),
    attr_prob [R, 401] or None; fp32 on the detector's device; ``size`` = (H, W) of the original image.
    """

    boxes: torch.Tensor
    features: torch.Tensor
    cls_prob: torch.Tensor
    conf: torch.Tensor
    attr_prob: Optional[torch.Tensor]
    size: tuple[int, int]


def finalize(
    raw: Sequence[RawDetections], scales: Sequence[float], sizes: Sequence[tuple[int, int]], nms_thresh: float
) -> list[Detections]:
    """Boxes back to original pixels and the max-confidence loop, for a batch of images."""
    boxes = [divide(r.rois, s) for r, s in zip(raw, scales)]
    confs = batch_max_confidence(boxes, [r.cls_prob for r in raw], nms_thresh)
    return [
        Detections(b, r.features, r.cls_prob, c, r.attr_prob, tuple(s)) for b, r, c, s in zip(boxes, raw, confs, sizes)
    ]


def npz_record(det: Detections, config: DetectorConfig, attributes: bool = False) -> dict[str, np.ndarray]:
    """UNITER's npz fields of one image after box selection, float16 numpy arrays."""
    min_boxes, max_boxes = config.box_range
    return record_of(det, select_boxes(det.conf, config.conf_thresh, min_boxes, max_boxes), attributes)


def given_box_record(det: Detections, attributes: bool = False) -> dict[str, np.ndarray]:
    """The npz fields of every box of ``det`` in order (given-box mode), plus ``given_boxes`` = True (0-d bool)."""
    keep = torch.arange(det.boxes.shape[0], device=det.boxes.device)
    return {**record_of(det, keep, attributes), GIVEN_BOXES_FIELD: np.array(True)}


def record_of(det: Detections, keep: torch.Tensor, attributes: bool) -> dict[str, np.ndarray]:
    """The rows ``keep`` [n] int64 of ``det`` as UNITER's npz fields, float16 numpy arrays."""
    record = {
        "features": det.features[keep],
        "norm_bb": normalized_boxes(det.boxes[keep], *det.size),
        "conf": det.conf[keep],
        "soft_labels": det.cls_prob[keep],
    }
    if attributes and det.attr_prob is not None:
        record["attr_prob"] = det.attr_prob[keep]
    return {k: v.cpu().numpy().astype(np.float16) for k, v in record.items()}
