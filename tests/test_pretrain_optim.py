"""No-decay parameter groups (with the original's name quirk) and the linear warm-up / decay schedule."""

from __future__ import annotations

import pytest
import torch

from uniter_fast.config import UniterConfig
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.training.optim import build_scheduler, lr_at, param_groups


def test_param_groups_follow_original_names() -> None:
    model = UniterForPretraining(UniterConfig.tiny())
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names.isdisjoint(no_decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    assert all(n.endswith("bias") or "LayerNorm.weight" in n for n in no_decay_names)
    # the quirk: LayerNorm weights whose names lack "LayerNorm" are decayed
    for quirk in (
        "uniter.img_embeddings.img_layer_norm.weight",
        "uniter.img_embeddings.pos_layer_norm.weight",
        "feat_regress.net.2.weight",
        "region_classifier.net.2.weight",
    ):
        assert quirk in decay_names
    assert "uniter.encoder.layer.0.output.LayerNorm.weight" in no_decay_names
    assert "cls.predictions.transform.LayerNorm.weight" in no_decay_names
    assert "cls.predictions.bias" in no_decay_names
    # tied weights appear once, under the encoder's name
    assert "uniter.embeddings.word_embeddings.weight" in decay_names
    assert "cls.predictions.decoder.weight" not in decay_names | no_decay_names
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -1"):
        param_groups(model, -1)


@pytest.mark.parametrize(
    "step,expected",
    [(1, 1e-4), (5, 5e-4), (10, 1e-3), (55, 1e-3 * 45 / 90), (99, 1e-3 / 90), (100, 1e-8), (150, 1e-8)],
)
def test_lr_at_matches_get_lr_sched(step, expected) -> None:
    assert lr_at(step, 1e-3, 10, 100) == pytest.approx(expected, rel=1e-12)


def test_scheduler_gives_step_k_the_lr_of_step_k() -> None:
    param = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([{"params": [param], "weight_decay": 0.0}], lr=123.0)
    sched = build_scheduler(opt, 2e-3, 4, 20)
    seen = []
    for _ in range(22):
        seen.append(opt.param_groups[0]["lr"])
        param.grad = torch.randn(3)
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(k, 2e-3, 4, 20) for k in range(1, 23)], rel=1e-12)
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        build_scheduler(opt, 0.0, 4, 20)
    with pytest.raises(ValueError, match="warmup_steps >= 0 and num_train_steps > 0"):
        build_scheduler(opt, 1e-3, -1, 20)


def test_no_warmup_starts_at_full_lr() -> None:
    assert lr_at(1, 1e-3, 0, 10) == pytest.approx(1e-3 * 9 / 10)
