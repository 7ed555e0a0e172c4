"""Collates: the padded layout matches the original loops, the packed layout holds the same tokens, MRM targets are
taken before zeroing, ITM OT inputs, and the datasets' deterministic draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from uniter_fast.data import (
    DetectFeatLmdb,
    ItmDataset,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    TxtTokLmdb,
    build_corpus,
    itm_collate,
    mlm_collate,
    mrm_collate,
)
from uniter_fast.data.packed import unpack_tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    paths = build_corpus(str(tmp_path_factory.mktemp("c") / "corpus"), seed=5, n_train_images=40, n_val_images=6)
    return TxtTokLmdb(paths.txt_db), DetectFeatLmdb(paths.img_db)


def _items(rng: np.random.Generator, n: int, task: str) -> list[dict]:
    items = []
    for _ in range(n):
        t, nb = int(rng.integers(3, 20)), int(rng.integers(1, 12))
        item = {
            "input_ids": torch.from_numpy(rng.integers(5, 90, size=t)),
            "img_feat": torch.rand(nb, 2048) + 0.1,
            "img_pos_feat": torch.rand(nb, 7),
        }
        if task == "mlm":
            lab = np.where(rng.random(t) < 0.3, rng.integers(5, 90, size=t), -1)
            lab[[0, -1]] = -1
            lab[1] = 7
            item["txt_labels"] = torch.from_numpy(lab)
        if task == "mrm":
            m = rng.random(nb) < 0.3
            m[0] = True
            item["img_mask"] = torch.from_numpy(m)
            item["soft_labels"] = torch.softmax(torch.randn(nb, 1601), -1)
        if task == "itm":
            item["target"] = int(rng.integers(2))
        items.append(item)
    return items


def _original_gather_index(txt_lens, num_bbs, max_len, out_size):
    gi = torch.arange(0, out_size, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, (tl, nbb) in enumerate(zip(txt_lens, num_bbs)):
        gi.data[i, tl : tl + nbb] = torch.arange(max_len, max_len + nbb, dtype=torch.long).data
    return gi


def _original_ot_scatter(txt_lens, max_txt_len, joint_len):
    sc = torch.arange(0, joint_len, dtype=torch.long).unsqueeze(0).repeat(len(txt_lens), 1)
    for i, tl in enumerate(txt_lens):
        sc.data[i, tl:] = torch.arange(max_txt_len, max_txt_len + (joint_len - tl), dtype=torch.long).data
    return sc


def _joint_padded(batch: dict, table: torch.Tensor) -> torch.Tensor:
    """What the model's embed step builds: gather of [text ; regions] by gather_index, [B, L, D]."""
    txt = table[batch["input_ids"]] + batch["position_ids"][..., None].float()
    both = torch.cat([txt, batch["img_feat"] + batch["img_pos_feat"].sum(-1, keepdim=True)], 1)
    return torch.gather(both, 1, batch["gather_index"][..., None].expand(-1, -1, both.size(-1)))


def _joint_packed(packed: dict, table: torch.Tensor) -> torch.Tensor:
    total = int(packed["cu_seqlens"][-1])
    out = torch.full((total, table.size(1)), float("nan"))
    out[packed["txt_index"]] = table[packed["txt_ids"]] + packed["txt_position_ids"][:, None].float()
    out[packed["img_index"]] = packed["img_feat"] + packed["img_pos_feat"].sum(-1, keepdim=True)
    return out


def check_layouts(batch: dict) -> None:
    """Padded batch (interface 1) and its packed form (interface 2) describe the same tokens."""
    t, n = batch["txt_lens"], batch["num_bbs"]
    lt, nb = batch["input_ids"].shape[1], batch["img_feat"].shape[1]
    assert batch["attn_masks"].dtype == torch.int64 and batch["attn_masks"].shape[1] == int((t + n).max())
    assert batch["attn_masks"].sum(1).tolist() == (t + n).tolist()
    expect = _original_gather_index(t.tolist(), n.tolist(), lt, batch["attn_masks"].shape[1])
    assert torch.equal(batch["gather_index"], expect)
    packed = batch["packed"]
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"][-1] == int((t + n).sum())
    assert packed["max_seqlen"] == int((t + n).max())
    table = torch.randn(int(batch["input_ids"].max()) + 1, 2048)
    joint, flat = _joint_padded(batch, table), _joint_packed(packed, table)
    assert not flat.isnan().any()
    for i, seq in enumerate(unpack_tokens(packed, flat)):
        assert torch.equal(seq, joint[i, : int(t[i] + n[i])])
    assert torch.equal(
        packed["txt_ids"][torch.searchsorted(packed["txt_index"], packed["cls_index"])], batch["input_ids"][:, 0]
    )
    if "txt_labels" in batch:
        labels = batch["txt_labels"]
        assert torch.equal(packed["mlm_labels"], labels[labels != -1])
        pos_in_joint = labels.ne(-1).nonzero()
        expect_idx = packed["cu_seqlens"].long()[pos_in_joint[:, 0]] + pos_in_joint[:, 1]
        assert torch.equal(packed["mlm_index"], expect_idx)
    if "img_masks" in batch:
        tgt = batch["img_mask_tgt"].nonzero()
        assert torch.equal(packed["mrm_index"], packed["cu_seqlens"].long()[tgt[:, 0]] + tgt[:, 1])
        assert torch.equal(packed["img_masks"], batch["img_masks"][torch.arange(nb)[None] < n[:, None]])
        assert batch["feat_targets"].shape[0] == int(batch["img_masks"].sum()) == packed["mrm_index"].numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mlm_layouts(seed):
    rng = np.random.default_rng(seed)
    batch = mlm_collate(_items(rng, int(rng.integers(1, 9)), "mlm"))
    assert batch["task"] == "mlm" and batch["txt_labels"].shape == batch["input_ids"].shape
    check_layouts(batch)


@pytest.mark.parametrize("task", ["mrfr", "mrc", "mrckl"])
def test_mrm_targets_before_zeroing(task):
    rng = np.random.default_rng(3)
    items = _items(rng, 6, "mrm")
    batch = mrm_collate(items, task)
    assert batch["task"] == task
    check_layouts(batch)
    feats = torch.cat([it["img_feat"][it["img_mask"]] for it in items])
    soft = torch.cat([it["soft_labels"][it["img_mask"]] for it in items])
    assert torch.equal(batch["feat_targets"], feats) and torch.equal(batch["label_targets"], soft)
    assert (batch["img_feat"][batch["img_masks"]] == 0).all()
    assert (
        batch["img_feat"][~batch["img_masks"] & (torch.arange(batch["img_feat"].shape[1]) < batch["num_bbs"][:, None])]
        > 0
    ).all()
    for i, it in enumerate(items):
        t = it["input_ids"].numel()
        assert not batch["img_mask_tgt"][i, :t].any()
        assert torch.equal(batch["img_mask_tgt"][i, t : t + it["img_mask"].numel()], it["img_mask"])
    with pytest.raises(ValueError, match="task"):
        mrm_collate(items, "mlm")


def test_itm_ot_inputs():
    rng = np.random.default_rng(4)
    items = _items(rng, 7, "itm")
    batch = itm_collate(items)
    check_layouts(batch)
    t, n = batch["txt_lens"], batch["num_bbs"]
    ot = batch["ot_inputs"]
    expect = _original_ot_scatter(t.tolist(), batch["input_ids"].shape[1], batch["attn_masks"].shape[1])
    assert torch.equal(ot["ot_scatter"], expect) and ot["scatter_max"] == int(expect.max())
    assert ot["txt_pad"].dtype == torch.bool and ot["txt_pad"].sum(1).tolist() == (t.max() - t).tolist()
    assert ot["img_pad"].sum(1).tolist() == (n.max() - n).tolist()
    assert batch["targets"].tolist() == [it["target"] for it in items]
    with pytest.raises(ValueError, match="empty"):
        itm_collate([])


@pytest.mark.parametrize("cls", [MlmDataset, MrfrDataset, MrcDataset, ItmDataset])
def test_datasets_on_real_db(corpus, cls):
    txt, img = corpus
    ds = cls(txt, img, seed=3)
    idx = list(range(0, len(ds), 3))
    batch = ds.collate([ds[i] for i in idx])
    check_layouts(batch)
    assert batch["txt_lens"].tolist() == [txt.id2len[ds.ids[i]] + 2 for i in idx]
    assert (batch["input_ids"][:, 0] == txt.cls_).all()
    assert (batch["input_ids"].gather(1, batch["txt_lens"][:, None] - 1) == txt.sep).all()
    again = ds.collate([ds[i] for i in idx])
    assert torch.equal(again["input_ids"], batch["input_ids"])  # same epoch -> same draws
    ds.set_epoch(1)
    other = ds.collate([ds[i] for i in idx])
    if cls is MlmDataset:
        assert not torch.equal(other["txt_labels"], batch["txt_labels"])
    if cls in (MrfrDataset, MrcDataset):
        assert not torch.equal(other["img_masks"], batch["img_masks"])


def test_itm_negatives(corpus):
    txt, img = corpus
    ds = ItmDataset(txt, img, neg_prob=0.5, seed=1)
    rates, prev = [], None
    for epoch in range(4):
        ds.set_epoch(epoch)
        neg = ds.targets == 0
        rates.append(neg.mean())
        assert all(f != g for f, g, m in zip(ds.neg_fnames, ds.img_fnames, neg) if m)
        assert all(f == g for f, g, m in zip(ds.neg_fnames, ds.img_fnames, neg) if not m)
        expect = ds.txt_lens + np.array([img.name2nbb[f] for f in ds.neg_fnames])
        np.testing.assert_array_equal(ds.lens, expect)
        if prev is not None:
            assert not np.array_equal(prev, ds.targets)
        prev = ds.targets.copy()
    assert 0.35 < np.mean(rates) < 0.65
    item = ds[int(np.flatnonzero(ds.targets == 0)[0])]
    assert item["target"] == 0
    shard = ItmDataset(txt, img, seed=1, rank=1, world=2)
    assert set(shard.neg_fnames) <= set(shard.pool) | set(shard.img_fnames)
    assert set(shard.pool) == set(shard.img_fnames[1::2])
