"""The one fast collate: a batch of examples, as flat host arrays (:class:`Examples`), -> the requested layouts.

``assemble(examples, layouts)`` builds ``"packed"`` (contract 2, ``batch["packed"]``), ``"padded"`` (the padded keys
of contract 1) or both, plus the layout-free ``txt_lens`` / ``num_bbs`` [B] int64 and, with masked regions,
``feat_targets`` / ``label_targets``. Every tensor is built on the host in one pass from the examples (numpy index
arithmetic on the lengths, one copy of the features per layout into a fresh tensor, in shared memory inside a
DataLoader worker), so the model needs no host sync to read the layout. Its front ends, in
:mod:`uniter_fast.data.collate`, turn pretraining records + draws and the task datasets' per-example rows into
:class:`Examples`; the tensors equal those of the reference path (:mod:`uniter_fast.data.reference`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from uniter_fast.layout import joint_layout, packed_positions, padded_slots

# The records' arrays are read-only views of the LMDB map; torch warns (once) that a tensor over them could be
# written to. This module only reads them (copy_ sources).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)

LAYOUTS = ("packed", "padded")
FEAT_DTYPES = (torch.float32, torch.float16)


def check_layout(layout: str, feat_dtype: torch.dtype = torch.float32) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS` and ``feat_dtype`` one of
    :data:`FEAT_DTYPES` (the stored fp16 features, exactly, in float32 or as stored)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if feat_dtype not in FEAT_DTYPES:
        raise ValueError(f"feat_dtype must be one of {FEAT_DTYPES} (exact for fp16 features), got {feat_dtype}")


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; in shared memory when called in a DataLoader worker (no copy on hand-over)."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def fill_rows(
    arrays: list[np.ndarray],
    starts: np.ndarray,
    rows: int,
    zero_rows: Optional[np.ndarray] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dtype`` [rows, width] with array i in rows starts[i] .. starts[i] + n_i - 1 and ``zero_rows`` set to 0.

    Arrays that fill every row, in order, in their own dtype are concatenated by one numpy call; otherwise each is
    converted by torch in one pass (numpy's fp16 -> fp32 ``astype`` is many times slower).
    """
    out = empty((rows, arrays[0].shape[1]), dtype)
    sizes = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    if (
        zero_rows is None
        and torch.from_numpy(arrays[0][:0]).dtype == dtype
        and np.array_equal(starts, np.cumsum(sizes) - sizes)
    ):
        np.concatenate(arrays, out=out.numpy())
        return out
    for array, start in zip(arrays, starts.tolist()):
        out.narrow(0, start, array.shape[0]).copy_(torch.from_numpy(array))
    if zero_rows is not None and zero_rows.size:
        out.index_fill_(0, torch.from_numpy(zero_rows), 0.0)
    return out


def ranks(lengths: np.ndarray) -> np.ndarray:
    """0 .. n_i - 1 for every i, concatenated (int64 [Σ n_i])."""
    return np.arange(lengths.sum()) - (lengths.cumsum() - lengths).repeat(lengths)


class Examples(NamedTuple):
    """One batch's examples as flat host arrays, examples in batch order (t_i text tokens, n_i >= 0 regions).

    txt_lens / num_bbs: int64 [B] (t_i with [CLS]/[SEP], n_i). input_ids: int [Σt] ([CLS] .. [SEP] of each text).
    features: B arrays [n_i, D] (any float dtype; converted to ``feat_dtype`` in the one copy), or, for the packed
    layout alone, None with boxes None: the layout without ``img_feat`` / ``img_pos_feat``, whose regions the
    caller gathers on the device from regions it holds there (``uniter_fast.data.gallery.with_regions``).
    boxes: float tensor [Σn, 7]. Optional: txt_labels
    int [Σt] (MLM, -1 = not masked), regions bool [Σn] (masked regions, MRM), soft_labels B arrays [n_i, K]
    (``label_targets`` of the masked regions), txt_type_ids int [Σt], img_type_ids int [Σn].
    """

    txt_lens: np.ndarray
    input_ids: np.ndarray
    num_bbs: np.ndarray
    features: Optional[list[np.ndarray]]
    boxes: Optional[torch.Tensor]
    txt_labels: Optional[np.ndarray] = None
    regions: Optional[np.ndarray] = None
    soft_labels: Optional[list[np.ndarray]] = None
    txt_type_ids: Optional[np.ndarray] = None
    img_type_ids: Optional[np.ndarray] = None


def _place(flat: torch.Tensor, rows: int, region_rows: np.ndarray) -> torch.Tensor:
    """[rows, width] with row i of ``flat`` [Σn, width] at ``region_rows[i]`` (zeros elsewhere)."""
    if flat.size(0) == rows:
        return flat
    out = torch.zeros(rows, flat.size(1), dtype=flat.dtype)
    return out.index_copy_(0, torch.from_numpy(region_rows), flat)


def _padded_1d(flat: np.ndarray, slots: torch.Tensor, size: int, width: int, fill: int) -> torch.Tensor:
    """[size, width] with ``flat`` [Σ] at the flat ``slots`` and ``fill`` elsewhere (same dtype)."""
    values = torch.from_numpy(flat)
    out = torch.full((size * width,), fill, dtype=values.dtype)
    return out.index_copy_(0, slots, values).view(size, width)


def assemble(ex: Examples, layouts: tuple[str, ...], feat_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The batch of ``ex`` in ``layouts`` (one or both of :data:`LAYOUTS`), region features in ``feat_dtype``.

    Returns ``txt_lens`` and ``num_bbs`` [B] int64; with ``ex.regions``, ``feat_targets`` [M, D] float32 (the masked
    regions' features, examples in order, taken before they are zeroed in every layout) and with
    ``ex.soft_labels`` also ``label_targets`` [M, K] float32; then ``packed`` and / or the padded keys.
    """
    for layout in layouts:
        check_layout(layout, feat_dtype)
    without_regions = ex.features is None or ex.boxes is None
    if without_regions and (ex.features is not None or ex.boxes is not None):
        raise ValueError("assemble: features and boxes are both given or both None")
    if without_regions and (tuple(layouts) != ("packed",) or ex.regions is not None):
        raise ValueError("assemble: a batch without region features is the packed layout alone, unmasked")
    txt_lens, num_bbs = torch.from_numpy(ex.txt_lens), torch.from_numpy(ex.num_bbs)
    batch: dict[str, Any] = {"txt_lens": txt_lens, "num_bbs": num_bbs}
    # layout -> (features, boxes, their rows); None, None without region features
    built: dict[str, tuple[Optional[torch.Tensor], Optional[torch.Tensor], np.ndarray]] = {}
    for layout in layouts:  # packed: region i of the batch -> row i; padded: example b's regions -> rows b * Nb + j
        pad_rows = None
        if layout == "packed":
            starts = ex.num_bbs.cumsum() - ex.num_bbs
            rows = int(ex.num_bbs.sum())
            region_rows = np.arange(rows)
        else:
            max_bb = int(ex.num_bbs.max())
            starts, rows = np.arange(ex.num_bbs.size) * max_bb, ex.num_bbs.size * max_bb
            region_rows = starts.repeat(ex.num_bbs) + ranks(ex.num_bbs)
            pad_rows = np.ones(rows, dtype=bool)
            pad_rows[region_rows] = False
            pad_rows = np.flatnonzero(pad_rows)
        if without_regions:
            built[layout] = (None, None, region_rows)
        else:
            feat = fill_rows(ex.features, starts, rows, pad_rows, feat_dtype)
            built[layout] = (feat, _place(ex.boxes, rows, region_rows), region_rows)
    if ex.regions is not None:
        for n, (feat, _, region_rows) in enumerate(built.values()):
            masked = torch.from_numpy(region_rows[ex.regions])
            if n == 0:
                batch["feat_targets"] = feat.index_select(0, masked).float()
            feat.index_fill_(0, masked, 0.0)
        if ex.soft_labels is not None:
            split = np.split(ex.regions, np.cumsum(ex.num_bbs)[:-1])
            chosen = [labels[m] for labels, m in zip(ex.soft_labels, split)]
            batch["label_targets"] = torch.from_numpy(np.concatenate(chosen)).float()
    if "packed" in built:
        batch["packed"] = _packed(ex, *built["packed"][:2])
    if "padded" in built:
        batch.update(_padded(ex, *built["padded"][:2]))
    return batch


def _packed(ex: Examples, feat: Optional[torch.Tensor], boxes: Optional[torch.Tensor]) -> dict[str, Any]:
    packed = {"txt_ids": torch.from_numpy(ex.input_ids), "txt_position_ids": torch.from_numpy(ranks(ex.txt_lens))}
    if feat is not None:
        packed["img_feat"], packed["img_pos_feat"] = feat, boxes
    packed.update(packed_positions(ex.txt_lens, ex.num_bbs))
    if ex.regions is not None:
        regions = torch.from_numpy(ex.regions)
        packed["img_masks"] = regions
        packed["mrm_index"] = packed["img_index"][regions]
    if ex.txt_labels is not None:
        labels = torch.from_numpy(ex.txt_labels)
        selected = labels != -1
        packed["mlm_index"] = packed["txt_index"][selected]
        packed["mlm_labels"] = labels[selected]
    if ex.txt_type_ids is not None:
        packed["txt_type_ids"] = torch.from_numpy(ex.txt_type_ids)
    if ex.img_type_ids is not None:
        packed["img_type_ids"] = torch.from_numpy(ex.img_type_ids)
    return packed


def _padded(ex: Examples, feat: torch.Tensor, boxes: torch.Tensor) -> dict[str, Any]:
    txt_lens, num_bbs = ex.txt_lens, ex.num_bbs
    size, max_txt, max_bb = txt_lens.size, int(txt_lens.max()), int(num_bbs.max())
    txt_slot = padded_slots(txt_lens, max_txt)
    attn_masks, gather_index = joint_layout(txt_lens, num_bbs, max_txt, max_bb)
    out: dict[str, Any] = {
        "input_ids": _padded_1d(ex.input_ids, txt_slot, size, max_txt, 0),
        "position_ids": torch.arange(max_txt, dtype=torch.int64)[None, :],
        "img_feat": feat.view(size, max_bb, feat.size(1)),
        "img_pos_feat": boxes.view(size, max_bb, boxes.size(1)),
        "attn_masks": attn_masks,
        "gather_index": gather_index,
    }
    if ex.txt_labels is not None:
        out["txt_labels"] = _padded_1d(ex.txt_labels, txt_slot, size, max_txt, -1)
    img_slot = padded_slots(num_bbs, max_bb) if ex.regions is not None or ex.img_type_ids is not None else None
    if ex.regions is not None:
        out["img_masks"] = _padded_1d(ex.regions, img_slot, size, max_bb, False)
        joint_len = attn_masks.size(1)
        joint_slot = padded_slots(num_bbs, joint_len) + torch.from_numpy(np.repeat(txt_lens, num_bbs))
        out["img_mask_tgt"] = _padded_1d(ex.regions, joint_slot, size, joint_len, False)
    if ex.txt_type_ids is not None:
        out["txt_type_ids"] = _padded_1d(ex.txt_type_ids, txt_slot, size, max_txt, 0)
    if ex.img_type_ids is not None:
        out["img_type_ids"] = _padded_1d(ex.img_type_ids, img_slot, size, max_bb, 0)
    return out
