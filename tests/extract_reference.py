"""Small hand-written references of the Caffe BUTD pipeline, written from the originals' definitions (loops and
numpy, float32 where the originals are float32), to hold the vectorised extractor to.

Sources: py-faster-rcnn ``lib/rpn/generate_anchors.py``, ``lib/fast_rcnn/bbox_transform.py``,
``lib/rpn/proposal_layer.py``, ``lib/nms/cpu_nms.pyx``, Caffe ``roi_pooling_layer.cpp``, OpenCV ``resize``
(INTER_LINEAR, float), BUTD-UNITER-NLVR2 ``tools/generate_npz.py``.
"""

from __future__ import annotations

import math

import numpy as np


def generate_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(4, 8, 16, 32)) -> np.ndarray:
    """``generate_anchors.py`` as written (whctrs / mkanchors / ratio_enum / scale_enum)."""

    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mkanchors(ws, hs, x, y):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)))

    base = np.array([1, 1, base_size, base_size]) - 1
    w, h, x, y = whctrs(base)
    size_ratios = w * h / np.array(ratios, dtype=float)
    ws = np.round(np.sqrt(size_ratios))
    hs = np.round(ws * np.array(ratios))
    ratio_anchors = mkanchors(ws, hs, x, y)
    out = []
    for a in ratio_anchors:
        w, h, x, y = whctrs(a)
        out.append(mkanchors(w * np.array(scales), h * np.array(scales), x, y))
    return np.vstack(out)


def bbox_transform_inv(boxes: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """``bbox_transform_inv`` for [N, 4] boxes and [N, 4] deltas, float32 like the original (deltas' dtype)."""
    boxes = boxes.astype(deltas.dtype, copy=False)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx, dy, dw, dh = deltas[:, 0], deltas[:, 1], deltas[:, 2], deltas[:, 3]
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = np.exp(dw) * widths
    pred_h = np.exp(dh) * heights
    out = np.zeros(deltas.shape, dtype=deltas.dtype)
    out[:, 0] = pred_ctr_x - 0.5 * pred_w
    out[:, 1] = pred_ctr_y - 0.5 * pred_h
    out[:, 2] = pred_ctr_x + 0.5 * pred_w
    out[:, 3] = pred_ctr_y + 0.5 * pred_h
    return out


def clip_boxes(boxes: np.ndarray, shape) -> np.ndarray:
    """``clip_boxes``: x to [0, W - 1], y to [0, H - 1]."""
    out = boxes.copy()
    out[:, 0::4] = np.maximum(np.minimum(boxes[:, 0::4], shape[1] - 1), 0)
    out[:, 1::4] = np.maximum(np.minimum(boxes[:, 1::4], shape[0] - 1), 0)
    out[:, 2::4] = np.maximum(np.minimum(boxes[:, 2::4], shape[1] - 1), 0)
    out[:, 3::4] = np.maximum(np.minimum(boxes[:, 3::4], shape[0] - 1), 0)
    return out


def cpu_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """``cpu_nms.pyx``: float32 arithmetic, suppress when ``ovr >= thresh`` (the threshold a double). Ties visited
    lowest index first (a stable descending order; numpy's quicksort leaves them unspecified)."""
    dets = dets.astype(np.float32)
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1 + np.float32(1)) * (y2 - y1 + np.float32(1))
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    suppressed = np.zeros(len(scores), dtype=bool)
    keep = []
    one, zero = np.float32(1), np.float32(0)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        for j in order[pos + 1 :]:
            if suppressed[j]:
                continue
            w = max(zero, min(x2[i], x2[j]) - max(x1[i], x1[j]) + one)
            h = max(zero, min(y2[i], y2[j]) - max(y1[i], y1[j]) + one)
            inter = np.float32(w * h)
            ovr = np.float32(inter / np.float32(np.float32(areas[i] + areas[j]) - inter))
            if float(ovr) >= thresh:
                suppressed[j] = True
    return keep


def proposal_layer(scores_fg, deltas, im_info, pre_n=6000, post_n=300, nms_thresh=0.7, min_size=16):
    """``proposal_layer.py`` forward for one image: scores_fg [A, H, W], deltas [4A, H, W] float32 numpy,
    im_info (H', W', scale). Returns proposals [n, 4] float32 in score order."""
    a, height, width = scores_fg.shape
    anchors = generate_anchors().astype(np.float32)
    shift_x, shift_y = np.meshgrid(np.arange(width) * 16, np.arange(height) * 16)
    shifts = np.vstack((shift_x.ravel(), shift_y.ravel(), shift_x.ravel(), shift_y.ravel())).transpose()
    all_anchors = (anchors.reshape((1, a, 4)) + shifts.reshape((1, -1, 4)).transpose((1, 0, 2))).reshape(-1, 4)
    bbox_deltas = deltas.transpose((1, 2, 0)).reshape((-1, 4))
    scores = scores_fg.transpose((1, 2, 0)).reshape((-1, 1))
    proposals = clip_boxes(bbox_transform_inv(all_anchors.astype(np.float32), bbox_deltas), im_info[:2])
    min_size_scaled = np.float32(min_size) * np.float32(im_info[2])
    ws = proposals[:, 2] - proposals[:, 0] + 1
    hs = proposals[:, 3] - proposals[:, 1] + 1
    keep = np.where((ws >= min_size_scaled) & (hs >= min_size_scaled))[0]
    proposals, scores = proposals[keep], scores[keep]
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i, 0]), i))[:pre_n]
    proposals, scores = proposals[order], scores[order]
    keep = cpu_nms(np.hstack((proposals, scores)), nms_thresh)[:post_n]
    return proposals[keep]


def roi_pool(fmap: np.ndarray, boxes: np.ndarray, size: int, spatial_scale: float) -> np.ndarray:
    """Caffe ``ROIPoolingLayer::Forward_cpu`` for one image: fmap [C, H, W], boxes [R, 4] -> [R, C, size, size]."""
    channels, height, width = fmap.shape
    out = np.zeros((len(boxes), channels, size, size), dtype=fmap.dtype)

    def c_round(v):
        return int(math.floor(v + 0.5)) if v >= 0 else -int(math.floor(-v + 0.5))

    for r, box in enumerate(boxes.astype(np.float32)):
        sw, sh, ew, eh = (c_round(float(np.float32(c * np.float32(spatial_scale)))) for c in box)
        roi_h, roi_w = max(eh - sh + 1, 1), max(ew - sw + 1, 1)
        bin_h, bin_w = np.float32(roi_h) / np.float32(size), np.float32(roi_w) / np.float32(size)
        for ph in range(size):
            for pw in range(size):
                hstart = min(max(int(math.floor(np.float32(ph) * bin_h)) + sh, 0), height)
                hend = min(max(int(math.ceil(np.float32(ph + 1) * bin_h)) + sh, 0), height)
                wstart = min(max(int(math.floor(np.float32(pw) * bin_w)) + sw, 0), width)
                wend = min(max(int(math.ceil(np.float32(pw + 1) * bin_w)) + sw, 0), width)
                if hend <= hstart or wend <= wstart:
                    continue
                out[r, :, ph, pw] = fmap[:, hstart:hend, wstart:wend].max(axis=(1, 2))
    return out


def max_conf_loop(boxes: np.ndarray, scores: np.ndarray, thresh: float = 0.3) -> np.ndarray:
    """``generate_npz.py``'s loop: one cpu_nms per class 1..K-1; boxes [R, 4], scores (cls_prob) [R, K]."""
    max_conf = np.zeros(boxes.shape[0])
    for cls_ind in range(1, scores.shape[1]):
        cls_scores = scores[:, cls_ind]
        dets = np.hstack((boxes, cls_scores[:, np.newaxis])).astype(np.float32)
        keep = np.array(cpu_nms(dets, thresh), dtype=np.int64)
        max_conf[keep] = np.where(cls_scores[keep] > max_conf[keep], cls_scores[keep], max_conf[keep])
    return max_conf


def select_boxes(max_conf: np.ndarray, conf_thresh=0.2, min_boxes=100, max_boxes=100) -> np.ndarray:
    """``generate_npz.py``'s selection (ties in the descending sort: lowest index first)."""
    keep = np.where(max_conf >= conf_thresh)[0]
    descending = np.array(sorted(range(len(max_conf)), key=lambda i: (-max_conf[i], i)), dtype=np.int64)
    if len(keep) < min_boxes:
        keep = descending[:min_boxes]
    elif len(keep) > max_boxes:
        keep = descending[:max_boxes]
    return keep


def cv2_resize_linear(image: np.ndarray, scale: float) -> np.ndarray:
    """``cv2.resize(image, None, fx=scale, fy=scale, interpolation=INTER_LINEAR)`` for a float [H, W, C] image:
    size ``round(w * scale)``, source ``(d + 0.5) / scale - 0.5`` clamped at the borders, float64 here."""
    height, width = image.shape[:2]
    out_h, out_w = round(height * scale), round(width * scale)

    def taps(n_out, n_in):
        src = (np.arange(n_out) + 0.5) / scale - 0.5
        lo = np.floor(src).astype(int)
        frac = src - lo
        frac[lo < 0], lo[lo < 0] = 0.0, 0
        hi = np.minimum(lo + 1, n_in - 1)
        frac[lo >= n_in - 1], lo[lo >= n_in - 1] = 0.0, n_in - 1
        return lo, hi, frac

    ylo, yhi, fy = taps(out_h, height)
    xlo, xhi, fx = taps(out_w, width)
    img = image.astype(np.float64)
    rows = img[ylo] * (1 - fy)[:, None, None] + img[yhi] * fy[:, None, None]
    return rows[:, xlo] * (1 - fx)[None, :, None] + rows[:, xhi] * fx[None, :, None]
