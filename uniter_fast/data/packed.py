"""The packed layout for the varlen encoder (shared interface 2): valid tokens only, example after example, text
first then its regions; built from the padded batch so both layouts describe the same tokens."""

from __future__ import annotations

from typing import Any

import torch


def pack_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Packed view of a padded batch (keys of interface 1).

    Returns txt_ids / txt_position_ids / txt_index int64 [Σt], img_feat float32 [Σn, 2048], img_pos_feat [Σn, 7],
    img_index int64 [Σn], img_masks bool [Σn] (MRM only), cu_seqlens int32 [B+1], max_seqlen int, cls_index [B],
    and mlm_index / mlm_labels [M] (MLM) or mrm_index [M] (MRM), in the row-major order of the padded masks;
    txt_type_ids [Σt] / img_type_ids [Σn] when the batch has them (NLVR2, VCR).
    """
    txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
    max_txt, max_bb = batch["input_ids"].size(1), batch["img_feat"].size(1)
    seqlens = txt_lens + num_bbs
    cu = torch.zeros(txt_lens.size(0) + 1, dtype=torch.int64)
    cu[1:] = torch.cumsum(seqlens, 0)
    start = cu[:-1]
    txt_valid = torch.arange(max_txt)[None, :] < txt_lens[:, None]
    img_valid = torch.arange(max_bb)[None, :] < num_bbs[:, None]
    txt_pos = start[:, None] + torch.arange(max_txt)[None, :]
    img_pos = (start + txt_lens)[:, None] + torch.arange(max_bb)[None, :]
    position_ids = batch["position_ids"].expand_as(batch["input_ids"])
    packed: dict[str, Any] = {
        "txt_ids": batch["input_ids"][txt_valid],
        "txt_position_ids": position_ids[txt_valid],
        "img_feat": batch["img_feat"][img_valid],
        "img_pos_feat": batch["img_pos_feat"][img_valid],
        "txt_index": txt_pos[txt_valid],
        "img_index": img_pos[img_valid],
        "cu_seqlens": cu.to(torch.int32),
        "max_seqlen": int(seqlens.max()),
        "cls_index": start.clone(),
    }
    if "img_masks" in batch:
        packed["img_masks"] = batch["img_masks"][img_valid]
        packed["mrm_index"] = img_pos[batch["img_masks"]]
    if "txt_labels" in batch:
        selected = batch["txt_labels"] != -1
        packed["mlm_index"] = txt_pos[selected]
        packed["mlm_labels"] = batch["txt_labels"][selected]
    for key, valid in (("txt_type_ids", txt_valid), ("img_type_ids", img_valid)):
        if batch.get(key) is not None:
            packed[key] = batch[key][valid]
    return packed


def unpack_tokens(packed: dict[str, Any], hidden: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed [T, ...] tensor into the per-example sequences [t_i + n_i, ...] (for checks and readout)."""
    cu = packed["cu_seqlens"].long()
    return [hidden[int(cu[i]) : int(cu[i + 1])] for i in range(cu.numel() - 1)]
