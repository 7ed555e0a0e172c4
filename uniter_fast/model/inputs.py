"""Checks on the inputs of ``UniterModel.forward``: bad input is a ``ValueError`` naming the argument, the shape or
value expected and the one given, never a silent wrong answer or a device-side assert deep in a kernel."""

from __future__ import annotations

from typing import Optional

import torch

from uniter_fast.config import IMG_POS_DIM


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_rank(name: str, tensor: Optional[torch.Tensor], rank: int, layout: str) -> None:
    """Raise unless ``tensor`` (when given) has ``rank`` dimensions; ``layout`` names them, e.g. '[B, Lt]'."""
    if tensor is not None and tensor.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got {_shape(tensor)}")


def check_batch(named: dict[str, Optional[torch.Tensor]]) -> int:
    """All given tensors share dim 0 (the batch size, or 1 for broadcast position_ids); returns that size."""
    sizes = {name: t.size(0) for name, t in named.items() if t is not None and name != "position_ids"}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(f"batch sizes differ between inputs ({listing}); every input needs the same batch size")
    return next(iter(sizes.values()))


def check_forward_inputs(
    input_ids: Optional[torch.Tensor],
    position_ids: Optional[torch.Tensor],
    img_feat: Optional[torch.Tensor],
    img_pos_feat: Optional[torch.Tensor],
    attention_mask: torch.Tensor,
    gather_index: Optional[torch.Tensor],
    img_masks: Optional[torch.Tensor],
    img_dim: int,
    check_values: bool,
) -> None:
    """Validate the original forward signature's tensors. ``check_values`` adds the checks that read tensor values
    (gather_index range, NaN/inf features), which synchronise with the GPU."""
    if input_ids is None and img_feat is None:
        raise ValueError("input_ids and img_feat are both None; give text, regions or both")
    check_rank("input_ids", input_ids, 2, "[B, Lt]")
    check_rank("position_ids", position_ids, 2, "[1 or B, Lt]")
    check_rank("img_feat", img_feat, 3, f"[B, Nb, {img_dim}]")
    check_rank("img_pos_feat", img_pos_feat, 3, f"[B, Nb, {IMG_POS_DIM}]")
    check_rank("attention_mask", attention_mask, 2, "[B, L]")
    check_rank("gather_index", gather_index, 2, "[B, L]")
    check_rank("img_masks", img_masks, 2, "[B, Nb]")
    check_batch(
        dict(
            input_ids=input_ids,
            img_feat=img_feat,
            img_pos_feat=img_pos_feat,
            attention_mask=attention_mask,
            gather_index=gather_index,
            img_masks=img_masks,
        )
    )
    if img_feat is not None:
        if img_pos_feat is None:
            raise ValueError("img_pos_feat is None but img_feat is given; regions need their 7-d box features")
        if img_feat.size(-1) != img_dim:
            raise ValueError(f"img_feat must have shape [B, Nb, {img_dim}], got {_shape(img_feat)}")
        if img_pos_feat.size(-1) != IMG_POS_DIM:
            raise ValueError(f"img_pos_feat must have shape [B, Nb, {IMG_POS_DIM}], got {_shape(img_pos_feat)}")
        if img_pos_feat.shape[:2] != img_feat.shape[:2]:
            raise ValueError(
                f"img_pos_feat must have shape [B, Nb, 7] = {tuple(img_feat.shape[:2]) + (IMG_POS_DIM,)} "
                f"to match img_feat, got {_shape(img_pos_feat)}"
            )
        if img_masks is not None and img_masks.shape != img_feat.shape[:2]:
            raise ValueError(
                f"img_masks must have shape [B, Nb] = {tuple(img_feat.shape[:2])}, got {_shape(img_masks)}"
            )
    txt_len = input_ids.size(1) if input_ids is not None else 0
    img_len = img_feat.size(1) if img_feat is not None else 0
    if input_ids is not None and position_ids is not None and position_ids.size(1) != txt_len:
        raise ValueError(f"position_ids must have shape [1 or B, {txt_len}] like input_ids, got {_shape(position_ids)}")
    if input_ids is not None and img_feat is not None:
        if gather_index is None:
            raise ValueError("gather_index is required when both text and regions are given")
        if gather_index.shape != attention_mask.shape:
            raise ValueError(
                f"gather_index must have the shape of attention_mask {_shape(attention_mask)}, "
                f"got {_shape(gather_index)}"
            )
        if attention_mask.size(1) > txt_len + img_len:
            raise ValueError(
                f"attention_mask has length {attention_mask.size(1)}, more than Lt + Nb = {txt_len} + {img_len}"
            )
    else:
        expected = txt_len if input_ids is not None else img_len
        if attention_mask.size(1) != expected:
            raise ValueError(f"attention_mask must have shape [B, {expected}], got {_shape(attention_mask)}")
    if not check_values:
        return
    if gather_index is not None and input_ids is not None and img_feat is not None and gather_index.numel():
        low, high = int(gather_index.min()), int(gather_index.max())
        if low < 0 or high >= txt_len + img_len:
            raise ValueError(
                f"gather_index values must lie in [0, Lt + Nb) = [0, {txt_len + img_len}), got range [{low}, {high}]"
            )
    for name, tensor in (("img_feat", img_feat), ("img_pos_feat", img_pos_feat)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            bad = (~torch.isfinite(tensor)).nonzero()[0].tolist()
            raise ValueError(f"{name} holds NaN or inf values (first at index {bad}); features must be finite")
