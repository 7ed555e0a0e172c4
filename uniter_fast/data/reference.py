"""The reference loader path: per-example items and per-task collates written as the original's (``data/*.py``),
producing both layouts (padded keys of contract 1, ``packed`` of contract 2 through :func:`layout.pack_batch`), and
the task datasets' collate of per-example rows (:func:`reference_rows`).

This is the path the fast collates (:mod:`uniter_fast.data.collate`) are held to: given the same records and random
draws, or the same rows, every tensor the fast path builds equals the one built here (``torch.equal``;
tests/test_data_collate.py, tests/test_data_task_collate.py), and ``bench/data_bench.py`` times both. Nothing in
training or evaluation calls it.

Every item is a dict with ``input_ids`` int64 [t] (with [CLS]/[SEP]), ``img_feat`` float32 [n, 2048],
``img_pos_feat`` float32 [n, 7], and per task ``txt_labels`` int64 [t] (MLM), ``img_mask`` bool [n] and, for
MRC, ``soft_labels`` float32 [n, 1601] (MRM), ``target`` int (ITM).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from uniter_fast.data.img_db import box_7d
from uniter_fast.data.padding import pad_1d, pad_2d
from uniter_fast.data.records import MRM_TASKS, Draws, PairRecord, check_task
from uniter_fast.data.txt_db import TokenIds
from uniter_fast.layout import joint_layout, ot_split, pack_batch, padded_slots


def reference_items(task: str, records: list[PairRecord], draws: Draws, tokens: TokenIds) -> list[dict[str, Any]]:
    """Today's items of ``records`` with the batch's random ``draws``: numpy fp16 -> fp32, one tensor per field."""
    check_task(task)
    items = []
    word_at = region_at = 0
    for record in records:
        words = record.wordpieces
        n = record.features.shape[0]
        item: dict[str, Any] = {
            "img_feat": torch.from_numpy(record.features.astype(np.float32)),
            "img_pos_feat": box_7d(torch.from_numpy(record.norm_bb.astype(np.float32))),
        }
        if task == "mlm":
            words = draws.words[word_at : word_at + words.size]
            labels = draws.labels[word_at : word_at + words.size]
            item["txt_labels"] = torch.tensor([-1, *labels.tolist(), -1], dtype=torch.int64)
        word_at += record.wordpieces.size
        item["input_ids"] = torch.tensor([tokens.cls, *words.tolist(), tokens.sep], dtype=torch.int64)
        if task in MRM_TASKS:
            item["img_mask"] = torch.from_numpy(draws.regions[region_at : region_at + n].copy())
            if record.soft_labels is not None:
                item["soft_labels"] = torch.from_numpy(record.soft_labels.astype(np.float32))
        region_at += n
        if task == "itm":
            item["target"] = record.target
        items.append(item)
    return items


def joint_batch(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The padded joint layout (contract 1) of ``items``: input_ids [B, Lt] (pad 0), position_ids [1, Lt], img_feat
    [B, Nb, 2048] / img_pos_feat [B, Nb, 7] (pad 0), attn_masks and gather_index [B, L], txt_lens / num_bbs [B];
    plus txt_type_ids [B, Lt] / img_type_ids [B, Nb] (pad 0) when the items carry them (NLVR2, VCR)."""
    if not items:
        raise ValueError("collate got an empty list of items")
    input_ids = pad_1d([it["input_ids"] for it in items], 0)
    txt_lens = torch.tensor([it["input_ids"].numel() for it in items], dtype=torch.int64)
    num_bbs = torch.tensor([it["img_feat"].size(0) for it in items], dtype=torch.int64)
    img_feat = pad_2d([it["img_feat"] for it in items])
    attn_masks, gather_index = joint_layout(txt_lens, num_bbs, input_ids.size(1), img_feat.size(1))
    batch = {
        "input_ids": input_ids,
        "position_ids": torch.arange(input_ids.size(1), dtype=torch.int64)[None, :],
        "img_feat": img_feat,
        "img_pos_feat": pad_2d([it["img_pos_feat"] for it in items]),
        "attn_masks": attn_masks,
        "gather_index": gather_index,
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
    [M, 2048] and (when the items carry soft labels) label_targets float32 [M, 1601], taken before the masked
    features are zeroed."""
    if task not in MRM_TASKS:
        raise ValueError(f"task must be one of {MRM_TASKS}, got {task!r}")
    batch = joint_batch(items)
    img_masks = pad_1d([it["img_mask"] for it in items], False)
    batch["feat_targets"] = batch["img_feat"][img_masks]
    if all("soft_labels" in it for it in items):
        batch["label_targets"] = pad_2d([it["soft_labels"] for it in items])[img_masks]
    batch["img_feat"] = batch["img_feat"].masked_fill(img_masks[..., None], 0.0)
    tgt = torch.zeros_like(batch["attn_masks"], dtype=torch.bool)
    rows, cols = img_masks.nonzero(as_tuple=True)
    tgt[rows, batch["txt_lens"][rows] + cols] = True
    batch["img_masks"] = img_masks
    batch["img_mask_tgt"] = tgt
    return _finish(batch, task)


def itm_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """ITM batch: + ``targets`` int64 [B] (1 = match) and ``ot_inputs`` (:func:`layout.ot_split`); ``packed`` also
    holds ``txt_slot`` / ``img_slot``, the padded [B, Lt] / [B, Nb] slot of each packed text token / region."""
    batch = joint_batch(items)
    batch["targets"] = torch.tensor([int(it["target"]) for it in items], dtype=torch.int64)
    txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
    max_txt, max_bb = batch["input_ids"].size(1), batch["img_feat"].size(1)
    batch["ot_inputs"] = ot_split(txt_lens, num_bbs, max_txt, max_bb, batch["attn_masks"].size(1))
    batch = _finish(batch, "itm")
    batch["packed"]["txt_slot"] = padded_slots(txt_lens, max_txt)
    batch["packed"]["img_slot"] = padded_slots(num_bbs, max_bb)
    return batch


def reference_collate(task: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The collate of ``task`` on today's items."""
    check_task(task)
    if task == "mlm":
        return mlm_collate(items)
    if task == "itm":
        return itm_collate(items)
    return mrm_collate(items, task)


def reference_rows(rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """The task datasets' collate of per-example rows (``uniter_fast.tasks.data.row``, the reference of
    ``uniter_fast.data.collate.collate_rows``): MLM rows (with ``txt_labels``) by :func:`mlm_collate`, MRM rows
    (with ``img_mask``) by :func:`mrm_collate`, other rows by :func:`joint_batch` + ``packed``; named ``task``."""
    if rows and "txt_labels" in rows[0]:
        batch = mlm_collate(rows)
    elif rows and "img_mask" in rows[0]:
        batch = mrm_collate(rows, task)
    else:
        batch = _finish(joint_batch(rows), task)
    batch["task"] = task
    return batch
