"""The fast collates: one batch of records + draws -> the one layout the training step reads.

``layout="packed"`` (the fast path) builds only contract 2 (``batch["packed"]``), ``layout="padded"`` (the
reference model path) only the padded keys of contract 1; both add the layout-free keys ``task``, ``txt_lens`` and
``num_bbs`` [B] int64 and the task's targets (``feat_targets``, ``label_targets``, ``targets``, ``ot_inputs``).
Everything is computed here, on the host, once per batch: lengths, positions, ``cu_seqlens`` / ``max_seqlen``, the
OT lengths and slots, and the value checks (every wordpiece inside the vocabulary), so the model needs no host sync
to read them. The stored fp16 region features are converted straight into the batch tensor (one pass, in torch);
inside a DataLoader worker that tensor is allocated in shared memory, so handing it to the main process copies
nothing. The tensors equal those of the reference path (:mod:`uniter_fast.data.reference`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import numpy as np
import torch

from uniter_fast.data.img_db import box_7d
from uniter_fast.data.lmdb_env import DataError
from uniter_fast.data.records import MRM_TASKS, Draws, PairRecord, check_task
from uniter_fast.data.txt_db import TokenIds
from uniter_fast.layout import joint_layout, ot_split, packed_positions, pad_masks, padded_slots

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


def _stack_small(arrays: list[np.ndarray], rows: int, region_rows: np.ndarray) -> torch.Tensor:
    """float32 [rows, width] from small arrays (boxes): one numpy concatenation, one conversion, placed at
    ``region_rows`` (zeros elsewhere)."""
    stacked = torch.from_numpy(np.concatenate(arrays)).float()
    if stacked.size(0) == rows:
        return stacked
    return torch.zeros(rows, stacked.size(1)).index_copy_(0, torch.from_numpy(region_rows), stacked)


def _ranks(lengths: np.ndarray) -> np.ndarray:
    """0 .. n_i - 1 for every i, concatenated (int64 [Σ n_i])."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _check_words(words: np.ndarray, records: list[PairRecord], tokens: TokenIds) -> None:
    vocab = tokens.v_range[1]
    if words.size and (int(words.min()) < 0 or int(words.max()) >= vocab):
        bad = next(r for r in records if ((r.wordpieces < 0) | (r.wordpieces >= vocab)).any())
        raise DataError(
            f"text {bad.txt_id!r}: wordpiece ids must lie in [0, {vocab}) (the txt_db's v_range end), got "
            f"{bad.wordpieces.tolist()}"
        )


def _text(task: str, records: list[PairRecord], draws: Draws, tokens: TokenIds) -> dict[str, Any]:
    """Text of every example in packed order: ids, positions, MLM labels (-1 elsewhere), as int64 arrays [Σt]."""
    raw = np.concatenate([r.wordpieces for r in records])
    _check_words(raw, records, tokens)
    txt_lens = np.array([r.wordpieces.size + 2 for r in records], dtype=np.int64)
    total = int(txt_lens.sum())
    starts = np.cumsum(txt_lens) - txt_lens
    inner = np.ones(total, dtype=bool)
    inner[starts] = inner[starts + txt_lens - 1] = False
    ids = np.empty(total, dtype=np.int64)
    ids[starts], ids[starts + txt_lens - 1] = tokens.cls, tokens.sep
    ids[inner] = draws.words if task == "mlm" else raw
    out = {"txt_lens": txt_lens, "ids": ids, "positions": np.arange(total) - np.repeat(starts, txt_lens)}
    if task == "mlm":
        labels = np.full(total, -1, dtype=np.int64)
        labels[inner] = draws.labels
        out["labels"] = labels
    return out


def collate(
    task: str,
    records: list[PairRecord],
    draws: Draws,
    tokens: TokenIds,
    layout: str = "packed",
    feat_dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """The batch of ``task`` in ``layout`` from ``records`` (batch order) and their ``draws`` (see module doc).

    ``feat_dtype`` is the dtype of the region features ``img_feat`` (float32, or float16: the stored values as they
    are, half the bytes to build and to copy to the device, which casts them to its own dtype exactly);
    ``feat_targets``, ``label_targets`` and the boxes are float32 either way.
    """
    check_task(task)
    check_layout(layout, feat_dtype)
    if not records:
        raise ValueError("collate got an empty list of records")
    text = _text(task, records, draws, tokens)
    txt_lens = torch.from_numpy(text["txt_lens"])
    counts = np.array([r.features.shape[0] for r in records], dtype=np.int64)
    num_bbs = torch.from_numpy(counts)
    if layout == "packed":  # region i of the batch -> row i; padded: example b's regions -> rows b * Nb + j
        starts, rows = np.cumsum(counts) - counts, int(counts.sum())
    else:
        starts, rows = np.arange(counts.size) * int(counts.max()), counts.size * int(counts.max())
    region_rows = np.repeat(starts, counts) + _ranks(counts)
    pad_rows = None
    if layout == "padded":
        pad_rows = np.ones(rows, dtype=bool)
        pad_rows[region_rows] = False
        pad_rows = np.flatnonzero(pad_rows)
    feat = fill_rows([r.features for r in records], starts, rows, pad_rows, feat_dtype)
    boxes = box_7d(_stack_small([r.norm_bb for r in records], rows, region_rows))
    batch: dict[str, Any] = {"task": task, "txt_lens": txt_lens, "num_bbs": num_bbs}
    if task in MRM_TASKS:
        masked = torch.from_numpy(region_rows[draws.regions])
        batch["feat_targets"] = feat.index_select(0, masked).float()
        feat.index_fill_(0, masked, 0.0)
        if task != "mrfr":
            chosen = [r.soft_labels[m] for r, m in zip(records, np.split(draws.regions, np.cumsum(counts)[:-1]))]
            batch["label_targets"] = torch.from_numpy(np.concatenate(chosen)).float()
    if task == "itm":
        batch["targets"] = torch.tensor([r.target for r in records], dtype=torch.int64)
    if layout == "packed":
        batch["packed"] = _packed(task, text, txt_lens, num_bbs, feat, boxes, draws)
        if task == "itm":
            txt_pad, img_pad = pad_masks(txt_lens, num_bbs, int(txt_lens.max()), int(num_bbs.max()))
            batch["ot_inputs"] = {"txt_pad": txt_pad, "img_pad": img_pad, "txt_lens": txt_lens, "img_lens": num_bbs}
    else:
        batch.update(_padded(task, text, txt_lens, num_bbs, feat, boxes, draws))
    return batch


def _packed(
    task: str,
    text: dict[str, Any],
    txt_lens: torch.Tensor,
    num_bbs: torch.Tensor,
    feat: torch.Tensor,
    boxes: torch.Tensor,
    draws: Draws,
) -> dict[str, Any]:
    packed = {
        "txt_ids": torch.from_numpy(text["ids"]),
        "txt_position_ids": torch.from_numpy(text["positions"]),
        "img_feat": feat,
        "img_pos_feat": boxes,
        **packed_positions(txt_lens, num_bbs),
    }
    if draws.regions is not None:
        regions = torch.from_numpy(draws.regions)
        packed["img_masks"] = regions
        packed["mrm_index"] = packed["img_index"][regions]
    if task == "mlm":
        labels = torch.from_numpy(text["labels"])
        selected = labels != -1
        packed["mlm_index"] = packed["txt_index"][selected]
        packed["mlm_labels"] = labels[selected]
    if task == "itm":
        packed["txt_slot"] = padded_slots(txt_lens, int(txt_lens.max()))
        packed["img_slot"] = padded_slots(num_bbs, int(num_bbs.max()))
    return packed


def _padded(
    task: str,
    text: dict[str, Any],
    txt_lens: torch.Tensor,
    num_bbs: torch.Tensor,
    feat: torch.Tensor,
    boxes: torch.Tensor,
    draws: Draws,
) -> dict[str, Any]:
    size, max_txt, max_bb = txt_lens.numel(), int(txt_lens.max()), int(num_bbs.max())
    txt_slot = padded_slots(txt_lens, max_txt)
    attn_masks, gather_index = joint_layout(txt_lens, num_bbs, max_txt, max_bb)
    input_ids = torch.zeros(size * max_txt, dtype=torch.int64).index_copy_(0, txt_slot, torch.from_numpy(text["ids"]))
    out: dict[str, Any] = {
        "input_ids": input_ids.view(size, max_txt),
        "position_ids": torch.arange(max_txt, dtype=torch.int64)[None, :],
        "img_feat": feat.view(size, max_bb, -1),
        "img_pos_feat": boxes.view(size, max_bb, -1),
        "attn_masks": attn_masks,
        "gather_index": gather_index,
    }
    if task == "mlm":
        labels = torch.full((size * max_txt,), -1, dtype=torch.int64)
        out["txt_labels"] = labels.index_copy_(0, txt_slot, torch.from_numpy(text["labels"])).view(size, max_txt)
    if draws.regions is not None:
        regions = torch.from_numpy(draws.regions)
        img_masks = torch.zeros(size * max_bb, dtype=torch.bool)
        out["img_masks"] = img_masks.index_copy_(0, padded_slots(num_bbs, max_bb), regions).view(size, max_bb)
        joint_len = attn_masks.size(1)
        joint_slot = padded_slots(num_bbs, joint_len) + torch.repeat_interleave(txt_lens, num_bbs)
        tgt = torch.zeros(size * joint_len, dtype=torch.bool)
        out["img_mask_tgt"] = tgt.index_copy_(0, joint_slot, regions).view(size, joint_len)
    if task == "itm":
        out["ot_inputs"] = ot_split(txt_lens, num_bbs, max_txt, max_bb, attn_masks.size(1))
    return out
