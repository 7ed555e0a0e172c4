"""Perturbations of a batch's inputs (VILLA's adversarial training): where they go in each layout.

A perturbation is held in the padded shapes of the batch whatever the encoder path: ``txt_delta`` [B, Lt, H] on the
word embeddings (aligned with ``input_ids``) and ``img_delta`` [B, Nb, 2048] on the raw region features (aligned with
``img_feat``). The padded forward reads them from the batch (``Model.forward_batch``); for the packed forward they are
gathered at the valid tokens into ``packed["txt_delta"]`` [St, H] / ``packed["img_delta"]`` [Sn, 2048]. Pad positions
never reach a valid output in either layout, so their gradient is zero on both paths and per-example norms over all
positions equal the norms over the valid ones. A batch in the packed layout only (pretraining's fast collate) has no
padded widths: its grid is [B, max_seqlen] for both modalities (:func:`delta_grid`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def delta_grid(batch: dict[str, Any]) -> tuple[int, int, int]:
    """(B, Lt, Nb): the padded grid the perturbations of ``batch`` are held in: the padded layout's widths, or
    ``max_seqlen`` for both in a packed-only batch (known on the host: no sync)."""
    size = batch["txt_lens"].size(0)
    if "input_ids" in batch:
        return size, batch["input_ids"].size(1), batch["img_feat"].size(1)
    longest = int(batch["packed"]["max_seqlen"])
    return size, longest, longest


def delta_slots(batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [St], [Sn]: the flat padded slot (row * Lt + column, row * Nb + column; :func:`delta_grid`) of every
    packed text token and region of ``batch``, computed on the batch's device from the packed positions (no host
    sync)."""
    packed = batch["packed"]
    _, txt_width, img_width = delta_grid(batch)
    ends = packed["cu_seqlens"][1:].long()
    starts = packed["cu_seqlens"][:-1].long()
    txt_index, img_index = packed["txt_index"], packed["img_index"]
    txt_row = torch.searchsorted(ends, txt_index, right=True)
    img_row = torch.searchsorted(ends, img_index, right=True)
    txt_slot = txt_row * txt_width + (txt_index - starts[txt_row])
    img_column = img_index - starts[img_row] - batch["txt_lens"].to(img_index.device)[img_row]
    return txt_slot, img_row * img_width + img_column


def with_deltas(
    batch: dict[str, Any],
    txt_delta: Optional[torch.Tensor],
    img_delta: Optional[torch.Tensor],
    slots: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> dict[str, Any]:
    """A shallow copy of ``batch`` carrying ``txt_delta`` [B, Lt, H] / ``img_delta`` [B, Nb, 2048] (either may be
    None) for the padded forward and, when the batch has ``packed``, their valid rows for the packed forward
    (``slots``: :func:`delta_slots`, computed when not given). The batch itself is not changed."""
    out = dict(batch)
    for key, delta in (("txt_delta", txt_delta), ("img_delta", img_delta)):
        if delta is not None:
            out[key] = delta
    if "packed" in batch:
        txt_slot, img_slot = delta_slots(batch) if slots is None else slots
        packed = dict(batch["packed"])
        if txt_delta is not None:
            packed["txt_delta"] = txt_delta.flatten(0, 1).index_select(0, txt_slot)
        if img_delta is not None:
            packed["img_delta"] = img_delta.flatten(0, 1).index_select(0, img_slot)
        out["packed"] = packed
    return out
