"""TaskLoader / MetaLoader: endless epochs, worker determinism, identical task draws on all ranks, exact resume,
and the layout each loader builds."""

from __future__ import annotations

import io
import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from uniter_fast.data import (
    DetectFeatLmdb,
    ItmDataset,
    MetaLoader,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    TaskLoader,
    TxtTokLmdb,
    build_corpus,
)

BUDGET = 640


@pytest.fixture(scope="module")
def dbs(tmp_path_factory):
    paths = build_corpus(str(tmp_path_factory.mktemp("c") / "corpus"), seed=9, n_train_images=30, n_val_images=4)
    return TxtTokLmdb(paths.txt_db), DetectFeatLmdb(paths.img_db)


def _loaders(dbs, workers: int) -> dict[str, TaskLoader]:
    txt, img = dbs
    sets = {
        "mlm_s": MlmDataset(txt, img, seed=2),
        "mrfr_s": MrfrDataset(txt, img, seed=2),
        "mrckl_s": MrcDataset(txt, img, seed=2),
        "itm_s": ItmDataset(txt, img, seed=2),
    }
    return {name: TaskLoader(ds, BUDGET, seed=2, num_workers=workers) for name, ds in sets.items()}


def _key(name: str, batch: dict) -> tuple:
    """Everything that identifies a batch: ids, masks, labels, targets and the features (packed layout)."""
    packed = batch["packed"]
    parts = [name, batch["task"], tuple(packed["txt_ids"].tolist())]
    for k in ("mlm_labels", "mlm_index", "img_masks"):
        if k in packed:
            parts.append(tuple(packed[k].tolist()))
    if "targets" in batch:
        parts.append(tuple(batch["targets"].tolist()))
    parts.append(float(packed["img_feat"].double().sum()))
    return tuple(parts)


def test_task_loader_runs_epochs_and_workers_agree(dbs):
    txt, img = dbs
    ds = MlmDataset(txt, img, seed=0)
    serial = TaskLoader(ds, BUDGET, seed=1, num_workers=0)
    per_epoch = len(serial.epoch_batches(0))
    a = [_key("x", b) for b in itertools.islice(serial, 2 * per_epoch + 2)]
    assert serial.state_dict() == {"epoch": 2, "position": 2}
    parallel = TaskLoader(MlmDataset(txt, img, seed=0), BUDGET, seed=1, num_workers=2)
    b = [_key("x", b) for b in itertools.islice(parallel, 2 * per_epoch + 2)]
    assert a == b
    assert a[:per_epoch] != a[per_epoch : 2 * per_epoch]  # new shuffle and new masks in epoch 1
    for batch in itertools.islice(TaskLoader(ds, BUDGET, seed=1, num_workers=0), 3):
        assert int(batch["txt_lens"].sub(2).add(batch["num_bbs"]).max()) * batch["txt_lens"].numel() <= BUDGET


def test_mixer_same_draws_on_all_ranks_and_ratios():
    dummy = {name: None for name in ("itm_a", "mlm_a", "mrfr_a", "mrckl_a")}
    ratios = {"itm_a": 3, "mlm_a": 4, "mrfr_a": 2, "mrckl_a": 2}
    rank0, rank1 = MetaLoader(dummy, ratios, seed=5), MetaLoader(dummy, ratios, seed=5)
    draws = [rank0.draw(s) for s in range(11000)]
    assert draws == [rank1.draw(s) for s in range(11000)]
    assert draws != [MetaLoader(dummy, ratios, seed=6).draw(s) for s in range(11000)]
    counts = Counter(draws)
    for name, r in ratios.items():
        p = r / 11
        assert abs(counts[name] - 11000 * p) < 5 * np.sqrt(11000 * p * (1 - p))
    with pytest.raises(ValueError, match="mix_ratios keys"):
        MetaLoader(dummy, {"itm_a": 1})
    with pytest.raises(ValueError, match="grad_accum_steps"):
        MetaLoader(dummy, grad_accum_steps=0)


def test_mixer_phases_change_the_ratios_at_their_first_steps():
    dummy = {name: None for name in ("itm_a", "mlm_a", "mrfr_a")}
    ratios = {"itm_a": 1, "mlm_a": 2, "mrfr_a": 1}
    phased = MetaLoader(
        dummy, ratios, seed=5, phases=[(0, {"itm_a": 1}), (50, {"mlm_a": 1, "mrfr_a": 3}), (90, ratios)]
    )
    draws = [phased.draw(s) for s in range(300)]
    assert set(draws[:50]) == {"itm_a"} and set(draws[50:90]) == {"mlm_a", "mrfr_a"}
    assert draws[90:] == [MetaLoader(dummy, ratios, seed=5).draw(s) for s in range(90, 300)]  # same draws as no phases
    for phases, match in (
        ([(1, ratios)], "start at step 0"),
        ([(0, ratios), (0, ratios)], "strictly increasing"),
        ([(0, {"vqa_a": 1})], "phase at step 0: ratios must name some of the loaders"),
        ([(0, ratios), (5, {"itm_a": 0})], "phase at step 5: ratios must be positive"),
    ):
        with pytest.raises(ValueError, match=match):
            MetaLoader(dummy, ratios, phases=phases)


def test_mixer_one_task_per_step(dbs):
    mixer = MetaLoader(_loaders(dbs, 0), {"mlm_s": 2, "mrfr_s": 1, "mrckl_s": 1, "itm_s": 2}, grad_accum_steps=3)
    out = list(itertools.islice(mixer, 30))
    for step in range(10):
        names = {n for n, _ in out[3 * step : 3 * step + 3]}
        assert names == {mixer.draw(step)}
    assert {n for n, _ in out} == {"mlm_s", "mrfr_s", "mrckl_s", "itm_s"}
    for name, batch in out:
        assert batch["task"] == name.split("_")[0]


@pytest.mark.parametrize(
    "workers,cut,phases", [(0, 7, None), (2, 25, None), (0, 7, [(0, {"itm_s": 1}), (6, {"mlm_s": 1})])]
)
def test_exact_resume(dbs, workers, cut, phases):
    """Resume mid-step (accumulation 2); with ``phases`` the cut (step 3) lies before the boundary (step 6)."""
    ratios = {"mlm_s": 2, "mrfr_s": 1, "mrckl_s": 1, "itm_s": 2}
    full = MetaLoader(_loaders(dbs, workers), ratios, grad_accum_steps=2, seed=11, phases=phases)
    it = iter(full)
    reference = [_key(*next(it)) for _ in range(cut)]
    state = full.state_dict()
    reference += [_key(*next(it)) for _ in range(30)]
    assert max(s["epoch"] for s in full.state_dict()["loaders"].values()) >= 1  # the run crosses epoch boundaries
    resumed = MetaLoader(_loaders(dbs, workers), ratios, grad_accum_steps=2, seed=0, phases=phases)
    resumed.load_state_dict(torch.load(_save(state), weights_only=True))
    got = [_key(*b) for b in itertools.islice(resumed, 30)]
    assert got == reference[cut:]


def _save(state: dict) -> io.BytesIO:
    """``state`` through torch.save, as a checkpoint would carry it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def test_task_loader_builds_the_requested_layout(dbs):
    txt, img = dbs
    ds = MrfrDataset(txt, img, seed=0)
    packed = next(iter(TaskLoader(ds, BUDGET, seed=1, num_workers=0)))
    padded = next(iter(TaskLoader(ds, BUDGET, seed=1, num_workers=0, layout="padded")))
    assert "packed" in packed and "img_feat" not in packed and "gather_index" not in packed
    assert "packed" not in padded and {"img_feat", "gather_index", "img_mask_tgt"} <= set(padded)
    assert torch.equal(packed["feat_targets"], padded["feat_targets"])  # same batch, same draws
    assert not packed["packed"]["img_feat"].is_pinned() or torch.cuda.is_available()
    with pytest.raises(ValueError, match="layout must be one of"):
        TaskLoader(ds, BUDGET, layout="both")
    with pytest.raises(TypeError, match="batch method"):
        TaskLoader(object(), BUDGET)
