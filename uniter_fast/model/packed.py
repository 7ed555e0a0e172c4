"""The encoder on the packed (unpadded) layout: checking a packed batch and embedding and running it.

A packed batch (contract 2 of :mod:`uniter_fast.layout`; the ``packed`` dict of the fast collates, or
``layout.pack_batch`` of a padded batch) holds only valid tokens: T = sum_i (t_i + n_i), example i's text then its
regions at positions cu_seqlens[i] .. cu_seqlens[i+1]-1, examples in batch order. This is exactly the valid part of
the original joint layout, row by row, so ``padded_out[attn_masks.bool()] == packed_out``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from uniter_fast.config import IMG_POS_DIM
from uniter_fast.model.attention import VarlenBatch

PACKED_REQUIRED = ("txt_ids", "txt_position_ids", "img_feat", "img_pos_feat", "txt_index", "img_index", "cu_seqlens")


def check_packed(packed: dict[str, Any], img_dim: int, check_values: bool) -> None:
    """Raise ``ValueError`` unless ``packed`` has the keys and mutually consistent shapes of contract 2.

    ``check_values`` also checks cu_seqlens[-1] == T and max_seqlen against the lengths (one copy of
    ``cu_seqlens`` to the host: synchronises a GPU).
    """
    missing = [key for key in PACKED_REQUIRED if key not in packed]
    if missing:
        raise ValueError(f"packed batch is missing {missing}; expected the keys of contract 2 {list(PACKED_REQUIRED)}")
    num_txt, num_img = packed["txt_ids"].numel(), packed["img_feat"].size(0)
    expected = {
        "txt_ids": (num_txt,),
        "txt_position_ids": (num_txt,),
        "txt_index": (num_txt,),
        "img_feat": (num_img, img_dim),
        "img_pos_feat": (num_img, IMG_POS_DIM),
        "img_index": (num_img,),
    }
    if packed.get("img_masks") is not None:
        expected["img_masks"] = (num_img,)
    for key, shape in expected.items():
        if tuple(packed[key].shape) != shape:
            raise ValueError(f"packed[{key!r}] must have shape {list(shape)}, got {list(packed[key].shape)}")
    cu_seqlens = packed["cu_seqlens"]
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"packed['cu_seqlens'] must be a [B+1] int32 tensor, got shape {list(cu_seqlens.shape)} {cu_seqlens.dtype}"
        )
    if "max_seqlen" not in packed:
        raise ValueError("packed batch is missing 'max_seqlen' (the longest t_i + n_i, a Python int)")
    if not check_values:
        return
    total = num_txt + num_img
    bounds = cu_seqlens.tolist()  # the one host sync of these checks
    if bounds[0] != 0 or bounds[-1] != total:
        raise ValueError(
            f"packed['cu_seqlens'] must run from 0 to T = {total} text + region tokens, got "
            f"[{bounds[0]}, ..., {bounds[-1]}]"
        )
    longest = max(end - start for start, end in zip(bounds[:-1], bounds[1:]))
    if int(packed["max_seqlen"]) != longest:
        raise ValueError(f"packed['max_seqlen'] must be the longest sequence {longest}, got {packed['max_seqlen']}")


def packed_embeddings(model: torch.nn.Module, packed: dict[str, Any]) -> torch.Tensor:
    """Embeddings of the valid tokens only: [T, H] in the parameter dtype, text and regions at their packed
    positions (``txt_index`` / ``img_index``), with the type ids of ``txt_type_ids`` / ``img_type_ids`` when given
    (defaults 0 / 1) and the perturbations ``txt_delta`` [St, H] / ``img_delta`` [Sn, 2048] when given (adversarial
    training). ``model`` is a :class:`~uniter_fast.model.uniter.UniterModel`."""
    txt_emb = model.embeddings(
        packed["txt_ids"], packed["txt_position_ids"], packed.get("txt_type_ids"), packed.get("txt_delta")
    )
    img_emb = model._compute_img_embeddings(
        packed["img_feat"],
        packed["img_pos_feat"],
        packed.get("img_masks"),
        packed.get("img_type_ids"),
        packed.get("img_delta"),
    )
    positions = torch.cat([packed["txt_index"], packed["img_index"]])
    order = torch.empty_like(positions).scatter_(0, positions, torch.arange(positions.numel(), device=positions.device))
    return torch.cat([txt_emb, img_emb.to(txt_emb.dtype)]).index_select(0, order)


def packed_forward(
    model: torch.nn.Module,
    packed: dict[str, Any],
    backend: str,
    output_all_encoded_layers: bool = False,
    check_values: Optional[bool] = None,
) -> list[torch.Tensor]:
    """Run ``model`` (a UniterModel) on a packed batch with the attention ``backend`` (a resolved name, not
    ``"auto"``). ``check_values`` defaults to ``model.check_values``. Returns the list of every layer's [T, H] output,
    or a 1-element list with the last one."""
    check_packed(packed, model.config.img_dim, model.check_values if check_values is None else check_values)
    total = packed["txt_ids"].numel() + packed["img_feat"].size(0)
    batch = VarlenBatch(packed["cu_seqlens"], int(packed["max_seqlen"]), backend, total)
    return model.encoder.forward_packed(packed_embeddings(model, packed), batch, output_all_encoded_layers)
