"""VILLA's AFT step with ``reuse_clean_forward`` (the shared clean pass: step 1's perturbed forward at a zero
perturbation is the clean forward): with dropout 0 it is the default step (losses, perturbations after each ascent,
accumulated gradients) on the packed (fast) and padded (reference) encoders; its input-only backward computes no
parameter gradient; the loss scale; the config checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from tests.tasks_helpers import perturb, random_batch, tiny_config
from tests.test_adversarial import (
    MODES,
    ModuleEngine,
    ScaledEngine,
    assert_grads_close,
    assert_steps_agree,
    run_step,
)
from uniter_fast.errors import ConfigError
from uniter_fast.pretraining.config import parse_training_config
from uniter_fast.tasks import get_task
from uniter_fast.training.adversarial import AdversarialConfig, AdversarialStep, parse_adversarial

PATHS = pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])


def task_model(name: str, fast: bool, seed: int) -> tuple[torch.nn.Module, dict]:
    """A model of task ``name`` with non-trivial weights (dropout 0) and a fresh random batch of ragged lengths."""
    task, config = get_task(name), tiny_config()
    if name == "itm":  # two groups of sample_size 2 (a positive and a negative each)
        options = task.check_options({"first_stage_dim": 0}, "test")
        batch = random_batch([(7, 4), (5, 6), (9, 3), (6, 5)], seed=seed)
        batch["sample_size"] = 2
    else:
        options, batch = task.example(config, 3, np.random.default_rng(seed), (4, 15), (2, 10))
    torch.manual_seed(seed)
    model = task.build_model(config, options, fast)
    task.prepare_model(model, options)
    return perturb(model).train(), batch


def check_reuse(name: str, fast: bool, cfg: AdversarialConfig, seed: int = 7) -> tuple:
    """The step with the option equals the default step; returns the option's (outputs, gradients, trace)."""
    model, batch = task_model(name, fast, seed)
    reused = run_step(model, batch, dataclasses.replace(cfg, reuse_clean_forward=True), name)
    assert_steps_agree(reused, run_step(model, batch, cfg, name))
    assert len(reused[2]) == cfg.adv_steps
    return reused


@PATHS
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
@pytest.mark.parametrize("modality", MODES)
def test_reuse_equals_the_default_step_every_mode_and_norm(fast, modality, norm_type) -> None:
    cfg = AdversarialConfig(
        adv_modality=modality, norm_type=norm_type, adv_lr_txt=0.05, adv_lr_img=0.5, adv_max_norm=0.08
    )
    out, _, trace = check_reuse("vqa", fast, cfg)
    assert float(out["adv_kl"]) > 0
    assert all(delta.any() for deltas in trace[-1]["deltas"] for delta in deltas.values())  # every delta ascended


@PATHS
@pytest.mark.parametrize("name", ["vqa", "ve", "nlvr2", "itm"])
def test_reuse_equals_the_default_step_every_task(fast, name) -> None:
    cfg = AdversarialConfig(adv_modality="text+image", adv_lr_txt=0.05, adv_lr_img=0.5, adv_max_norm=0.06)
    _, _, trace = check_reuse(name, fast, cfg, seed=11)
    assert float(trace[-1]["deltas"][0]["txt"].flatten(1).norm(dim=1).max()) <= 0.06 + 1e-6  # projected


@pytest.mark.parametrize("steps", [1, 2])
def test_reuse_equals_the_default_step_few_steps(steps) -> None:
    """K = 1 (only the shared pass: no input-only backward) and K = 2."""
    cfg = AdversarialConfig(adv_steps=steps, adv_modality="alter", adv_lr_txt=0.05, adv_lr_img=0.5)
    check_reuse("ve", True, cfg)


class CountingEngine(ModuleEngine):
    """Counts forwards and backwards; notes which parameters hold a gradient when the first backward starts."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.forwards, self.backwards, self.first_backward_saw = 0, 0, None

    def __call__(self, batch: dict, task: str, **kwargs: Any) -> dict:
        self.forwards += 1
        return super().__call__(batch, task, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        if self.first_backward_saw is None:
            self.first_backward_saw = [n for n, p in self.model.named_parameters() if p.grad is not None]
        self.backwards += 1
        super().backward(loss, scale_wrt_gas)


@pytest.mark.parametrize("modality", ["text", "alter"])
def test_the_input_only_backward_computes_no_parameter_gradient(modality) -> None:
    """Before the first engine backward (step 2's) the clean forward and step 1's input-only backward have run: no
    parameter holds a gradient then. K forwards (per branch) and K engine backwards, against K + 1 and K + 1."""
    model, batch = task_model("vqa", True, 3)
    branches = 2 if modality == "alter" else 1
    for reuse, forwards, backwards in ((True, 1 + 2 * branches, 3), (False, 1 + 3 * branches, 4)):
        model.zero_grad(set_to_none=True)
        engine = CountingEngine(model)
        cfg = AdversarialConfig(adv_modality=modality, reuse_clean_forward=reuse)
        AdversarialStep(cfg, model)(engine, batch, "vqa")
        assert (engine.forwards, engine.backwards) == (forwards, backwards)
        assert engine.first_backward_saw == []


def test_a_loss_scale_scales_the_parameter_gradients_only() -> None:
    """Under the engine's loss scale (1024, also the optimizer's ``loss_scale`` the input-only backward reads) the
    parameter gradients are scaled and the perturbations are not, as without the option."""
    model, batch = task_model("vqa", True, 5)
    cfg = AdversarialConfig(adv_modality="alter", adv_lr_txt=0.05, adv_lr_img=0.5, reuse_clean_forward=True)
    _, want_grads, want_trace = run_step(model, batch, dataclasses.replace(cfg, reuse_clean_forward=False), "vqa")
    engine = ScaledEngine(model)
    engine.optimizer = type("Optimizer", (), {"loss_scale": 1024.0})()
    model.zero_grad()
    step = AdversarialStep(cfg, model)
    step.trace = []
    step(engine, batch, "vqa")
    for got, want in zip(step.trace, want_trace):
        for deltas_got, deltas_want in zip(got["deltas"], want["deltas"]):
            for key in deltas_want:
                torch.testing.assert_close(deltas_got[key], deltas_want[key], rtol=1e-4, atol=1e-7)
    assert_grads_close({n: p.grad / 1024.0 for n, p in model.named_parameters() if p.grad is not None}, want_grads)


def test_config_checks() -> None:
    assert AdversarialConfig().reuse_clean_forward is False  # the default is the released step
    assert parse_adversarial({"reuse_clean_forward": True}, "cfg.json").reuse_clean_forward is True
    with pytest.raises(ConfigError, match=r"^cfg.json: adversarial.reuse_clean_forward must be true or false, got 1$"):
        parse_adversarial({"reuse_clean_forward": 1}, "cfg.json")
    message = (
        r"^cfg.json: adversarial.adv_init_mag must be 0 with reuse_clean_forward true \(step 1 reuses the clean "
        r"forward at a zero perturbation\), got 0.01$"
    )
    with pytest.raises(ConfigError, match=message):
        parse_adversarial({"reuse_clean_forward": True, "adv_init_mag": 0.01}, "cfg.json")
    assert parse_adversarial({"adv_init_mag": 0.01}, "cfg.json").adv_init_mag == 0.01  # without the option: fine


def test_pretraining_takes_the_option(tmp_path) -> None:
    for name in ("txt", "img"):
        (tmp_path / name).mkdir()
    data = [{"name": "d", "db": ["txt"], "img": ["img"], "tasks": ["mlm"], "mix_ratio": [1]}]
    raw = {"output_dir": str(tmp_path / "out"), "model": "tiny", "train_datasets": data, "val_datasets": data}
    cfg = parse_training_config({**raw, "adversarial": {"reuse_clean_forward": True}}, str(tmp_path))
    assert cfg.adversarial == AdversarialConfig(reuse_clean_forward=True)


def test_reuse_through_the_fused_encoder_layer() -> None:
    """The fast path with the fused encoder layer (``encoder_layer_backend="triton"``, interpreted on CPU), whose
    Functions skip the weight gradients in the input-only backward: the option's step equals the eager layer's
    default step."""
    pytest.importorskip("triton")
    from uniter_fast.model.encoder import set_encoder_layer_backend

    model, batch = task_model("vqa", True, 7)
    cfg = AdversarialConfig(adv_modality="text+image", adv_lr_txt=0.05, adv_lr_img=0.5)
    want = run_step(model, batch, cfg, "vqa")
    set_encoder_layer_backend(model, "triton")
    assert_steps_agree(run_step(model, batch, dataclasses.replace(cfg, reuse_clean_forward=True), "vqa"), want)
