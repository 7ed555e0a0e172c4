"""The public checkpoints' key layouts and the remaps between them and ours (MILVLG's, the canonical one).

- ``milvlg``: MILVLG/bottom-up-attention.pytorch ``bua-caffe-frcn-r101*.pth``; our module tree has its names.
  Classes and attributes in Caffe order (background / "no attribute" in column 0), RPN with 24 = [12 bg | 12 fg]
  objectness channels (pairwise softmax), ``bbox_pred`` [6404, 2048].
- ``airsplay``: airsplay/py-bottom-up-attention ``faster_rcnn_from_caffe_attr*.pkl`` and the HF LXMERT demo
  ``unc-nlp/frcnn-vg-finetuned`` (detectron2 order): background **last** in ``cls_score``, ``cls_embedding`` and
  (assumed, as the HF demo drops it) ``attr_score``; 12 sigmoid objectness logits (the fg-minus-bg of the pairwise
  softmax: softmax([0, z])[1] = sigmoid(z)); ``bbox_pred`` [6400, 2048] without background rows; the attribute head
  is named ``cls_embedding``/``fc_attr``/``attr_score``; BatchNorms carry ``num_batches_tracked``.
- ``violetteshev``: violetteshev/bottom-up-features ``bottomup_pretrained_10_100.pth`` (faster-rcnn.pytorch
  names): ``RCNN_base.{0 conv1, 1 bn1, 4-6 res2-res4}``, ``RCNN_top.0`` (res5), ``RCNN_rpn.RPN_*``,
  ``RCNN_cls_score``, ``RCNN_bbox_pred``; torchvision bottleneck names (``bn1``, ``downsample.0/1``); no attributes.

``to_canonical(layout, sd)`` and ``from_canonical(layout, sd)`` are inverses up to the RPN reparametrisation
(softmax-equivalent), which is what the random-weight generator uses to write each exact layout.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

LAYOUTS = ("milvlg", "airsplay", "violetteshev")

_PRED = "roi_heads.box_predictor."
_OBJ = "proposal_generator.rpn_head.objectness_logits."
# canonical name -> airsplay name of the attribute head
_AIRSPLAY_ATTR = {"cls_embed": "cls_embedding", "attr_linear1": "fc_attr", "attr_linear2": "attr_score"}
# rows in class order whose background row is last in airsplay files
_AIRSPLAY_ROLLED = (
    "cls_score.weight",
    "cls_score.bias",
    "cls_embedding.weight",
    "attr_score.weight",
    "attr_score.bias",
)


def detect_layout(sd: dict[str, torch.Tensor]) -> str:
    """The layout of a state dict, from its keys and the RPN objectness shape; ValueError if none fits."""
    if any(k.startswith("RCNN_base.") for k in sd):
        return "violetteshev"
    obj = sd.get(_OBJ + "weight")
    if "backbone.stem.conv1.weight" in sd and obj is not None:
        if obj.shape[0] == 24 and (_PRED + "cls_embedding.weight") not in sd:
            return "milvlg"
        if obj.shape[0] == 12:
            return "airsplay"
    sample = sorted(sd)[:6]
    raise ValueError(
        "weights: unrecognised key layout; expected MILVLG ('backbone.stem.conv1.weight', 24-channel "
        f"'{_OBJ}weight'), airsplay/HF (12-channel objectness) or violetteshev ('RCNN_base.0.weight'); got "
        f"{len(sd)} keys starting {sample}"
    )


def _roll_background(t: torch.Tensor, to_front: bool) -> torch.Tensor:
    """Move row 0 to the end (``to_front=False``) or the last row to the front."""
    return torch.cat([t[-1:], t[:-1]]) if to_front else torch.cat([t[1:], t[:1]])


def _airsplay_to_canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.startswith(_PRED):
            name = key[len(_PRED) :]
            if name in _AIRSPLAY_ROLLED:
                value = _roll_background(value, to_front=True)
            elif name.startswith("bbox_pred."):  # background rows (unused) as zeros
                value = torch.cat([value.new_zeros(4, *value.shape[1:]), value])
            module, _, leaf = name.partition(".")
            key = _PRED + {v: k for k, v in _AIRSPLAY_ATTR.items()}.get(module, module) + "." + leaf
        elif key.startswith(_OBJ):  # sigmoid logit z -> pair (0, z)
            value = torch.cat([torch.zeros_like(value), value])
        out[key] = value
    return out


def _canonical_to_airsplay(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        if key.startswith(_PRED):
            module, _, leaf = key[len(_PRED) :].partition(".")
            key = _PRED + _AIRSPLAY_ATTR.get(module, module) + "." + leaf
            if key[len(_PRED) :] in _AIRSPLAY_ROLLED:
                value = _roll_background(value, to_front=False)
            elif module == "bbox_pred":
                value = value[4:]  # no background rows
        elif key.startswith(_OBJ):  # pair (bg, fg) -> fg - bg
            half = value.shape[0] // 2
            value = value[half:] - value[:half]
        out[key] = value
    return out


# canonical prefix -> violetteshev prefix, for the layers outside the ResNet blocks
_VIOLETTESHEV_PREFIXES = (
    ("proposal_generator.rpn_head.conv.", "RCNN_rpn.RPN_Conv."),
    ("proposal_generator.rpn_head.objectness_logits.", "RCNN_rpn.RPN_cls_score."),
    ("proposal_generator.rpn_head.anchor_deltas.", "RCNN_rpn.RPN_bbox_pred."),
    ("roi_heads.box_predictor.cls_score.", "RCNN_cls_score."),
    ("roi_heads.box_predictor.bbox_pred.", "RCNN_bbox_pred."),
)


def _block_leaf_to_violetteshev(leaf: str) -> str:
    """``conv2.norm.bias`` -> ``bn2.bias``, ``shortcut.weight`` -> ``downsample.0.weight``, ..."""
    leaf = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", leaf)
    leaf = re.sub(r"^shortcut\.norm\.", "downsample.1.", leaf)
    return re.sub(r"^shortcut\.weight$", "downsample.0.weight", leaf)


def _block_leaf_from_violetteshev(leaf: str) -> str:
    leaf = re.sub(r"^bn(\d)\.", r"conv\1.norm.", leaf)
    leaf = re.sub(r"^downsample\.1\.", "shortcut.norm.", leaf)
    return re.sub(r"^downsample\.0\.weight$", "shortcut.weight", leaf)


def canonical_to_violetteshev_key(key: str) -> str:
    """The violetteshev name of a canonical key; ValueError for the attribute head, which that layout lacks."""
    if key == "backbone.stem.conv1.weight":
        return "RCNN_base.0.weight"
    m = re.match(r"^backbone\.stem\.conv1\.norm\.(\w+)$", key)
    if m:
        return f"RCNN_base.1.{m.group(1)}"
    m = re.match(r"^backbone\.res([234])\.(\d+)\.(.+)$", key)
    if m:
        return f"RCNN_base.{int(m.group(1)) + 2}.{m.group(2)}." + _block_leaf_to_violetteshev(m.group(3))
    m = re.match(r"^roi_heads\.res5\.(\d+)\.(.+)$", key)
    if m:
        return f"RCNN_top.0.{m.group(1)}." + _block_leaf_to_violetteshev(m.group(2))
    for canonical, theirs in _VIOLETTESHEV_PREFIXES:
        if key.startswith(canonical):
            return theirs + key[len(canonical) :]
    raise ValueError(f"weights: canonical key {key!r} has no violetteshev name")


def _violetteshev_key_to_canonical(key: str) -> str:
    if key == "RCNN_base.0.weight":
        return "backbone.stem.conv1.weight"
    m = re.match(r"^RCNN_base\.1\.(\w+)$", key)
    if m:
        return f"backbone.stem.conv1.norm.{m.group(1)}"
    m = re.match(r"^RCNN_base\.([456])\.(\d+)\.(.+)$", key)
    if m:
        return f"backbone.res{int(m.group(1)) - 2}.{m.group(2)}." + _block_leaf_from_violetteshev(m.group(3))
    m = re.match(r"^RCNN_top\.0\.(\d+)\.(.+)$", key)
    if m:
        return f"roi_heads.res5.{m.group(1)}." + _block_leaf_from_violetteshev(m.group(2))
    for canonical, theirs in _VIOLETTESHEV_PREFIXES:
        if key.startswith(theirs):
            return canonical + key[len(theirs) :]
    return key  # unknown: reported as unexpected by the strict check


def _violetteshev_to_canonical(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_violetteshev_key_to_canonical(k): v for k, v in sd.items()}


def _canonical_to_violetteshev(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    attr = tuple(_PRED + name for name in _AIRSPLAY_ATTR)
    return {canonical_to_violetteshev_key(k): v for k, v in sd.items() if not k.startswith(attr)}


_TO: dict[str, Callable] = {
    "milvlg": dict,
    "airsplay": _airsplay_to_canonical,
    "violetteshev": _violetteshev_to_canonical,
}
_FROM: dict[str, Callable] = {
    "milvlg": dict,
    "airsplay": _canonical_to_airsplay,
    "violetteshev": _canonical_to_violetteshev,
}


def to_canonical(layout: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename/reorder a ``layout`` state dict into MILVLG's names and Caffe class order."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _TO[layout](sd)


def from_canonical(layout: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_canonical` (attribute weights are dropped for violetteshev, which has none)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return _FROM[layout](sd)
