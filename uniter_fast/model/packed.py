"""The packed (unpadded) layout: building it from a padded batch, checking it, and running the encoder on it.

A packed batch (the ``packed`` dict of every collate) holds only valid tokens: T = sum_i (t_i + n_i), example i's
text then its regions at positions cu_seqlens[i] .. cu_seqlens[i+1]-1, examples in batch order. This is exactly the
valid part of the original joint layout, row by row, so ``padded_out[attn_masks.bool()] == packed_out``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from uniter_fast.config import IMG_POS_DIM
from uniter_fast.model.attention import VarlenBatch

PACKED_REQUIRED = ("txt_ids", "txt_position_ids", "img_feat", "img_pos_feat", "txt_index", "img_index", "cu_seqlens")


def _lengths(name: str, value: Any, batch: int) -> torch.Tensor:
    lengths = torch.as_tensor(value)
    if lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        raise ValueError(
            f"{name} must be an integer tensor of shape [{batch}], got {tuple(lengths.shape)} {lengths.dtype}"
        )
    return lengths.long()


def pack_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Build the packed layout (contract 2) from a padded batch (contract 1).

    Args:
        batch: ``input_ids`` [B, Lt] int64, ``position_ids`` [1 or B, Lt] int64, ``img_feat`` [B, Nb, 2048] float,
            ``img_pos_feat`` [B, Nb, 7] float, ``txt_lens`` [B] and ``num_bbs`` [B] int64; optional ``img_masks``
            [B, Nb] bool (MRM), ``txt_labels`` [B, Lt] int64 (MLM, -1 where not masked), ``txt_type_ids`` [B, Lt]
            and ``img_type_ids`` [B, Nb] int64 (NLVR2 / VCR type embeddings).

    Returns:
        dict with ``txt_ids`` [St], ``txt_position_ids`` [St], ``img_feat`` [Sn, 2048], ``img_pos_feat`` [Sn, 7],
        ``txt_index`` [St] / ``img_index`` [Sn] (packed positions), ``cu_seqlens`` [B+1] int32, ``max_seqlen`` int,
        ``cls_index`` [B]; plus ``img_masks`` [Sn] bool and ``mrm_index`` [M] with MRM inputs, ``mlm_index`` [M] and
        ``mlm_labels`` [M] with MLM labels, ``txt_type_ids`` [St] / ``img_type_ids`` [Sn] when given. St = sum t_i,
        Sn = sum n_i; index tensors are int64.
    """
    for key in ("input_ids", "position_ids", "img_feat", "img_pos_feat", "txt_lens", "num_bbs"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; pack_batch needs the padded keys of contract 1")
    input_ids, img_feat = batch["input_ids"], batch["img_feat"]
    if input_ids.dim() != 2 or img_feat.dim() != 3 or img_feat.size(0) != input_ids.size(0):
        raise ValueError(
            f"input_ids must be [B, Lt] and img_feat [B, Nb, D] with the same B, got {tuple(input_ids.shape)} "
            f"and {tuple(img_feat.shape)}"
        )
    size, max_txt = input_ids.shape
    max_img = img_feat.size(1)
    device = input_ids.device
    txt_lens = _lengths("txt_lens", batch["txt_lens"], size).to(device)
    num_bbs = _lengths("num_bbs", batch["num_bbs"], size).to(device)
    txt_ok = 1 <= int(txt_lens.min()) and int(txt_lens.max()) <= max_txt
    if not txt_ok or int(num_bbs.min()) < 0 or int(num_bbs.max()) > max_img:
        raise ValueError(
            f"txt_lens must lie in [1, Lt={max_txt}] and num_bbs in [0, Nb={max_img}], got txt_lens "
            f"{txt_lens.tolist()} and num_bbs {num_bbs.tolist()}"
        )
    lengths = txt_lens + num_bbs
    cu_seqlens = torch.zeros(size + 1, dtype=torch.int32, device=device)
    cu_seqlens[1:] = lengths.cumsum(0)
    starts = cu_seqlens[:-1].long()
    txt_slots = torch.arange(max_txt, device=device)[None, :]
    img_slots = torch.arange(max_img, device=device)[None, :]
    txt_valid = txt_slots < txt_lens[:, None]
    img_valid = img_slots < num_bbs[:, None]
    txt_position = starts[:, None] + txt_slots  # packed position of padded text slot (i, j)
    img_position = (starts + txt_lens)[:, None] + img_slots  # packed position of padded region slot (i, j)
    packed: dict[str, Any] = {
        "txt_ids": input_ids[txt_valid],
        "txt_position_ids": batch["position_ids"].expand(size, max_txt)[txt_valid],
        "img_feat": img_feat[img_valid],
        "img_pos_feat": batch["img_pos_feat"][img_valid],
        "txt_index": txt_position[txt_valid],
        "img_index": img_position[img_valid],
        "cu_seqlens": cu_seqlens,
        "max_seqlen": int(lengths.max()),
        "cls_index": starts,
    }
    if batch.get("img_masks") is not None:
        img_masks = batch["img_masks"].bool() & img_valid
        packed["img_masks"] = img_masks[img_valid]
        packed["mrm_index"] = img_position[img_masks]
    if batch.get("txt_labels") is not None:
        selected = (batch["txt_labels"] != -1) & txt_valid
        packed["mlm_index"] = txt_position[selected]
        packed["mlm_labels"] = batch["txt_labels"][selected]
    for key, valid in (("txt_type_ids", txt_valid), ("img_type_ids", img_valid)):
        if batch.get(key) is not None:
            packed[key] = batch[key][valid]
    return packed


def check_packed(packed: dict[str, Any], img_dim: int, check_values: bool) -> None:
    """Raise ``ValueError`` unless ``packed`` has the keys and mutually consistent shapes of contract 2.

    ``check_values`` also checks cu_seqlens[-1] == T and max_seqlen against the lengths (synchronises a GPU).
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
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(
            f"packed['cu_seqlens'] must run from 0 to T = {total} text + region tokens, got "
            f"[{int(cu_seqlens[0])}, ..., {int(cu_seqlens[-1])}]"
        )
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if int(packed["max_seqlen"]) != longest:
        raise ValueError(f"packed['max_seqlen'] must be the longest sequence {longest}, got {packed['max_seqlen']}")


def packed_embeddings(model: torch.nn.Module, packed: dict[str, Any]) -> torch.Tensor:
    """Embeddings of the valid tokens only: [T, H] in the parameter dtype, text and regions at their packed
    positions (``txt_index`` / ``img_index``), with the type ids of ``txt_type_ids`` / ``img_type_ids`` when given
    (defaults 0 / 1). ``model`` is a :class:`~uniter_fast.model.uniter.UniterModel`."""
    txt_emb = model.embeddings(packed["txt_ids"], packed["txt_position_ids"], packed.get("txt_type_ids"))
    img_emb = model._compute_img_embeddings(
        packed["img_feat"], packed["img_pos_feat"], packed.get("img_masks"), packed.get("img_type_ids")
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
    ``"auto"``). Returns the list of every layer's [T, H] output, or a 1-element list with the last one."""
    check_packed(packed, model.config.img_dim, model.check_inputs if check_values is None else check_values)
    batch = VarlenBatch(packed["cu_seqlens"], int(packed["max_seqlen"]), backend)
    return model.encoder.forward_packed(packed_embeddings(model, packed), batch, output_all_encoded_layers)
