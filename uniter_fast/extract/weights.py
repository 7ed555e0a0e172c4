"""Loading a public BUTD checkpoint strictly into :class:`Detector`.

Reads ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``; pickles with numpy arrays, such as detectron2's
``.pkl``, need ``allow_pickle=True``), ``.safetensors``; unwraps ``{"model": ...}`` / ``{"state_dict": ...}``;
detects the layout (:mod:`uniter_fast.extract.layouts`), remaps it to ours, reads the depth (blocks per stage) and
the presence of the attribute head off the keys, and loads strictly: missing, unexpected and mis-shaped keys are
one ValueError that names them. Entries that the extractor does not use are checked and skipped: ``bbox_pred``
(UNITER keeps the RPN RoIs), ``num_batches_tracked``, detectron2's ``pixel_mean``/``pixel_std`` and
``cell_anchors`` (compared with the Caffe anchors and the Caffe means, which are always used).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import re
import warnings
from typing import Any, Optional, Union

import numpy as np
import torch

from uniter_fast.config import PathLike
from uniter_fast.errors import DataError
from uniter_fast.extract.boxes import caffe_anchors
from uniter_fast.extract.config import IMG_FEAT_DIM, NUM_CLASSES, PIXEL_MEANS_BGR, DetectorConfig
from uniter_fast.extract.detector import Detector
from uniter_fast.extract.layouts import detect_layout, to_canonical

logger = logging.getLogger(__name__)

BBOX_PRED_SHAPES = {"weight": (4 * NUM_CLASSES, IMG_FEAT_DIM), "bias": (4 * NUM_CLASSES,)}
ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
MAX_LISTED = 12  # keys listed per kind in a loading error
WeightsSource = Union[PathLike, dict]


def read_state_dict(path: PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file as a flat {name: tensor} dict (numpy arrays converted)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as exc:  # safetensors' SafetensorError: a damaged or foreign file
            raise DataError(f"weights {path!r} is not a readable safetensors file ({exc})") from exc
    if path.endswith(".pkl"):
        if not allow_pickle:
            raise ValueError(
                f"weights {path!r}: a .pkl file is a Python pickle; pass allow_pickle=True "
                "(--allow-pickle) if you trust it"
            )
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if not allow_pickle:
                raise ValueError(
                    f"weights {path!r} holds objects other than tensors ({exc}); pass allow_pickle=True "
                    "(--allow-pickle) if you trust the file"
                ) from exc
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # not a torch file at all (text, truncated, another format)
            raise DataError(
                f"weights {path!r} is not a torch (.pth/.pt/.bin) or safetensors weights file "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    return unwrap_state_dict(obj, path)


def unwrap_state_dict(obj: Any, source: str = "weights") -> dict[str, torch.Tensor]:
    """``{"model": sd}`` / ``{"state_dict": sd}`` / ``sd`` -> sd with every value a torch tensor."""
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[str(key)] = value
    return out


def infer_config(sd: dict[str, torch.Tensor], base: Optional[DetectorConfig] = None) -> DetectorConfig:
    """``base`` (default settings if None) with ``blocks`` and ``attributes`` read off canonical keys."""
    blocks = []
    for prefix in ("backbone.res2.", "backbone.res3.", "backbone.res4.", "roi_heads.res5."):
        indices = [int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r"(\d+)\.", k)] if m]
        if not indices:
            raise ValueError(f"weights: no '{prefix}N.*' keys; not a ResNet C4 detector")
        blocks.append(max(indices) + 1)
    attributes = "roi_heads.box_predictor.cls_embed.weight" in sd
    return dataclasses.replace(base or DetectorConfig(), blocks=tuple(blocks), attributes=attributes)


def _check_extras(sd: dict[str, torch.Tensor], layout: str) -> list[str]:
    """Pop the entries the extractor does not use; return problems with their shapes."""
    problems = []
    for key in [k for k in sd if k.endswith("num_batches_tracked")]:
        sd.pop(key)
    for leaf, shape in BBOX_PRED_SHAPES.items():
        value = sd.pop(f"roi_heads.box_predictor.bbox_pred.{leaf}", None)
        if value is not None and tuple(value.shape) != shape:
            problems.append(f"roi_heads.box_predictor.bbox_pred.{leaf}: expected {shape}, got {tuple(value.shape)}")
    anchors = sd.pop(ANCHORS_KEY, None)
    if anchors is not None and not torch.equal(anchors.float(), caffe_anchors()):
        message = (
            f"weights: the file's cell anchors differ from the Caffe anchors (max |diff| "
            f"{(anchors.float() - caffe_anchors()).abs().max():.3g}); the Caffe anchors are used"
        )
        if layout == "milvlg":  # spec open point (1): expected equal
            warnings.warn(message, stacklevel=3)
        else:
            logger.info(message)
    mean = sd.pop("pixel_mean", None)
    sd.pop("pixel_std", None)
    if mean is not None and not torch.allclose(mean.flatten().double(), torch.tensor(PIXEL_MEANS_BGR).double()):
        warnings.warn(
            f"weights: pixel_mean {mean.flatten().tolist()} differs from Caffe's; Caffe's is used", stacklevel=3
        )
    return problems


def _strict_problems(sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    problems = []
    for kind, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            listed = ", ".join(keys[:MAX_LISTED]) + (f", ... ({len(keys)} in all)" if len(keys) > MAX_LISTED else "")
            problems.append(f"{kind} keys: {listed}")
    for key in shapes[:MAX_LISTED]:
        problems.append(f"{key}: expected {tuple(expected[key].shape)}, got {tuple(sd[key].shape)}")
    return problems


def load_detector(
    weights: WeightsSource,
    config: Optional[DetectorConfig] = None,
    layout: str = "auto",
    allow_pickle: bool = False,
) -> Detector:
    """A :class:`Detector` (fp32, CPU, eval, no gradients) holding ``weights`` (a path or a state dict), any layout.

    ``config``: the test-time settings; its ``blocks``/``attributes`` are replaced by what the weights hold.
    """
    source = os.fspath(weights) if not isinstance(weights, dict) else "weights"
    sd = read_state_dict(weights, allow_pickle) if not isinstance(weights, dict) else unwrap_state_dict(weights)
    layout = detect_layout(sd) if layout == "auto" else layout
    sd = to_canonical(layout, sd)
    problems = _check_extras(sd, layout)
    config = infer_config(sd, config)
    detector = Detector(config)
    problems += _strict_problems(sd, detector.state_dict())
    if problems:
        raise ValueError(f"{source} ({layout} layout) does not fit the BUTD detector:\n  " + "\n  ".join(problems))
    detector.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    logger.info("loaded %s (%s layout, blocks %s, attributes %s)", source, layout, config.blocks, config.attributes)
    return detector.requires_grad_(False).eval()
