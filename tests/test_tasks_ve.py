"""Visual entailment: the VQA head with 3 classes (keys, one-hot BCE x 3), original checkpoints, the labels and
results format, the builder, and learning on the bundled set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.tasks_helpers import (
    compare_fast_reference,
    encoder_keys,
    learn_subset,
    original_checkpoint,
    perturb,
    random_batch,
    tiny_config,
)
from tests.test_tasks_vqa import HEAD_KEYS, _npz_dir, _vocab, bundled_dataset
from uniter_fast.build import main as build_main
from uniter_fast.data import TxtTokLmdb
from uniter_fast.errors import DataError
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.ve import UniterForVisualEntailment


def test_ve_is_the_vqa_model_with_three_answers() -> None:
    net = UniterForVisualEntailment(tiny_config())
    assert list(net.state_dict()) == encoder_keys(tiny_config()) + HEAD_KEYS
    assert net.vqa_output[3].out_features == 3


def test_one_hot_bce_times_three() -> None:
    torch.manual_seed(0)
    net = perturb(UniterForVisualEntailment(tiny_config())).double()
    batch = random_batch([(5, 6), (8, 3)])
    batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    batch["targets"] = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    s = net(batch, compute_loss=False)["scores"]
    t = batch["targets"]
    expected = -(t * torch.log(torch.sigmoid(s)) + (1 - t) * torch.log(1 - torch.sigmoid(s))).sum() / 2
    torch.testing.assert_close(net(batch)["loss"].double(), expected, rtol=1e-6, atol=1e-9)


def test_fast_path_matches_reference() -> None:
    batch = random_batch([(6, 4), (9, 7), (3, 10)])
    batch["targets"] = torch.eye(3)[[1, 0, 2]]
    compare_fast_reference(lambda fast: perturb(UniterForVisualEntailment(tiny_config(), fast=fast)), batch)


def test_original_checkpoint_loads_and_a_wrong_head_is_refused(tmp_path) -> None:
    h = tiny_config().hidden_size
    shapes = {
        "vqa_output.0.weight": (2 * h, h),
        "vqa_output.0.bias": (2 * h,),
        "vqa_output.2.weight": (2 * h,),
        "vqa_output.2.bias": (2 * h,),
        "vqa_output.3.weight": (3, 2 * h),
        "vqa_output.3.bias": (3,),
    }
    state = original_checkpoint(tiny_config(), shapes)
    torch.save(state, tmp_path / "ve.pt")
    net, _ = load_task_model(get_task("ve"), str(tmp_path / "ve.pt"), {})
    torch.testing.assert_close(net.state_dict()["vqa_output.3.weight"], state["vqa_output.3.weight"].float())
    shapes.update({"vqa_output.3.weight": (5, 2 * h), "vqa_output.3.bias": (5,)})
    torch.save(original_checkpoint(tiny_config(), shapes), tmp_path / "vqa5.pt")
    with pytest.raises(ValueError, match="a VE model has 3 answers, the checkpoint has 5"):
        load_task_model(get_task("ve"), str(tmp_path / "vqa5.pt"), {})


def test_labels_metric_and_results(tmp_path) -> None:
    task = get_task("ve")
    options = task.data_options(None, [], {})
    scores = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 1.0], [3.0, 0.0, 0.0]])
    batch = {"targets": torch.eye(3)[[1, 0, 0]], "qids": ["a#0", "b#1", "c#2"]}
    sums, preds = task.eval_batch(lambda b, t, compute_loss: {"scores": scores}, batch, options)
    assert task.metrics(sums, preds)["acc"] == pytest.approx(2 / 3)
    (path,) = task.write_predictions(preds, str(tmp_path), "val_results")
    assert json.load(open(path)) == {"a#0": "entailment", "b#1": "neutral", "c#2": "contradiction"}


def test_builder_writes_one_hot_targets_and_rejects_bad_labels(tmp_path) -> None:
    _npz_dir(tmp_path / "feats", ["im0"])
    ann = tmp_path / "ve.jsonl"
    ann.write_text(json.dumps({"id": "p0", "image": "im0", "hypothesis": "the cup is red !", "label": "neutral"}))
    args = [
        "--task",
        "ve",
        "--annotations",
        str(ann),
        "--features",
        str(tmp_path / "feats"),
        "--vocab",
        _vocab(tmp_path / "vocab.txt"),
    ]
    build_main([*args, "--out", str(tmp_path / "db")])
    record = TxtTokLmdb(str(tmp_path / "db" / "txt"))["p0"]
    assert record["target"] == {"labels": [2], "scores": [1.0]}
    ann.write_text(json.dumps({"id": "p0", "image": "im0", "hypothesis": "the cup", "label": "maybe"}))
    with pytest.raises(DataError, match=r"ve.jsonl line 1: field 'label' must be one of"):
        build_main([*args, "--out", str(tmp_path / "db2")])


def test_learns_a_subset_of_the_bundled_set() -> None:
    """200 steps fit 48 bundled hypotheses: accuracy >= 0.8 on them (chance 1/3)."""
    dataset = bundled_dataset("ve")
    torch.manual_seed(0)
    net = UniterForVisualEntailment(tiny_config())
    losses = learn_subset(net, dataset, examples=48, steps=200)
    batch = dataset.collate([dataset[i] for i in range(48)])
    with torch.no_grad():
        predicted = net(batch, compute_loss=False)["scores"].argmax(1)
    accuracy = float((predicted == batch["targets"].argmax(1)).float().mean())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy >= 0.8, accuracy
