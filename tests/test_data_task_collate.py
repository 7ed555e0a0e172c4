"""The task datasets' collate (``collate_rows``, both layouts) equals the reference path's (``reference_rows``:
``joint_batch`` + ``pack_batch``, or the MLM / MRM collates) tensor for tensor: on random ragged rows (with and
without type ids, MLM labels, masked regions, zero regions) and on real batches of every task's bundled sets."""

from __future__ import annotations

import os
import sys
from functools import partial
from typing import Any, Optional

import numpy as np
import pytest
import torch
from batch_compare import assert_same

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from batches import task_datasets  # noqa: E402

from uniter_fast.data import TokenBucketSampler
from uniter_fast.data.collate import collate_rows
from uniter_fast.data.reference import joint_batch, reference_rows
from uniter_fast.tasks import TASKS
from uniter_fast.tasks.data import TaskDataset
from uniter_fast.tasks.itm import ItmEvalDataset

KINDS = ("plain", "txt_types", "img_types", "both_types", "mlm", "mrfr", "mrckl")
ITM_PAIRS = (np.repeat(np.arange(3), 4), np.tile(np.arange(4), 3))  # (text, image) pairs of an ITM score batch
SIZES = ([(3, 5), (9, 0), (1, 12), (6, 5)], [(4, 7)], [(5, 3)] * 4, [(2, 0), (7, 4)], [(30, 1), (3, 36), (12, 9)])


def random_rows(lengths: list[tuple[int, int]], kind: str, seed: int, dim: int = 64) -> list[dict[str, Any]]:
    """Rows of ``kind`` with (text, regions) ``lengths``: ids, features, 7-d boxes and the kind's optional keys."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t, n in lengths:
        row = {
            "input_ids": torch.randint(0, 1000, (t,), generator=gen),
            "img_feat": torch.randn(n, dim, generator=gen),
            "img_pos_feat": torch.rand(n, 7, generator=gen),
        }
        if kind in ("txt_types", "both_types"):
            row["txt_type_ids"] = torch.randint(0, 4, (t,), generator=gen)
        if kind in ("img_types", "both_types"):
            row["img_type_ids"] = torch.randint(1, 3, (n,), generator=gen)
        if kind == "mlm":
            row["txt_labels"] = torch.where(torch.rand(t, generator=gen) < 0.3, row["input_ids"], -1)
        if kind in ("mrfr", "mrckl"):
            row["img_mask"] = torch.rand(n, generator=gen) < 0.3
        if kind == "mrckl":
            row["soft_labels"] = torch.rand(n, 11, generator=gen)
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", KINDS)
def test_random_rows_equal_reference(kind: str) -> None:
    for seed, lengths in enumerate(SIZES):
        rows = random_rows(lengths, kind, seed)
        task = kind if kind in ("mlm", "mrfr", "mrckl") else "vqa"
        fast, ref = collate_rows(rows, task), reference_rows(rows, task)
        assert_same(fast, ref, f"{kind}{lengths}")
        assert fast["packed"]["img_feat"].data_ptr() != fast["img_feat"].data_ptr()  # one copy per layout
        if kind in ("mrfr", "mrckl"):  # masked regions zeroed in both layouts, their features kept as targets
            assert fast["feat_targets"].numel() and not fast["img_feat"][fast["img_masks"]].any()
            assert not fast["packed"]["img_feat"][fast["packed"]["img_masks"]].any()
        assert ("label_targets" in fast) == (kind == "mrckl")


def test_rows_are_not_modified() -> None:
    """Masked regions are zeroed in the batch, not in the rows (ITM and VCR rows share cached image tensors)."""
    rows = random_rows([(3, 5), (4, 6)], "mrfr", 0)
    before = [r["img_feat"].clone() for r in rows]
    collate_rows(rows, "mrfr")
    assert all(torch.equal(r["img_feat"], b) for r, b in zip(rows, before))


def test_fp16_rows_keep_their_dtype() -> None:
    rows = random_rows([(3, 5), (4, 2)], "plain", 1)
    half = [{**r, "img_feat": r["img_feat"].half()} for r in rows]
    assert_same(collate_rows(half, "vqa"), reference_rows(half, "vqa"))


def test_rows_without_regions() -> None:
    """Every row without regions: the padded keys as ``joint_batch`` (which ``pack_batch`` cannot pack), an empty
    packed image part."""
    rows = random_rows([(3, 0), (5, 0)], "both_types", 2)
    fast = collate_rows(rows, "vqa")
    assert_same({k: v for k, v in fast.items() if k not in ("packed", "task")}, joint_batch(rows))
    packed = fast["packed"]
    assert packed["img_feat"].shape == (0, 64) and packed["img_index"].numel() == packed["img_type_ids"].numel() == 0
    assert packed["txt_index"].tolist() == list(range(8)) and packed["cu_seqlens"].tolist() == [0, 3, 8]


def test_bad_rows() -> None:
    rows = random_rows([(3, 2), (4, 1)], "txt_types", 3)
    with pytest.raises(ValueError, match="empty list of rows"):
        collate_rows([], "vqa")
    with pytest.raises(ValueError, match="row 0 has 'txt_type_ids' but row 1 has none"):
        collate_rows([rows[0], {k: v for k, v in rows[1].items() if k != "txt_type_ids"}], "vqa")
    with pytest.raises(ValueError, match="img_feat must be one of .* got torch.float64 in row 0"):
        collate_rows([{**r, "img_feat": r["img_feat"].double()} for r in rows], "vqa")


# ---------------------------------------------------------------------------------------------- bundled task sets
def fast_and_reference(dataset: TaskDataset, build: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """``build()`` through the fast collate, then again with the dataset's module collating by the reference."""
    fast = build()
    with monkeypatch.context() as patch:
        patch.setattr(sys.modules[type(dataset).__module__], "collate_rows", reference_rows)
        return fast, build()


def first_batches(dataset: TaskDataset, count: int, budget: Optional[int] = None) -> list[list[int]]:
    """The first ``count`` token-bucket batches of epoch 0 (``budget`` tokens; default: 8 x the longest example)."""
    budget = budget or 8 * int(dataset.lens.max())
    return TokenBucketSampler(dataset.lens, batch_size=budget, droplast=False).batches(0)[:count]


@pytest.mark.parametrize("name", sorted(TASKS))
def test_bundled_task_batches_equal_reference(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every dataset of the task (training and evaluation, ITM's pair scoring too): whole batches of the dataset's
    ``collate`` (targets, ids, ... included) equal those built with the reference collate."""
    builds = []
    for dataset in task_datasets(name)[1].values():
        if isinstance(dataset, ItmEvalDataset):  # scored by pairs_batch (the exact and re-ranking stages)
            builds.append((dataset, partial(dataset.pairs_batch, *ITM_PAIRS)))
        else:
            builds += [(dataset, partial(dataset.collate, [dataset[i] for i in b])) for b in first_batches(dataset, 2)]
    assert len(builds) >= 3
    for dataset, build in builds:
        fast, ref = fast_and_reference(dataset, build, monkeypatch)
        assert_same(fast, ref, f"{name} {type(dataset).__name__}")
        assert {"packed", "input_ids", "attn_masks", "task"} <= set(fast)
