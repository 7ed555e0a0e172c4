"""How closely two runs of the extractor agree (device vs CPU, bf16 vs fp32, fast vs reference path).

Two runs can reorder near-tied RPN scores, so RoIs are matched by box (IoU >= 0.99) before features are compared.
Figures per image, then averaged (``feature_cosine_min`` is the minimum over all matched RoIs):
``roi_match`` (share of the reference RoIs found in the other run), ``feature_cosine_mean/min`` (``pool5_flat``),
``cls_prob_max_abs`` and ``conf_max_abs`` (matched RoIs), ``selected_overlap`` (share of the boxes UNITER's
selection keeps in the reference that the other run's selection also keeps).
"""

from __future__ import annotations

from typing import Sequence

import torch

from uniter_fast.extract.config import DetectorConfig
from uniter_fast.extract.select import Detections, select_boxes

MATCH_IOU = 0.99


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Continuous IoU of boxes a [N, 4] and b [M, 4] -> [N, M] float32."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def _matches(ref: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over ref [N] of boxes with a match, index into other [N]) for IoU >= MATCH_IOU."""
    if ref.shape[0] == 0 or other.shape[0] == 0:
        return torch.zeros(ref.shape[0], dtype=torch.bool), torch.zeros(ref.shape[0], dtype=torch.long)
    best, index = box_iou(ref, other).max(dim=1)
    return best >= MATCH_IOU, index


def agreement(reference: Sequence[Detections], other: Sequence[Detections], config: DetectorConfig) -> dict:
    """Agreement figures of ``other`` with ``reference`` (same images, same order); see the module doc."""
    if len(reference) != len(other):
        raise ValueError(f"need detections of the same images, got {len(reference)} and {len(other)}")
    rows, cosine_min = [], 1.0
    lo, hi = config.box_range
    for ref, oth in zip(reference, other):
        ref, oth = _cpu_float(ref), _cpu_float(oth)
        matched, index = _matches(ref.boxes, oth.boxes)
        cos = torch.nn.functional.cosine_similarity(ref.features[matched], oth.features[index[matched]], dim=1)
        keep_ref = select_boxes(ref.conf, config.conf_thresh, lo, hi)
        keep_oth = select_boxes(oth.conf, config.conf_thresh, lo, hi)
        sel_matched, _ = _matches(ref.boxes[keep_ref], oth.boxes[keep_oth])
        cosine_min = min(cosine_min, float(cos.min())) if cos.numel() else cosine_min
        rows.append(
            {
                "roi_match": float(matched.float().mean()) if matched.numel() else 1.0,
                "feature_cosine_mean": float(cos.mean()) if cos.numel() else float("nan"),
                "cls_prob_max_abs": _max_abs(ref.cls_prob[matched], oth.cls_prob[index[matched]]),
                "conf_max_abs": _max_abs(ref.conf[matched], oth.conf[index[matched]]),
                "selected_overlap": float(sel_matched.float().mean()) if sel_matched.numel() else 1.0,
            }
        )
    out = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]} if rows else {}
    out["feature_cosine_min"] = cosine_min
    return out


def _cpu_float(det: Detections) -> Detections:
    return Detections(
        det.boxes.float().cpu(), det.features.float().cpu(), det.cls_prob.float().cpu(), det.conf.float().cpu(), None,
        det.size,
    )  # fmt: skip


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.numel() else 0.0
