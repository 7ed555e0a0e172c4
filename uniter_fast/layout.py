"""The two batch layouts of UNITER inputs, in one place: the data collates build them, the model reads them.

**Contract 1, padded** (the original's: ``data/data.py`` ``pad_tensors``, ``get_gather_index``): ``input_ids``
[B, Lt], ``img_feat`` [B, Nb, 2048], and the joint
sequence of length L = max(t_i + n_i) described by ``attn_masks`` and ``gather_index`` [B, L] (:func:`joint_layout`).
ITM adds the OT split of the joint output (:func:`ot_split`).

**Contract 2, packed** (the varlen encoder's): only valid tokens, T = Σ (t_i + n_i); example i holds positions
``cu_seqlens[i] .. cu_seqlens[i+1]-1``, its text first, then its regions (:func:`packed_positions`). This is the valid
part of the joint sequence, row by row: ``padded_out[attn_masks.bool()] == packed_out``. :func:`pack_batch` builds
it from a padded batch; the fast collates build it straight from the examples with the same positions.

Lengths are host (CPU) tensors or sequences; these functions read their values, so on a GPU they synchronise: build
layouts where the data are still on the host (the collates do).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np
import torch

Lengths = Union[torch.Tensor, np.ndarray, Sequence[int]]


def _lengths(name: str, value: Lengths, size: Optional[int] = None) -> np.ndarray:
    """``value`` as an int64 numpy array [B] (read on the host), or ``ValueError`` naming it."""
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 1 or array.dtype.kind not in "iu" or (size is not None and array.size != size):
        shape = "[B]" if size is None else f"[{size}]"
        raise ValueError(f"{name} must be an integer tensor of shape {shape}, got {array.shape} {array.dtype}")
    return array.astype(np.int64, copy=False)


def _segment_arange(lengths: np.ndarray, starts: np.ndarray) -> np.ndarray:
    offsets = np.cumsum(lengths) - lengths  # first flat slot of each segment
    return np.arange(int(lengths.sum())) + np.repeat(starts - offsets, lengths)


# ---------------------------------------------------------------------------------------------------- contract 1
def joint_layout(
    txt_lens: Lengths,
    num_bbs: Lengths,
    max_txt_len: Optional[int] = None,
    max_bbs: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and gather index of the original collates.

    Args:
        txt_lens: [B] int, text length t_i of each row including [CLS] and [SEP].
        num_bbs: [B] int, number of regions n_i of each row.
        max_txt_len: Lt, the padded text length (default max t_i).
        max_bbs: Nb, the padded region count (default max n_i).

    Returns:
        attn_masks [B, L] int64 (1 for the first t_i + n_i positions) and gather_index [B, L] int64 (arange, with
        positions t_i .. t_i+n_i-1 pointing at Lt .. Lt+n_i-1), where L = max(t_i + n_i).
    """
    txt_lens = _lengths("txt_lens", txt_lens)
    num_bbs = _lengths("num_bbs", num_bbs, txt_lens.size)
    longest_txt, longest_img = int(txt_lens.max()), int(num_bbs.max())
    lt = longest_txt if max_txt_len is None else max_txt_len
    nb = longest_img if max_bbs is None else max_bbs
    if nb < longest_img or lt < longest_txt:
        raise ValueError(
            f"max_txt_len={lt} / max_bbs={nb} are smaller than the longest row (t={longest_txt}, n={longest_img})"
        )
    total = (txt_lens + num_bbs)[:, None]
    positions = np.arange(int(total.max()))[None, :]
    attn_masks = (positions < total).astype(np.int64)
    is_img = (positions >= txt_lens[:, None]) & (positions < total)
    gather_index = np.where(is_img, positions - txt_lens[:, None] + lt, positions)
    return torch.from_numpy(attn_masks), torch.from_numpy(gather_index)


def pad_masks(txt_lens: Lengths, num_bbs: Lengths, max_txt_len: int, max_bbs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """txt_pad bool [B, Lt] (True at positions >= t_i) and img_pad bool [B, Nb] (True at positions >= n_i)."""
    txt_lens, num_bbs = _lengths("txt_lens", txt_lens), _lengths("num_bbs", num_bbs)
    txt_pad = np.arange(max_txt_len)[None, :] >= txt_lens[:, None]
    img_pad = np.arange(max_bbs)[None, :] >= num_bbs[:, None]
    return torch.from_numpy(txt_pad), torch.from_numpy(img_pad)


def ot_split(txt_lens: Lengths, num_bbs: Lengths, max_txt_len: int, max_bbs: int, joint_len: int) -> dict[str, Any]:
    """The OT inputs of an ITM batch (the original ``itm_ot_collate``, plus lengths).

    Returns ot_scatter int64 [B, L] (joint position j -> j if j < t_i else Lt + j - t_i), scatter_max (its largest
    value, a Python int), txt_pad bool [B, Lt], img_pad bool [B, Nb], and txt_lens / img_lens int64 [B] (valid text
    tokens incl. [CLS]/[SEP], valid regions), so that OT need not derive lengths from the pad masks.
    """
    txt_lens, num_bbs = _lengths("txt_lens", txt_lens), _lengths("num_bbs", num_bbs)
    pos = np.arange(joint_len)[None, :]
    scatter = np.where(pos < txt_lens[:, None], pos, max_txt_len + pos - txt_lens[:, None])
    txt_pad, img_pad = pad_masks(txt_lens, num_bbs, max_txt_len, max_bbs)
    return {
        "ot_scatter": torch.from_numpy(scatter),
        "scatter_max": int(scatter.max()),
        "txt_pad": txt_pad,
        "img_pad": img_pad,
        "txt_lens": torch.from_numpy(txt_lens.copy()),
        "img_lens": torch.from_numpy(num_bbs.copy()),
    }


# ---------------------------------------------------------------------------------------------------- contract 2
def packed_positions(txt_lens: Lengths, num_bbs: Lengths) -> dict[str, Any]:
    """Where every token of every example sits in the packed sequence.

    Args:
        txt_lens: [B] int >= 1, text lengths t_i (with [CLS]/[SEP]). num_bbs: [B] int >= 0, region counts n_i.

    Returns:
        ``cu_seqlens`` int32 [B+1], ``max_seqlen`` (Python int), ``cls_index`` int64 [B] (= cu_seqlens[:-1]),
        ``txt_index`` int64 [Σt] (packed position of text token j of example i, examples in order) and
        ``img_index`` int64 [Σn] (the same for regions).
    """
    txt_lens = _lengths("txt_lens", txt_lens)
    num_bbs = _lengths("num_bbs", num_bbs, txt_lens.size)
    lengths = txt_lens + num_bbs
    cu_seqlens = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=cu_seqlens[1:])
    starts = cu_seqlens[:-1]
    return {
        "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)),
        "max_seqlen": int(lengths.max()),
        "cls_index": torch.from_numpy(starts.copy()),
        "txt_index": torch.from_numpy(_segment_arange(txt_lens, starts)),
        "img_index": torch.from_numpy(_segment_arange(num_bbs, starts + txt_lens)),
    }


def segment_arange(lengths: Lengths, starts: Lengths) -> torch.Tensor:
    """int64 [Σ lengths]: starts[i], starts[i]+1, ..., starts[i]+lengths[i]-1 for every i, in order."""
    lengths = _lengths("lengths", lengths)
    return torch.from_numpy(_segment_arange(lengths, _lengths("starts", starts, lengths.size)))


def padded_slots(lengths: Lengths, width: int) -> torch.Tensor:
    """int64 [Σ lengths]: the flat slot i * width + j of element j of row i in a [B, width] padded grid."""
    lengths = _lengths("lengths", lengths)
    return torch.from_numpy(_segment_arange(lengths, np.arange(lengths.size) * width))


def padded_index(starts: Lengths, lengths: Lengths, width: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded [B, width] view of B runs of the packed sequence, as an index and a mask (built on the host, so that
    a head gathers ``packed_out[index]`` without reading lengths on the device).

    Args:
        starts: [B] int, the packed position of each run's first token. lengths: [B] int >= 0, each run's length.
        width: the padded width (default max length).

    Returns:
        index int64 [B, width] (starts[i] + j for j < lengths[i], else 0) and pad bool [B, width] (True at
        j >= lengths[i]).
    """
    lengths = _lengths("lengths", lengths)
    starts = _lengths("starts", starts, lengths.size)
    width = int(lengths.max(initial=0)) if width is None else width
    columns = np.arange(width)[None, :]
    pad = columns >= lengths[:, None]
    index = np.where(pad, 0, starts[:, None] + columns)
    return torch.from_numpy(index.astype(np.int64)), torch.from_numpy(pad)


def pack_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Build the packed layout (contract 2) from a padded batch (contract 1), on the batch's device.

    Args:
        batch: ``input_ids`` [B, Lt] int64, ``position_ids`` [1 or B, Lt] int64, ``img_feat`` [B, Nb, 2048] float,
            ``img_pos_feat`` [B, Nb, 7] float, ``txt_lens`` [B] and ``num_bbs`` [B] int64; optional ``img_masks``
            [B, Nb] bool (MRM), ``txt_labels`` [B, Lt] int64 (MLM, -1 where not masked), ``txt_type_ids`` [B, Lt]
            and ``img_type_ids`` [B, Nb] int64 (NLVR2 / VCR type embeddings).

    Returns:
        dict with ``txt_ids`` [St], ``txt_position_ids`` [St], ``img_feat`` [Sn, 2048], ``img_pos_feat`` [Sn, 7],
        the positions of :func:`packed_positions` (``txt_index`` [St], ``img_index`` [Sn], ``cu_seqlens`` [B+1]
        int32, ``max_seqlen`` int, ``cls_index`` [B]); plus ``img_masks`` [Sn] bool and ``mrm_index`` [M] with MRM
        inputs, ``mlm_index`` [M] and ``mlm_labels`` [M] with MLM labels, ``txt_type_ids`` [St] / ``img_type_ids``
        [Sn] when given. St = Σ t_i, Sn = Σ n_i; indices int64.
        The lengths are read on the host (one copy from a GPU batch).
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
    txt_lens = _lengths("txt_lens", batch["txt_lens"], size)
    num_bbs = _lengths("num_bbs", batch["num_bbs"], size)
    if int(txt_lens.min()) < 1 or int(txt_lens.max()) > max_txt or int(num_bbs.min()) < 0 or num_bbs.max() > max_img:
        raise ValueError(
            f"txt_lens must lie in [1, Lt={max_txt}] and num_bbs in [0, Nb={max_img}], got txt_lens "
            f"{txt_lens.tolist()} and num_bbs {num_bbs.tolist()}"
        )
    device = input_ids.device
    positions = packed_positions(txt_lens, num_bbs)
    txt_slot = padded_slots(txt_lens, max_txt).to(device)
    img_slot = padded_slots(num_bbs, max_img).to(device)
    packed: dict[str, Any] = {
        "txt_ids": input_ids.reshape(-1)[txt_slot],
        "txt_position_ids": batch["position_ids"].expand(size, max_txt).reshape(-1)[txt_slot],
        "img_feat": img_feat.reshape(size * max_img, -1)[img_slot],
        "img_pos_feat": batch["img_pos_feat"].reshape(size * max_img, -1)[img_slot],
        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in positions.items()},
    }
    if batch.get("img_masks") is not None:
        img_masks = batch["img_masks"].bool().reshape(-1)[img_slot]
        packed["img_masks"] = img_masks
        packed["mrm_index"] = packed["img_index"][img_masks]
    if batch.get("txt_labels") is not None:
        labels = batch["txt_labels"].reshape(-1)[txt_slot]
        selected = labels != -1
        packed["mlm_index"] = packed["txt_index"][selected]
        packed["mlm_labels"] = labels[selected]
    for key, slot in (("txt_type_ids", txt_slot), ("img_type_ids", img_slot)):
        if batch.get(key) is not None:
            packed[key] = batch[key].reshape(-1)[slot]
    return packed


def unpack_tokens(packed: dict[str, Any], hidden: torch.Tensor) -> list[torch.Tensor]:
    """Split a packed [T, ...] tensor into the per-example sequences [t_i + n_i, ...] (for checks and readout)."""
    bounds = packed["cu_seqlens"].tolist()
    return [hidden[start:end] for start, end in zip(bounds[:-1], bounds[1:])]
