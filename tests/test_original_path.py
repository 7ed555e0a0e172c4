"""The benches' ``original`` path (bench/original_path.py) computes what the reference path computes: the written-out
GELU equals the fused one, the original step's losses and gradients equal the reference path's on the same batch
(fp32, dropout 0), and its AdamW loop follows the original optim/adamw.py maths."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F

from tests.pretrain_batches import task_batch
from uniter_fast.config import UniterConfig
from uniter_fast.model.activations import Gelu, original_gelu
from uniter_fast.pretraining.model import UniterForPretraining

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from original_path import OriginalAdamW, use_path  # noqa: E402

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


def test_original_gelu_equals_fused_gelu() -> None:
    x = 4 * torch.randn(3, 257, dtype=torch.float64)
    torch.testing.assert_close(original_gelu(x), F.gelu(x), rtol=1e-12, atol=1e-12)
    x32 = x.float()
    torch.testing.assert_close(Gelu("original")(x32), Gelu("fused")(x32), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="gelu"):
        Gelu("tanh")
    with pytest.raises(ValueError, match="gelu"):
        UniterConfig.tiny(gelu="tanh")


def test_use_path_switches_attention_and_gelu() -> None:
    model = UniterForPretraining(UniterConfig.tiny())
    gelus = [m for m in model.modules() if isinstance(m, Gelu)]
    assert len(gelus) == model.config.num_hidden_layers + 3  # each layer, the MLM transform, the two region heads
    use_path(model, "original")
    assert not model.fast and all(g.variant == "original" for g in gelus)
    assert {layer.attention.self.backend for layer in model.uniter.encoder.layer} == {"reference"}
    use_path(model, "fast")
    assert model.fast and all(g.variant == "fused" for g in gelus) and model.config.gelu == "fused"
    assert {layer.attention.self.backend for layer in model.uniter.encoder.layer} == {"auto"}
    with pytest.raises(ValueError, match="path"):
        use_path(model, "apex")


@pytest.mark.parametrize("task", TASKS)
def test_original_losses_and_gradients_equal_reference(task: str) -> None:
    config = UniterConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = UniterForPretraining(config).train()
    batch = task_batch(task, [7, 3, 12, 5], [9, 14, 4, 6], config.vocab_size, seed=17)
    results = {}
    for path in ("original", "reference"):
        use_path(model, path)
        model.zero_grad(set_to_none=True)
        loss = model(batch, task)["loss"]
        loss.backward()
        results[path] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (loss_o, grads_o), (loss_r, grads_r) = results["original"], results["reference"]
    assert torch.isfinite(loss_o) and loss_o.abs() > 0
    torch.testing.assert_close(loss_o, loss_r, rtol=1e-5, atol=1e-6)
    assert grads_o.keys() == grads_r.keys() and grads_o
    for name, grad in grads_o.items():
        torch.testing.assert_close(grad, grads_r[name], rtol=1e-4, atol=1e-6, msg=name)


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g, dtype=torch.float64)) for shape in ((5, 3), (7,))]


def _steps(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], count: int) -> None:
    g = torch.Generator().manual_seed(99)
    for _ in range(count):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        optimizer.step()


def test_original_adamw_is_adam_with_decay_after_the_update() -> None:
    """With eps 0 the original's step size lr sqrt(1 - b2^t) / (1 - b1^t) on m / sqrt(v) is Adam's bias-corrected
    update, so without decay it equals torch's AdamW over several steps; its decay multiplies the updated weight
    by (1 - lr wd), torch's the weight before the update."""
    lr, betas = 1e-2, (0.9, 0.98)
    ours, theirs = _params(1), _params(1)
    _steps(OriginalAdamW(ours, lr=lr, betas=betas, eps=0.0), ours, 4)
    _steps(torch.optim.AdamW(theirs, lr=lr, betas=betas, eps=0.0, weight_decay=0.0, foreach=False), theirs, 4)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    decayed, plain = _params(2), _params(2)
    _steps(OriginalAdamW(decayed, lr=lr, betas=betas, eps=0.0, weight_decay=0.1), decayed, 1)
    _steps(OriginalAdamW(plain, lr=lr, betas=betas, eps=0.0), plain, 1)
    for a, b in zip(decayed, plain):
        torch.testing.assert_close(a, b * (1 - lr * 0.1), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(a, b)
