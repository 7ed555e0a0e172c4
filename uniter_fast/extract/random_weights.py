"""Random BUTD weights in each public checkpoint's exact key layout, for tests, benchmarks and demos.

No real weights can be downloaded here, so tests write these files and load them through the real loading code.
The weights are not noise that saturates: convolutions are He-initialised and every frozen BatchNorm gets the
running statistics of its own input on a synthetic image (data-dependent init), so activations stay near unit
scale through all 33 blocks; the class logits are scaled to a spread at which some RoIs pass the 0.2 confidence
threshold, as with the real model. Deterministic for a given seed.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import nn

from uniter_fast.config import PathLike
from uniter_fast.extract.boxes import caffe_anchors
from uniter_fast.extract.config import IMG_FEAT_DIM, NUM_CLASSES, DetectorConfig
from uniter_fast.extract.detector import Detector
from uniter_fast.extract.layers import Conv2dNorm, FrozenBatchNorm2d
from uniter_fast.extract.layouts import LAYOUTS, from_canonical
from uniter_fast.extract.weights import ANCHORS_KEY
from uniter_fast.files import atomic_write

CLS_LOGIT_STD = 4.0  # spread of the random class logits: the top class often passes conf 0.2
CALIBRATION_SIZE = (96, 128)  # H, W of the synthetic calibration image (resized-image pixels)
CALIBRATION_ROIS = 4  # RoIs through res5 for its statistics (x 196 positions each)


def _init_weights(detector: Detector, gen: torch.Generator) -> None:
    """He-normal convs, BN affine near identity (the last norm of each residual branch at 0.2), small heads."""
    for name, module in detector.named_modules():
        if isinstance(module, nn.Conv2d):
            fan_in = module.weight[0].numel()
            std = math.sqrt(2.0 / fan_in) if isinstance(module, Conv2dNorm) else 0.01
            module.weight.data = torch.randn(module.weight.shape, generator=gen) * std
            if module.bias is not None:
                module.bias.data = torch.randn(module.bias.shape, generator=gen) * 0.1
        elif isinstance(module, FrozenBatchNorm2d):
            gain = 0.2 if name.endswith("conv3.norm") else 1.0
            module.weight.copy_(gain * (1.0 + 0.1 * torch.randn(module.weight.shape, generator=gen)))
            module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data = torch.randn(module.weight.shape, generator=gen) * 0.01
            if getattr(module, "bias", None) is not None:
                module.bias.data = torch.randn(module.bias.shape, generator=gen) * 0.01


def _calibrate(detector: Detector, gen: torch.Generator) -> None:
    """Set each BN's running mean/var to its input's statistics on a smooth random image and random RoIs, and the
    class-logit scale to ``CLS_LOGIT_STD``."""

    def set_stats(module: FrozenBatchNorm2d, args: tuple) -> None:
        x = args[0].double()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3)) + 1e-3)

    hooks = [m.register_forward_pre_hook(set_stats) for m in detector.modules() if isinstance(m, FrozenBatchNorm2d)]
    try:
        height, width = CALIBRATION_SIZE
        coarse = torch.randn(1, 3, height // 16, width // 16, generator=gen) * 60.0
        image = nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        with torch.no_grad():
            fmap = detector.backbone(image)[0]
            corners = torch.rand(CALIBRATION_ROIS, 2, 2, generator=gen) * torch.tensor([width - 1.0, height - 1.0])
            boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
            pooled = detector.roi_heads.pool([fmap], [boxes])
            feat = detector.roi_heads.res5(pooled).mean(dim=(2, 3))
            cls = detector.roi_heads.box_predictor.cls_score
            logits = cls(feat)
            cls.weight.mul_(CLS_LOGIT_STD / logits.std().clamp(min=1e-6))
            cls.bias.zero_()
    finally:
        for hook in hooks:
            hook.remove()


def random_canonical_state_dict(config: Optional[DetectorConfig] = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in our (MILVLG) names, including the unused ``bbox_pred`` [6404, 2048]."""
    gen = torch.Generator().manual_seed(seed)
    detector = Detector(config or DetectorConfig())
    _init_weights(detector, gen)
    _calibrate(detector, gen)
    sd = {k: v.clone() for k, v in detector.state_dict().items()}
    sd["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(4 * NUM_CLASSES, IMG_FEAT_DIM, generator=gen) * 1e-3
    sd["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(4 * NUM_CLASSES)
    return sd


def detectron2_cell_anchors(sizes: tuple = (64, 128, 256, 512), ratios: tuple = (0.5, 1.0, 2.0)) -> torch.Tensor:
    """The continuous, zero-centred anchors the HF demo's ``AnchorGenerator`` stores (size-major), [12, 4]."""
    rows = []
    for size in sizes:
        for ratio in ratios:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            rows.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(rows)


def random_state_dict(layout: str = "milvlg", config: Optional[DetectorConfig] = None, seed: int = 0) -> dict:
    """What a public checkpoint file of ``layout`` holds, with random weights:

    - ``milvlg``: ``{"model": sd}``, no ``num_batches_tracked``, ``cell_anchors.0`` = the Caffe anchors;
    - ``airsplay``: the HF demo's plain ``state_dict()`` (``num_batches_tracked``, detectron2 cell anchors);
    - ``violetteshev``: a plain state dict, no attribute head (PyTorch 0.4: no ``num_batches_tracked``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    sd = from_canonical(layout, random_canonical_state_dict(config, seed))
    if layout == "milvlg":
        sd[ANCHORS_KEY] = caffe_anchors()
        return {"model": sd}
    if layout == "airsplay":
        for key in [k for k in sd if k.endswith(".norm.running_var")]:
            sd[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0)
        sd[ANCHORS_KEY] = detectron2_cell_anchors()
    return sd


def write_random_weights(
    path: PathLike, layout: str = "milvlg", config: Optional[DetectorConfig] = None, seed: int = 0
) -> str:
    """Write :func:`random_state_dict` with ``torch.save`` (temp file, then rename); returns the path."""
    path = os.fspath(path)
    state = random_state_dict(layout, config, seed)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path
