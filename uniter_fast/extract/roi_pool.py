"""RoI max pooling with Caffe's integer semantics (``ROIPoolingLayer``; also torchvision's ``roi_pool``).

Per RoI: corners ``round(x * spatial_scale)`` (halves away from zero), size ``max(end - start + 1, 1)``, bin size
``float32(size) / P``; bin ph covers rows ``[floor(ph * bin), ceil((ph + 1) * bin))`` shifted by the start and
clipped to the map; an empty bin gives 0. (RoIAlign would be wrong here.)

The plain-PyTorch path is vectorised: a bin of ``kh x kw`` cells starting at (h, w) is one element of the
stride-1 window maximum of that size, so each image's maps for every bin shape in use are built once (running
elementwise maxima, channels last) and all bins of all its RoIs are one gather. Max is exact, so the result
equals the loop definition bit for bit.
"""

from __future__ import annotations

import torch

from uniter_fast.extract.boxes import round_half_away


def bin_bounds(
    boxes: torch.Tensor, size: int, spatial_scale: float, height: int, width: int
) -> tuple[torch.Tensor, ...]:
    """Per RoI and bin: (hstart [R, P], hend [R, P], wstart [R, P], wend [R, P]) int64, clipped to the map."""
    corners = round_half_away(boxes.float() * spatial_scale).long()
    x1, y1, x2, y2 = corners.unbind(1)
    roi_w = (x2 - x1 + 1).clamp(min=1).float()
    roi_h = (y2 - y1 + 1).clamp(min=1).float()
    steps = torch.arange(size, device=boxes.device, dtype=torch.float32)
    bin_h, bin_w = (roi_h / size)[:, None], (roi_w / size)[:, None]
    hstart = (torch.floor(steps * bin_h).long() + y1[:, None]).clamp(0, height)
    hend = (torch.ceil((steps + 1) * bin_h).long() + y1[:, None]).clamp(0, height)
    wstart = (torch.floor(steps * bin_w).long() + x1[:, None]).clamp(0, width)
    wend = (torch.ceil((steps + 1) * bin_w).long() + x1[:, None]).clamp(0, width)
    return hstart, hend, wstart, wend


def roi_pool_torch(fmap: torch.Tensor, boxes: torch.Tensor, size: int, spatial_scale: float) -> torch.Tensor:
    """One image: fmap [C, H, W], boxes [R, 4] (x1, y1, x2, y2 in image pixels) -> [R, C, size, size], fmap's dtype."""
    channels, height, width = fmap.shape
    num = boxes.shape[0]
    if num == 0:
        return fmap.new_zeros(0, channels, size, size)
    hstart, hend, wstart, wend = bin_bounds(boxes, size, spatial_scale, height, width)
    len_h = (hend - hstart).clamp(min=0)[:, :, None].expand(num, size, size)
    len_w = (wend - wstart).clamp(min=0)[:, None, :].expand(num, size, size)
    empty = (len_h == 0) | (len_w == 0)
    max_h, max_w = max(int(len_h.max()), 1), max(int(len_w.max()), 1)
    maps = window_maxima(fmap, max_h, max_w)
    lh, lw = len_h.clamp(min=1) - 1, len_w.clamp(min=1) - 1
    hs = hstart[:, :, None].clamp(max=height - 1)
    ws = wstart[:, None, :].clamp(max=width - 1)
    flat = ((lh * max_w + lw) * height + hs) * width + ws
    out = maps.view(-1, channels).index_select(0, flat.reshape(-1)).view(num, size, size, channels)
    return out.masked_fill_(empty[..., None], 0).permute(0, 3, 1, 2)


def window_maxima(fmap: torch.Tensor, max_h: int, max_w: int) -> torch.Tensor:
    """maps [max_h, max_w, H, W, C] in fmap's dtype: ``maps[kh - 1, kw - 1, h, w]`` = max of ``fmap[:, h : h + kh,
    w : w + kw]`` for fmap [C, H, W], defined where the window fits (h <= H - kh, w <= W - kw; elsewhere unset and
    never read by :func:`roi_pool_torch`). Running maxima, one elementwise ``maximum`` per window size (exact)."""
    channels, height, width = fmap.shape
    maps = fmap.new_empty(max_h, max_w, height, width, channels)
    hwc = fmap.permute(1, 2, 0)
    maps[0, 0] = hwc
    for kh in range(1, max_h + 1):
        rows = maps[kh - 1, 0, : height - kh + 1]  # the max over kh rows from each h: [H - kh + 1, W, C]
        if kh > 1:
            torch.maximum(maps[kh - 2, 0, : height - kh + 1], hwc[kh - 1 :], out=rows)
        for kw in range(2, max_w + 1):
            window = maps[kh - 1, kw - 1, : height - kh + 1, : width - kw + 1]
            torch.maximum(maps[kh - 1, kw - 2, : height - kh + 1, : width - kw + 1], rows[:, kw - 1 :], out=window)
    return maps


def torchvision_ops_available() -> bool:
    """True when ``torchvision.ops`` imports and its compiled ops load (PyPI's wheel fails beside some torch builds)."""
    try:
        import torchvision.ops  # noqa: F401

        torch.ops.torchvision.roi_pool  # noqa: B018 - raises when the compiled op is missing
    except (ImportError, RuntimeError, AttributeError):
        return False
    return True


def roi_pool(
    fmap: torch.Tensor, boxes: torch.Tensor, size: int, spatial_scale: float, ops: str = "torch"
) -> torch.Tensor:
    """Caffe RoI pooling of one image, fmap [C, H, W], boxes [R, 4] -> [R, C, size, size]: ``ops="torch"`` (this
    module's vectorised path) or ``"torchvision"`` (``torchvision.ops.roi_pool``, the same semantics; it wants the
    boxes in the map's dtype, so a half-precision map is pooled in fp32 to keep the boxes exact, max being exact)."""
    if ops == "torchvision":
        from torchvision.ops import roi_pool as tv_roi_pool

        pooled = tv_roi_pool(fmap[None].float(), [boxes.float()], (size, size), spatial_scale)
        return pooled.to(fmap.dtype)
    return roi_pool_torch(fmap, boxes, size, spatial_scale)
