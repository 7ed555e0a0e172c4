"""The fast collates' two front ends, both through the one collate :func:`~uniter_fast.data.assemble.assemble`.

:func:`collate` (pretraining): a batch of :class:`~uniter_fast.data.records.PairRecord` + the batch's
:class:`~uniter_fast.data.records.Draws` -> the ONE layout the training step reads: ``layout="packed"`` (the fast
path) builds only contract 2 (``batch["packed"]``), ``layout="padded"`` (the reference model path) only the padded
keys of contract 1; both add ``task``, ``txt_lens`` and ``num_bbs`` [B] int64 and the task's targets
(``feat_targets``, ``label_targets``, ``targets``, ``ot_inputs``). The stored fp16 region features are converted
straight into the batch tensor, and the wordpieces are checked against the vocabulary here, on the host, so the
model needs no host sync.

:func:`collate_rows` (every downstream task and VCR second-stage pretraining, ``uniter_fast.tasks``): per-example
rows -> BOTH layouts (the task heads read the padded sequence, the fast encoder the packed one), with the rows' type
ids, MLM labels and masked regions.

The tensors equal those of the reference path (:mod:`uniter_fast.data.reference`), tensor for tensor.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from uniter_fast.data.assemble import FEAT_DTYPES, LAYOUTS, Examples, assemble, check_layout
from uniter_fast.data.img_db import box_7d
from uniter_fast.data.records import Draws, PairRecord, check_task
from uniter_fast.data.txt_db import TokenIds
from uniter_fast.errors import DataError
from uniter_fast.layout import ot_split, pad_masks, padded_slots


def _check_words(words: np.ndarray, records: list[PairRecord], tokens: TokenIds) -> None:
    vocab = tokens.v_range[1]
    if words.size and (int(words.min()) < 0 or int(words.max()) >= vocab):
        bad = next(r for r in records if ((r.wordpieces < 0) | (r.wordpieces >= vocab)).any())
        raise DataError(
            f"text {bad.txt_id!r}: wordpiece ids must lie in [0, {vocab}) (the txt_db's v_range end), got "
            f"{bad.wordpieces.tolist()}"
        )


def _record_examples(task: str, records: list[PairRecord], draws: Draws, tokens: TokenIds) -> Examples:
    """The examples of a pretraining batch: [CLS] wordpieces (masked for MLM) [SEP], MLM labels (-1 elsewhere), the
    stored features, 7-d boxes, masked regions and (MRC tasks; MRFR never reads them) soft labels."""
    raw = np.concatenate([r.wordpieces for r in records])
    _check_words(raw, records, tokens)
    txt_lens = np.array([r.wordpieces.size + 2 for r in records], dtype=np.int64)
    total = int(txt_lens.sum())
    starts = txt_lens.cumsum() - txt_lens
    inner = np.ones(total, dtype=bool)
    inner[starts] = inner[starts + txt_lens - 1] = False
    ids = np.empty(total, dtype=np.int64)
    ids[starts], ids[starts + txt_lens - 1] = tokens.cls, tokens.sep
    ids[inner] = draws.words if task == "mlm" else raw
    labels = None
    if task == "mlm":
        labels = np.full(total, -1, dtype=np.int64)
        labels[inner] = draws.labels
    return Examples(
        txt_lens=txt_lens,
        input_ids=ids,
        num_bbs=np.array([r.features.shape[0] for r in records], dtype=np.int64),
        features=[r.features for r in records],
        boxes=box_7d(torch.from_numpy(np.concatenate([r.norm_bb for r in records])).float()),
        txt_labels=labels,
        regions=draws.regions,
        soft_labels=[r.soft_labels for r in records] if task in ("mrc", "mrckl") else None,
    )


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
    batch = {"task": task, **assemble(_record_examples(task, records, draws, tokens), (layout,), feat_dtype)}
    if task == "itm":
        batch["targets"] = torch.tensor([r.target for r in records], dtype=torch.int64)
        txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
        max_txt, max_bb = int(txt_lens.max()), int(num_bbs.max())
        if layout == "packed":
            batch["packed"]["txt_slot"] = padded_slots(txt_lens, max_txt)
            batch["packed"]["img_slot"] = padded_slots(num_bbs, max_bb)
            txt_pad, img_pad = pad_masks(txt_lens, num_bbs, max_txt, max_bb)
            batch["ot_inputs"] = {"txt_pad": txt_pad, "img_pad": img_pad, "txt_lens": txt_lens, "img_lens": num_bbs}
        else:
            batch["ot_inputs"] = ot_split(txt_lens, num_bbs, max_txt, max_bb, batch["attn_masks"].size(1))
    return batch


def _flat(rows: list[dict[str, Any]], key: str) -> Optional[np.ndarray]:
    """The rows' ``key`` tensors concatenated (numpy [Σ]), or None when the first row has none."""
    if rows[0].get(key) is None:
        return None
    missing = next((i for i, r in enumerate(rows) if r.get(key) is None), None)
    if missing is not None:
        raise ValueError(f"collate_rows: row 0 has {key!r} but row {missing} has none (every row needs it)")
    return torch.cat([r[key] for r in rows]).numpy()


def collate_rows(rows: list[dict[str, Any]], task: str) -> dict[str, Any]:
    """Both layouts of the per-example ``rows`` (CPU tensors, ``uniter_fast.tasks.data.row``) and ``task``.

    A row holds ``input_ids`` int [t] ([CLS] .. [SEP]), ``img_feat`` float32 or float16 [n, D] (n >= 0),
    ``img_pos_feat`` float [n, 7], and optionally (read when the first row has it) ``txt_type_ids`` [t] /
    ``img_type_ids`` [n] (NLVR2, VCR), ``txt_labels`` [t] (MLM, -1 = not masked), ``img_mask`` bool [n] (MRM) with
    ``soft_labels`` [n, K]. The batch: the padded keys of contract 1 (``input_ids`` [B, Lt] .. ``gather_index``;
    ``txt_type_ids`` [B, Lt] / ``img_type_ids`` [B, Nb], ``txt_labels``, ``img_masks`` / ``img_mask_tgt`` when
    given), ``packed`` (contract 2), ``txt_lens`` / ``num_bbs`` [B] int64, ``feat_targets`` / ``label_targets``
    (MRM) and ``task``; features in the rows' dtype.
    """
    if not rows:
        raise ValueError("collate_rows got an empty list of rows")
    feats = [r["img_feat"].numpy() for r in rows]
    feat_dtype = rows[0]["img_feat"].dtype
    if feat_dtype not in FEAT_DTYPES:
        raise ValueError(f"collate_rows: img_feat must be one of {FEAT_DTYPES}, got {feat_dtype} in row 0")
    regions = _flat(rows, "img_mask")
    soft_labels = None
    if regions is not None and rows[0].get("soft_labels") is not None:
        soft_labels = [r["soft_labels"].numpy() for r in rows]
    examples = Examples(
        txt_lens=np.array([r["input_ids"].numel() for r in rows], dtype=np.int64),
        input_ids=torch.cat([r["input_ids"] for r in rows]).numpy(),
        num_bbs=np.array([f.shape[0] for f in feats], dtype=np.int64),
        features=feats,
        boxes=torch.cat([r["img_pos_feat"] for r in rows]),
        txt_labels=_flat(rows, "txt_labels"),
        regions=regions,
        soft_labels=soft_labels,
        txt_type_ids=_flat(rows, "txt_type_ids"),
        img_type_ids=_flat(rows, "img_type_ids"),
    )
    batch = assemble(examples, LAYOUTS, feat_dtype)
    batch["task"] = task
    return batch
