"""Collates: the reference collates match the original loops and pack the same tokens they pad; the fast collates
equal the reference ones tensor for tensor (torch.equal) in both layouts; records are read in place and only with
the fields a task uses; the host-side value checks; the datasets' deterministic per-batch draws."""

from __future__ import annotations

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch
from batch_compare import assert_same

from uniter_fast.data import (
    DataError,
    DetectFeatLmdb,
    ItmDataset,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    TxtTokLmdb,
    build_corpus,
)
from uniter_fast.data.assemble import empty
from uniter_fast.data.collate import collate
from uniter_fast.data.record_views import array_views
from uniter_fast.data.reference import itm_collate, mlm_collate, mrm_collate
from uniter_fast.layout import unpack_tokens

TASK_DATASETS = {
    "mlm": (MlmDataset, {}),
    "mrfr": (MrfrDataset, {}),
    "mrckl": (MrcDataset, {}),
    "mrc": (MrcDataset, {"task": "mrc"}),
    "itm": (ItmDataset, {}),
}
PADDED_KEYS = {"input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index"}
PADDED_TASK_KEYS = {"txt_labels", "img_masks", "img_mask_tgt"}
OT_PADDED_KEYS = {"ot_scatter", "scatter_max"}


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
    """Padded batch (contract 1, as the original loops build it) and its packed form (contract 2) describe the
    same tokens."""
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
    if "ot_inputs" in batch:
        emb = torch.randn(int(packed["cu_seqlens"][-1]), 3)
        txt = torch.zeros(len(t) * lt, 3).index_copy(0, packed["txt_slot"], emb[packed["txt_index"]])
        img = torch.zeros(len(t) * nb, 3).index_copy(0, packed["img_slot"], emb[packed["img_index"]])
        for i, seq in enumerate(unpack_tokens(packed, emb)):
            assert torch.equal(txt.view(len(t), lt, 3)[i, : t[i]], seq[: t[i]])
            assert torch.equal(img.view(len(t), nb, 3)[i, : n[i]], seq[t[i] :])


# --------------------------------------------------------------------------------------------------- reference path
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_mlm_layouts(seed):
    rng = np.random.default_rng(seed)
    batch = mlm_collate(_items(rng, int(rng.integers(1, 9)), "mlm"))
    assert batch["task"] == "mlm" and batch["txt_labels"].shape == batch["input_ids"].shape
    check_layouts(batch)


@pytest.mark.parametrize("task", ["mrfr", "mrc", "mrckl"])
def test_reference_mrm_targets_before_zeroing(task):
    rng = np.random.default_rng(3)
    items = _items(rng, 6, "mrm")
    batch = mrm_collate(items, task)
    assert batch["task"] == task
    check_layouts(batch)
    feats = torch.cat([it["img_feat"][it["img_mask"]] for it in items])
    soft = torch.cat([it["soft_labels"][it["img_mask"]] for it in items])
    assert torch.equal(batch["feat_targets"], feats) and torch.equal(batch["label_targets"], soft)
    assert (batch["img_feat"][batch["img_masks"]] == 0).all()
    valid = torch.arange(batch["img_feat"].shape[1]) < batch["num_bbs"][:, None]
    assert (batch["img_feat"][~batch["img_masks"] & valid] > 0).all()
    for i, it in enumerate(items):
        t = it["input_ids"].numel()
        assert not batch["img_mask_tgt"][i, :t].any()
        assert torch.equal(batch["img_mask_tgt"][i, t : t + it["img_mask"].numel()], it["img_mask"])
    with pytest.raises(ValueError, match="task"):
        mrm_collate(items, "mlm")


def test_reference_itm_ot_inputs():
    rng = np.random.default_rng(4)
    items = _items(rng, 7, "itm")
    batch = itm_collate(items)
    check_layouts(batch)
    t, n = batch["txt_lens"], batch["num_bbs"]
    ot = batch["ot_inputs"]
    assert ot["txt_pad"].dtype == torch.bool and ot["txt_pad"].sum(1).tolist() == (t.max() - t).tolist()
    assert ot["img_pad"].sum(1).tolist() == (n.max() - n).tolist()
    assert torch.equal(ot["txt_lens"], t) and torch.equal(ot["img_lens"], n)
    assert batch["targets"].tolist() == [it["target"] for it in items]
    with pytest.raises(ValueError, match="empty"):
        itm_collate([])


# --------------------------------------------------------------------------------------------------- fast == reference
def _index_lists(ds) -> list[list[int]]:
    """Batch compositions: ragged ones, one holding the longest pairs, a single pair."""
    longest = np.argsort(-ds.lens)[:8].tolist()
    return [list(range(0, len(ds), 5)), longest, [len(ds) - 1], list(range(3, 40, 3))]


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("task", list(TASK_DATASETS))
def test_fast_collate_equals_reference(corpus, task, layout):
    cls, kwargs = TASK_DATASETS[task]
    ds = cls(*corpus, seed=3, **kwargs)
    for position, indices in enumerate(_index_lists(ds)):
        ref = ds.reference_batch(indices, position)
        check_layouts(ref)
        fast = ds.batch(indices, position, layout=layout)
        assert_same(fast, ref, task, same_keys=False)
        layout_free = {"task", "txt_lens", "num_bbs", "feat_targets", "label_targets", "targets", "ot_inputs"}
        if layout == "packed":
            assert set(fast) - layout_free == {"packed"}
            assert set(fast["packed"]) == set(ref["packed"])
            if task == "itm":
                assert set(fast["ot_inputs"]) == set(ref["ot_inputs"]) - OT_PADDED_KEYS
        else:
            expected = PADDED_KEYS | (PADDED_TASK_KEYS & set(ref))
            assert set(fast) - layout_free == expected
            if task == "itm":
                assert set(fast["ot_inputs"]) == set(ref["ot_inputs"])
        if task == "mrfr":  # MRFR never reads the soft labels: no label_targets on the fast path
            assert "label_targets" not in fast
        elif task in ("mrc", "mrckl"):
            assert fast["label_targets"].shape == (fast["feat_targets"].shape[0], 1601)
        # the stored features as they are (fp16): the same values, half the bytes; everything else unchanged
        half = ds.batch(indices, position, layout=layout, feat_dtype=torch.float16)
        feat = half["packed"]["img_feat"] if layout == "packed" else half["img_feat"]
        assert feat.dtype == torch.float16
        if layout == "packed":
            half["packed"]["img_feat"] = feat.float()
        else:
            half["img_feat"] = feat.float()
        assert_same(half, ref, task, same_keys=False)


@pytest.mark.parametrize("task", ["mrfr", "itm"])
def test_fp16_features_give_the_same_training_step(corpus, task):
    """The fast model path casts the fp16 features itself: loss and gradients are bit-identical to fp32 features."""
    from uniter_fast.config import UniterConfig
    from uniter_fast.pretraining.model import UniterForPretraining

    cls, kwargs = TASK_DATASETS[task]
    ds = cls(*corpus, seed=3, **kwargs)
    indices = list(range(0, 30, 3))
    model = UniterForPretraining(UniterConfig.tiny(vocab_size=ds.token_ids.v_range[1]), fast=True).train()
    results = []
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)  # same dropout masks
        model.zero_grad()
        loss = model(ds.batch(indices, 0, feat_dtype=dtype), task)["loss"]
        loss.backward()
        results.append((loss.detach(), model.uniter.img_embeddings.img_linear.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_records_read_only_the_fields_the_task_uses(corpus):
    txt, img = corpus
    for task, (cls, kwargs) in TASK_DATASETS.items():
        record = cls(txt, img, **kwargs)[0]
        assert record.features.dtype == np.float16 and not record.features.flags.writeable  # in place, no copy
        assert (record.soft_labels is not None) == (task in ("mrc", "mrckl")), task
    dump = img.get_dump(record.img_fname)
    np.testing.assert_array_equal(record.features.astype(np.float32), dump["features"])


def test_record_views_equal_msgpack_decode(corpus):
    _, img = corpus
    fields = ("features", "norm_bb", "soft_labels", "conf")
    for name in img.name2nbb:
        raw = img.db.view(name)
        views = array_views(raw, fields)
        decoded = msgpack.unpackb(raw, object_hook=msgpack_numpy.decode, raw=False)
        assert set(views) == set(fields)
        for key in fields:
            assert views[key].dtype == decoded[key].dtype and np.array_equal(views[key], decoded[key])
    assert array_views(b"\x00garbage", fields) is None
    assert array_views(msgpack.packb({"features": [1, 2]}), fields) is None  # not an array: decode instead
    other = msgpack.packb({"features": np.ones((2, 3), np.float32)}, default=msgpack_numpy.encode)
    assert np.array_equal(array_views(other, ("features",))["features"], np.ones((2, 3), np.float32))


def test_wordpiece_outside_vocabulary_is_an_error(corpus, monkeypatch):
    txt, img = corpus
    ds = MlmDataset(txt, img)
    record = ds[2]
    bad = record._replace(wordpieces=np.array([5, txt.v_range[1]], dtype=np.int64))
    monkeypatch.setattr(MlmDataset, "__getitem__", lambda self, i: bad if i == 2 else record)
    with pytest.raises(DataError, match=rf"text {record.txt_id!r}: wordpiece ids must lie in \[0, {txt.v_range[1]}\)"):
        ds.batch([0, 1, 2], 0)


def test_batch_draws_are_deterministic_per_position_and_epoch(corpus):
    txt, img = corpus
    indices = list(range(0, 40, 2))
    for cls in (MlmDataset, MrfrDataset):
        ds = cls(txt, img, seed=3)
        key = "mlm_labels" if cls is MlmDataset else "img_masks"
        first = ds.batch(indices, 0)["packed"][key]
        assert torch.equal(first, cls(txt, img, seed=3).batch(indices, 0)["packed"][key])  # same draws again
        assert not torch.equal(first, ds.batch(indices, 1)["packed"][key])  # another position
        assert not torch.equal(first, ds.batch(indices, 0, rank=1)["packed"][key])  # another rank
        ds.set_epoch(1)
        assert not torch.equal(first, ds.batch(indices, 0)["packed"][key])  # another epoch


def test_worker_batches_are_built_in_shared_memory(monkeypatch):
    assert not empty((3, 4), torch.float32).is_shared()
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    tensor = empty((3, 4), torch.float16)
    assert tensor.is_shared() and tensor.shape == (3, 4) and tensor.dtype == torch.float16


def test_bad_task_and_layout(corpus):
    ds = MlmDataset(*corpus)
    with pytest.raises(ValueError, match="layout must be one of"):
        ds.batch([0], 0, layout="ragged")
    with pytest.raises(ValueError, match="feat_dtype must be one of"):
        ds.batch([0], 0, feat_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="task must be one of"):
        collate("vqa", [ds[0]], None, ds.token_ids)


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
    record = ds[int(np.flatnonzero(ds.targets == 0)[0])]
    assert record.target == 0 and record.img_fname != ds.img_fnames[int(np.flatnonzero(ds.targets == 0)[0])]
    shard = ItmDataset(txt, img, seed=1, rank=1, world=2)
    assert set(shard.neg_fnames) <= set(shard.pool) | set(shard.img_fnames)
    assert set(shard.pool) == set(shard.img_fnames[1::2])
