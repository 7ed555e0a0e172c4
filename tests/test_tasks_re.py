"""Referring expressions: original keys (mlp 1 and 2), region scores and both losses against hand-written formulas
(the region readout written as the original's per-example loop), the negative sampling, original checkpoints, fast
vs reference, IoU / accuracy on hand-computed boxes, the COCO-refer db and builder, and learning on the bundled set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tasks_helpers import (
    compare_fast_reference,
    encoder_keys,
    encoder_rows,
    learn_subset,
    original_checkpoint,
    perturb,
    random_batch,
    tiny_config,
)
from tests.test_tasks_vqa import _npz_dir, _vocab
from uniter_fast.build import main as build_main
from uniter_fast.data.re_db import ReTxtTokLmdb
from uniter_fast.errors import DataError
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.re import ReDataset, UniterForReferringExpressionComprehension, add_regions, compute_iou

SETTINGS = type("S", (), dict(max_txt_len=60, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36))()
LENGTHS = [(6, 4), (9, 7), (3, 10), (5, 2)]


def model(mlp: int = 1, loss: str = "cls", fast: bool = False, hard_ratio: float = 0.3, seed: int = 0):
    torch.manual_seed(seed)
    return perturb(UniterForReferringExpressionComprehension(tiny_config(), loss, 0.2, hard_ratio, mlp, fast=fast))


def re_batch(seed: int = 0) -> dict:
    batch = random_batch(LENGTHS, seed)
    add_regions(batch)
    batch["targets"] = torch.tensor([3, 0, 9, 1])
    return batch


def hand_scores(net, batch) -> torch.Tensor:
    """The original's ``_get_image_hidden`` loop, then re_output and the -1e4 mask, in float64."""
    seq = encoder_rows(net, batch)
    rows = []
    max_bb = int(batch["num_bbs"].max())
    for i, (t, n) in enumerate(LENGTHS):
        hidden = seq[i, t : t + n]
        rows.append(torch.cat([hidden, hidden.new_zeros(max_bb - n, hidden.size(1))]))
    head = net.re_output.double()
    scores = head(torch.stack(rows)).squeeze(2)
    return scores.masked_fill(batch["obj_masks"], -1e4)


@pytest.mark.parametrize("mlp", [1, 2])
def test_keys(mlp: int) -> None:
    head = (
        ["re_output.weight", "re_output.bias"]
        if mlp == 1
        else [
            "re_output.0.weight",
            "re_output.0.bias",
            "re_output.2.weight",
            "re_output.2.bias",
            "re_output.3.weight",
            "re_output.3.bias",
        ]
    )
    assert list(model(mlp).state_dict()) == encoder_keys(tiny_config()) + head


@pytest.mark.parametrize("mlp", [1, 2])
def test_scores_and_cls_loss_match_the_formulas(mlp: int) -> None:
    net = model(mlp).double()
    batch = re_batch()
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    scores = hand_scores(net, batch)
    torch.testing.assert_close(net(batch, compute_loss=False)["scores"], scores, rtol=1e-9, atol=1e-9)
    expected = -torch.log_softmax(scores, 1)[torch.arange(4), batch["targets"]].sum()  # train_re.py: loss.sum()
    torch.testing.assert_close(net(batch)["loss"].double(), expected, rtol=1e-6, atol=1e-9)


def test_rank_loss_with_hard_negatives_matches_the_formula() -> None:
    net = model(loss="rank", hard_ratio=1.0).double()
    batch = re_batch()
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    scores = hand_scores(net, batch)
    targets = batch["targets"]
    others = scores.clone()
    others[torch.arange(4), targets] = -float("inf")
    negative = others.argmax(1)  # the original's first non-target of argsort(descending)
    pos, neg = torch.sigmoid(scores[torch.arange(4), targets]), torch.sigmoid(scores[torch.arange(4), negative])
    expected = torch.clamp(0.2 + neg - pos, min=0).sum()
    torch.testing.assert_close(net(batch)["loss"].double(), expected, rtol=1e-6, atol=1e-9)


def test_easy_negatives_are_uniform_over_the_other_regions() -> None:
    net = model(loss="rank", hard_ratio=0.0)
    num_bbs, targets = torch.tensor([4, 2, 7] * 4000), torch.tensor([3, 0, 2] * 4000)
    negatives = net.sample_negatives(torch.randn(12000, 7), targets, num_bbs)
    assert not bool((negatives == targets).any()) and bool((negatives < num_bbs).all())
    for row, (n, t) in enumerate(((4, 3), (2, 0), (7, 2))):
        counts = np.bincount(negatives[row::3].numpy(), minlength=7)
        expected = np.array([4000 / (n - 1) if k < n and k != t else 0 for k in range(7)])
        assert np.allclose(counts, expected, atol=200), (counts, expected)
    with pytest.raises(ValueError, match="needs >= 2 regions"):
        net.sample_negatives(torch.randn(1, 3), torch.tensor([0]), torch.tensor([1]))


@pytest.mark.parametrize("loss", ["cls", "rank"])
def test_fast_path_matches_reference(loss: str) -> None:
    compare_fast_reference(lambda fast: model(2, loss, fast=fast, hard_ratio=1.0), re_batch())


def test_original_checkpoints_load_strictly_and_fix_mlp(tmp_path) -> None:
    h = tiny_config().hidden_size
    for mlp, shapes in {
        1: {"re_output.weight": (1, h), "re_output.bias": (1,)},
        2: {
            "re_output.0.weight": (h, h),
            "re_output.0.bias": (h,),
            "re_output.2.weight": (h,),
            "re_output.2.bias": (h,),
            "re_output.3.weight": (1, h),
            "re_output.3.bias": (1,),
        },
    }.items():
        state = original_checkpoint(tiny_config(), shapes)
        torch.save(state, tmp_path / f"model_epoch_best_{mlp}.pt")
        net, options = load_task_model(get_task("re"), str(tmp_path / f"model_epoch_best_{mlp}.pt"), {"mlp": 3 - mlp})
        assert options["mlp"] == mlp
        for key, value in state.items():
            torch.testing.assert_close(net.state_dict()[key], value.float(), msg=key)


def test_iou_accuracy_and_results_on_hand_computed_boxes(tmp_path) -> None:
    a, b = np.array([0.0, 0.0, 10.0, 10.0]), np.array([5.0, 5.0, 10.0, 10.0])
    assert compute_iou(a, b) == pytest.approx(25 / 175)  # inclusive pixels: (9 - 5 + 1)^2 = 25
    assert compute_iou(a, a) == pytest.approx(1.0) and compute_iou(a, np.array([20.0, 20, 5, 5])) == 0
    assert compute_iou(a, np.array([0.0, 0.0, 10.0, 6.0])) == pytest.approx(60 / 100)
    task = get_task("re")
    scores = torch.tensor([[0.0, 2.0, -1e4], [1.0, 0.0, 0.5], [0.0, 0.0, 3.0]])
    boxes = [np.array([a, [0.0, 0.0, 10.0, 6.0], a]), np.array([b, a, a]), np.array([a, a, [30.0, 30, 4, 4]])]
    batch = {"obj_boxes": boxes, "tgt_box": [a, a, a], "sent_ids": ["7", "8", "x9"]}
    sums, preds = task.eval_batch(lambda b_, t, compute_loss: {"scores": scores}, batch, {})
    assert task.metrics(sums, preds)["acc"] == pytest.approx(1 / 3)  # IoU 0.6 > 0.5; 1/7 and 0 are not
    (path,) = task.write_predictions(preds, str(tmp_path), "results")
    out = json.load(open(path))
    assert out["acc"] == pytest.approx(1 / 3) and out["predictions"][0] == {
        "sent_id": 7,
        "pred_box": [0.0, 0.0, 10.0, 6.0],
        "tgt_box": [0.0, 0.0, 10.0, 10.0],
    }


def _refer_files(directory, images: dict[int, int]) -> None:
    directory.mkdir()
    anns, imgs, refs = [], [], []
    for image_id, n in images.items():
        ids = [image_id * 10 + k for k in range(n)]
        imgs.append({"id": image_id, "file_name": f"im{image_id}.jpg", "ann_ids": ids, "height": 100, "width": 200})
        anns += [
            {"id": i, "area": 10.0, "bbox": [10.0 * k, 5.0, 20.0, 30.0], "image_id": image_id, "category_id": 1}
            for k, i in enumerate(ids)
        ]
        refs.append(
            {
                "ref_id": image_id,
                "sent_ids": [image_id * 100, image_id * 100 + 1],
                "ann_id": ids[1],
                "image_id": image_id,
                "split": "val",
                "sentences": [
                    {"sent_id": image_id * 100, "sent": "the cup"},
                    {"sent_id": image_id * 100 + 1, "sent": "cup"},
                ],
            }
        )
    files = {
        "refs": refs,
        "annotations": anns,
        "categories": [{"id": 1, "name": "cup", "supercategory": "x"}],
        "images": imgs,
    }
    for name, rows in files.items():
        (directory / f"{name}.json").write_text(json.dumps(rows))


def test_builder_db_and_dataset(tmp_path) -> None:
    _refer_files(tmp_path / "refcoco", {1: 12, 2: 12})
    _npz_dir(tmp_path / "det", ["im1", "im2"])
    _npz_dir(tmp_path / "gt", ["im1", "im2"], seed=1)  # 12 rows each = the 12 ann_ids
    args = [
        "--task",
        "re",
        "--annotations",
        str(tmp_path / "refcoco"),
        "--features",
        str(tmp_path / "det"),
        "--gt_features",
        str(tmp_path / "gt"),
        "--vocab",
        _vocab(tmp_path / "vocab.txt"),
    ]
    build_main([*args, "--out", str(tmp_path / "db")])
    txt = ReTxtTokLmdb(str(tmp_path / "db" / "txt"))
    assert txt.sent_ids() == ["100", "101", "200", "201"]
    assert txt["201"]["bbox"] == [10.0, 5.0, 20.0, 30.0] and txt.target_index(txt["201"]) == 1
    dbs = DbCache(SETTINGS)
    train = ReDataset(txt, dbs.img(str(tmp_path / "db" / "img_gt"), gt=True), gt=True)
    batch = train.collate([train[0], train[3]])
    assert batch["targets"].tolist() == [1, 1] and batch["obj_masks"].shape == (2, 12)
    evaluation = ReDataset(txt, dbs.img(str(tmp_path / "db" / "img")), gt=False, eval=True)
    item = evaluation[0]
    pos = item["img_pos_feat"].double()
    assert np.allclose(item["obj_boxes"][:, 0], pos[:, 0].numpy() * 200)  # x in pixels
    assert np.allclose(item["obj_boxes"][:, 3], pos[:, 5].numpy() * 100)  # h in pixels
    _npz_dir(tmp_path / "gt2", ["im1"], seed=1)  # im2's GT features get 3 rows for its 12 ann_ids
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "gt2" / "im2.npz",
        features=rng.random((3, 2048)),
        norm_bb=rng.random((3, 6)) * 0.5,
        conf=rng.random(3),
        soft_labels=np.full((3, 1601), 1 / 1601),
    )
    args[args.index(str(tmp_path / "gt"))] = str(tmp_path / "gt2")
    with pytest.raises(DataError, match=r"image 2 has 12 ann_ids but 3 GT-box features"):
        build_main([*args, "--out", str(tmp_path / "db2")])


def test_learns_a_subset_of_the_bundled_set() -> None:
    """200 steps fit 48 bundled expressions: the referent ranks first for >= 80 % of them (chance ~1/4)."""
    dbs = DbCache(SETTINGS)
    txt = dbs.txt(ReTxtTokLmdb, resolve_bundled("bundled:re/txt_train"), True)
    dataset = ReDataset(txt, dbs.img(resolve_bundled("bundled:pool/img_gt"), gt=True), gt=True)
    torch.manual_seed(0)
    net = UniterForReferringExpressionComprehension(tiny_config())
    losses = learn_subset(net, dataset, examples=48, steps=200)
    batch = dataset.collate([dataset[i] for i in range(48)])
    with torch.no_grad():
        accuracy = float((net(batch, compute_loss=False)["scores"].argmax(1) == batch["targets"]).float().mean())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy >= 0.8, accuracy
