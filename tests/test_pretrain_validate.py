"""Validation metrics: hand-computed sums, and a full pass over hand-made batches."""

from __future__ import annotations

import math

import pytest
import torch

from tests.pretrain_batches import task_batch
from uniter_fast.config import UniterConfig
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.pretraining.validate import batch_sums, metrics_from_sums, validate


def test_mlm_and_itm_sums_by_hand() -> None:
    scores = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    sums = batch_sums("mlm", {"scores": scores, "labels": torch.tensor([0, 1])})
    lse0 = math.log(math.exp(2) + 2)
    lse1 = math.log(1 + math.e + math.exp(3))
    assert sums["loss"] == pytest.approx((lse0 - 2) + (lse1 - 1), rel=1e-6)
    assert (sums["correct"], sums["count"]) == (1.0, 2.0)
    itm = batch_sums(
        "itm",
        {
            "scores": torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]),
            "targets": torch.tensor([1, 1, 0]),
            "ot_dist": torch.tensor([0.2, 0.4, 0.9]),
        },
    )
    assert (itm["correct"], itm["ot_pos"], itm["n_pos"], itm["ot_neg"], itm["n_neg"]) == pytest.approx(
        (1.0, 0.6, 2.0, 0.9, 1.0)
    )
    metrics = metrics_from_sums("itm", itm)
    assert metrics["acc"] == pytest.approx(1 / 3) and metrics["ot_pos"] == pytest.approx(0.3)


def test_mrc_accuracy_uses_soft_label_argmax() -> None:
    soft = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    scores = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    kl = batch_sums("mrckl", {"scores": scores, "soft_labels": soft})
    logp = torch.log_softmax(scores, -1)
    expected = (soft * (soft.log() - logp)).sum() / 3
    assert kl["loss"] == pytest.approx(float(expected), rel=1e-5)
    assert (kl["correct"], kl["count"]) == (1.0, 2.0)
    hard = batch_sums("mrc", {"scores": scores, "soft_labels": soft})
    assert hard["loss"] == pytest.approx(float(-logp[0, 1] - logp[1, 2]), rel=1e-5)  # background never the target


def test_mrfr_sum_and_empty_metrics() -> None:
    pred, targets = torch.randn(3, 5), torch.randn(3, 5)
    sums = batch_sums("mrfr", {"prediction": pred, "targets": targets})
    assert sums["loss"] == pytest.approx(float(((pred - targets) ** 2).sum()), rel=1e-5)
    assert math.isnan(metrics_from_sums("mlm", {"loss": 0.0, "correct": 0.0, "count": 0.0})["acc"])


def test_validate_over_batches_restores_training_mode() -> None:
    model = UniterForPretraining(UniterConfig.tiny()).train()
    v = model.config.vocab_size
    loaders = {
        name: [task_batch(name.split("_")[0], [5, 7], [4, 6], v, seed=s) for s in range(2)]
        for name in ("mlm_a", "mrfr_a", "mrckl_a", "itm_a")
    }
    results = validate(model, loaders)
    assert model.training
    assert set(results) == set(loaders)
    assert 0.0 <= results["mlm_a"]["acc"] <= 1.0 and results["mlm_a"]["loss"] > 0
    assert set(results["itm_a"]) == {"loss", "acc", "ot_pos", "ot_neg"}
    assert all(math.isfinite(x) for m in results.values() for x in m.values())
    model.eval()
    torch.set_grad_enabled(False)
    out = model(loaders["mlm_a"][0], "mlm_a", compute_loss=False)
    scores, labels = out["scores"], out["labels"]
    out1 = model(loaders["mlm_a"][1], "mlm_a", compute_loss=False)
    total = torch.nn.functional.cross_entropy(torch.cat([scores, out1["scores"]]), torch.cat([labels, out1["labels"]]))
    torch.set_grad_enabled(True)
    assert results["mlm_a"]["loss"] == pytest.approx(float(total), rel=1e-5)
