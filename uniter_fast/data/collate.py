"""Per-task collates (uniter.md §3.3): padded layout of interface 1 plus ``packed`` (interface 2) and ``task``.

Every item is a dict with ``input_ids`` int64 [t] (with [CLS]/[SEP]), ``img_feat`` float32 [n, 2048],
``img_pos_feat`` float32 [n, 7], and per task ``txt_labels`` int64 [t] (MLM), ``img_mask`` bool [n] +
``soft_labels`` float32 [n, 1601] (MRM), ``target`` int (ITM).
"""

from __future__ import annotations

from typing import Any

import torch

from uniter_fast.data.packed import pack_batch
from uniter_fast.data.padding import gather_index, joint_masks, ot_inputs, pad_1d, pad_2d

MRM_TASKS = ("mrfr", "mrc", "mrckl")


def joint_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The padded joint layout (interface 1) of ``items``: input_ids [B, Lt] (pad 0), position_ids [1, Lt], img_feat
    [B, Nb, 2048] / img_pos_feat [B, Nb, 7] (pad 0), attn_masks and gather_index [B, L], txt_lens / num_bbs [B];
    plus txt_type_ids [B, Lt] / img_type_ids [B, Nb] (pad 0) when the items carry them (NLVR2, VCR)."""
    if not items:
        raise ValueError("collate got an empty list of items")
    input_ids = pad_1d([it["input_ids"] for it in items], 0)
    txt_lens = torch.tensor([it["input_ids"].numel() for it in items], dtype=torch.int64)
    num_bbs = torch.tensor([it["img_feat"].size(0) for it in items], dtype=torch.int64)
    attn_masks = joint_masks(txt_lens, num_bbs)
    batch = {
        "input_ids": input_ids,
        "position_ids": torch.arange(input_ids.size(1), dtype=torch.int64)[None, :],
        "img_feat": pad_2d([it["img_feat"] for it in items]),
        "img_pos_feat": pad_2d([it["img_pos_feat"] for it in items]),
        "attn_masks": attn_masks,
        "gather_index": gather_index(txt_lens, num_bbs, input_ids.size(1), attn_masks.size(1)),
        "txt_lens": txt_lens,
        "num_bbs": num_bbs,
    }
    for key in ("txt_type_ids", "img_type_ids"):
        if items[0].get(key) is not None:
            batch[key] = pad_1d([it[key] for it in items], 0)
    return batch


def _finish(batch: dict[str, Any], task: str) -> dict[str, Any]:
    batch["task"] = task
    batch["packed"] = pack_batch(batch)
    return batch


def mlm_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """MLM batch: interface-1 keys + ``txt_labels`` int64 [B, Lt] (-1 = not masked / pad)."""
    batch = joint_batch(items)
    batch["txt_labels"] = pad_1d([it["txt_labels"] for it in items], -1)
    return _finish(batch, "mlm")


def mrm_collate(items: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """MRFR / MRC / MRC-kl batch: + img_masks bool [B, Nb], img_mask_tgt bool [B, L], feat_targets float32
    [M, 2048] and label_targets float32 [M, 1601] taken before the masked features are zeroed."""
    if task not in MRM_TASKS:
        raise ValueError(f"task must be one of {MRM_TASKS}, got {task!r}")
    batch = joint_batch(items)
    img_masks = pad_1d([it["img_mask"] for it in items], False)
    soft = pad_2d([it["soft_labels"] for it in items])
    batch["feat_targets"] = batch["img_feat"][img_masks]
    batch["label_targets"] = soft[img_masks]
    batch["img_feat"] = batch["img_feat"].masked_fill(img_masks[..., None], 0.0)
    tgt = torch.zeros_like(batch["attn_masks"], dtype=torch.bool)
    rows, cols = img_masks.nonzero(as_tuple=True)
    tgt[rows, batch["txt_lens"][rows] + cols] = True
    batch["img_masks"] = img_masks
    batch["img_mask_tgt"] = tgt
    return _finish(batch, task)


def mrfr_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """MRFR batch (see :func:`mrm_collate`)."""
    return mrm_collate(items, "mrfr")


def mrc_collate(items: list[dict[str, Any]], task: str = "mrckl") -> dict[str, Any]:
    """MRC / MRC-kl batch (see :func:`mrm_collate`); ``task`` is "mrc" or "mrckl"."""
    return mrm_collate(items, task)


def itm_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """ITM batch: + ``targets`` int64 [B] (1 = match) and ``ot_inputs`` (see :func:`padding.ot_inputs`)."""
    batch = joint_batch(items)
    batch["targets"] = torch.tensor([int(it["target"]) for it in items], dtype=torch.int64)
    batch["ot_inputs"] = ot_inputs(
        batch["txt_lens"],
        batch["num_bbs"],
        batch["input_ids"].size(1),
        batch["img_feat"].size(1),
        batch["attn_masks"].size(1),
    )
    return _finish(batch, "itm")
