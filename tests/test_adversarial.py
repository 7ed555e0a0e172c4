"""VILLA's adversarial fine-tuning (``uniter_fast.training.adversarial``): the perturbation inputs of the model, the
step on the packed (fast) and padded (reference) encoders, the released algorithm re-stated here in plain PyTorch,
K = 0, the config block and an exact resume through ``finetune.py``."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.pretrain_runs import REPO
from tests.tasks_helpers import perturb, random_batch, tiny_config
from tests.test_tasks_e2e import finetune, run, step_log, write_config
from uniter_fast.errors import ConfigError
from uniter_fast.finetuning.config import parse_finetune_config
from uniter_fast.model.perturbation import with_deltas
from uniter_fast.tasks import get_task
from uniter_fast.tasks.spec import Task
from uniter_fast.tasks.vqa import UniterForVisualQuestionAnswering
from uniter_fast.training.adversarial import AdversarialConfig, AdversarialStep, parse_adversarial

EXAMPLE_TASKS = ["vqa", "ve", "nlvr2", "vcr", "re"]
MODES = ["text", "image", "text+image", "alter"]


class ModuleEngine:
    """What the step needs of a DeepSpeed engine, over a bare model (fp32, no loss scaling)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, batch: dict, task: str, **kwargs: Any) -> dict:
        return self.model(batch, task, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()


def task_models(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    """(fast model, reference model with the same non-trivial weights, a batch of the task's example)."""
    task, config = get_task(name), tiny_config()
    options, batch = task.example(config, 3, np.random.default_rng(seed), (5, 14), (3, 9))
    models = []
    for fast in (True, False):
        torch.manual_seed(seed)
        model = task.build_model(config, options, fast)
        task.prepare_model(model, options)
        models.append(perturb(model).train())
    models[1].load_state_dict(models[0].state_dict())
    return models[0], models[1], batch


def run_step(model: torch.nn.Module, batch: dict, cfg: AdversarialConfig, name: str, seed: int = 1) -> tuple:
    """(step outputs, parameter gradients, the trace of losses and perturbations) of one AFT step."""
    model.zero_grad()
    step = AdversarialStep(cfg, model)
    step.trace = []
    torch.manual_seed(seed)
    out = step(ModuleEngine(model), batch, name)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads, step.trace


def assert_grads_close(got: dict, want: dict, rtol: float = 1e-4) -> None:
    assert set(got) == set(want) and want
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=1e-5 * scale, msg=name)


def assert_steps_agree(first: tuple, second: tuple, delta_atol: float = 1e-5) -> None:
    """Equal losses, perturbations after each ascent (``delta_atol``: relative to the largest entry) and gradients."""
    (out_1, grads_1, trace_1), (out_2, grads_2, trace_2) = first, second
    for key in out_2:
        torch.testing.assert_close(out_1[key], out_2[key], rtol=1e-5, atol=1e-6, msg=key)
    assert len(trace_1) == len(trace_2)
    for step_1, step_2 in zip(trace_1, trace_2):
        torch.testing.assert_close(step_1["loss"], step_2["loss"], rtol=1e-5, atol=1e-6)
        for deltas_1, deltas_2 in zip(step_1["deltas"], step_2["deltas"]):
            assert deltas_1.keys() == deltas_2.keys()
            for key in deltas_2:
                want = deltas_2[key].detach()
                atol = delta_atol * float(want.abs().max()) + 1e-9
                torch.testing.assert_close(deltas_1[key].detach(), want, rtol=1e-4, atol=atol)
    assert_grads_close(grads_1, grads_2)


# ---------------------------------------------------------------------- the model's perturbation inputs
@pytest.mark.parametrize("fast", [True, False])
def test_deltas_act_on_word_embeddings_and_raw_features(fast) -> None:
    """A text delta E[ids'] - E[ids] is the forward of ids'; an image delta f' - f the forward of features f'."""
    model = perturb(UniterForVisualQuestionAnswering(tiny_config(), 7, fast=fast)).eval()
    batch = random_batch([(6, 4), (9, 2), (4, 5)], seed=3)
    gen = torch.Generator().manual_seed(4)
    valid_txt = torch.arange(batch["input_ids"].size(1))[None] < batch["txt_lens"][:, None]
    other_ids = torch.where(valid_txt, torch.randint(5, 150, batch["input_ids"].shape, generator=gen), 0)
    valid_img = torch.arange(batch["img_feat"].size(1))[None] < batch["num_bbs"][:, None]
    other_feat = torch.randn(batch["img_feat"].shape, generator=gen).relu() * valid_img[..., None]
    table = model.uniter.embeddings.word_embeddings
    with torch.no_grad():
        txt_delta = table(other_ids) - table(batch["input_ids"])
        img_delta = other_feat - batch["img_feat"]
        perturbed = model(with_deltas(batch, txt_delta, img_delta), compute_loss=False)["scores"]
        other = random_batch([(6, 4), (9, 2), (4, 5)], seed=3)
        other["input_ids"], other["img_feat"] = other_ids, other_feat
        other["packed"]["txt_ids"] = other_ids[valid_txt]
        other["packed"]["img_feat"] = other_feat[valid_img]
        expected = model(other, compute_loss=False)["scores"]
        clean = model(batch, compute_loss=False)["scores"]
    torch.testing.assert_close(perturbed, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clean, expected, atol=1e-3)


# ---------------------------------------------------------------------- fast vs reference
@pytest.mark.parametrize("norm_type", ["l2", "linf"])
@pytest.mark.parametrize("modality", MODES)
def test_fast_equals_reference_every_mode_and_norm(modality, norm_type) -> None:
    fast, reference, batch = task_models("vqa")
    cfg = AdversarialConfig(adv_modality=modality, norm_type=norm_type, adv_lr_txt=0.05, adv_lr_img=0.5)
    assert_steps_agree(run_step(fast, batch, cfg, "vqa"), run_step(reference, batch, cfg, "vqa"))


@pytest.mark.parametrize("name", EXAMPLE_TASKS)
def test_fast_equals_reference_every_task(name) -> None:
    fast, reference, batch = task_models(name)
    cfg = AdversarialConfig(adv_modality="text+image", adv_lr_txt=0.05, adv_lr_img=0.5, adv_max_norm=0.06)
    first = run_step(fast, batch, cfg, name)
    assert_steps_agree(first, run_step(reference, batch, cfg, name))
    last = first[2][-1]["deltas"][0]
    assert float(last["txt"].flatten(1).norm(dim=1).max()) <= 0.06 + 1e-6  # projected to adv_max_norm
    assert float(last["img"].abs().max()) > 0


def test_fast_equals_reference_itm_with_random_init() -> None:
    """ITM (groups of a positive and its negatives; KL over each group's candidates), FreeLB-style random init."""
    task, config = get_task("itm"), tiny_config()
    lengths = [(7, 4), (5, 6), (9, 3), (6, 5)]  # two groups of sample_size 2
    batch = random_batch(lengths, seed=5)
    batch["sample_size"] = 2
    options = task.check_options({"first_stage_dim": 0}, "test")
    models = []
    for fast in (True, False):
        torch.manual_seed(0)
        models.append(perturb(task.build_model(config, options, fast)).train())
    models[1].load_state_dict(models[0].state_dict())
    cfg = AdversarialConfig(adv_modality="text+image", adv_init_mag=0.05, adv_lr_txt=0.05, adv_lr_img=0.5)
    assert_steps_agree(*(run_step(m, batch, cfg, "itm", seed=2) for m in models))


# ---------------------------------------------------------------------- the released algorithm, re-stated
def released_step(model: torch.nn.Module, batch: dict, cfg: AdversarialConfig) -> tuple[list[float], dict]:
    """train_vqa_adv.py's loop written out from the paper and the issue: a clean forward with gradient; K perturbed
    forwards with (BCE x #answers + w [KL(p||q) + KL(q||p)] x #answers) / K, each ``backward(retain_graph=True)``;
    the ascent g / ||g|| per row; ``alter``: text-only and image-only forwards, each perturbation ascending (the
    paper's intent), /2K. Returns (step losses, gradients)."""
    model.zero_grad()
    targets = batch["targets"]
    answers = targets.size(1)

    def task_and_kl(scores: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(scores, targets, reduction="none").mean() * answers
        kl = F.kl_div(F.log_softmax(scores, 1), clean_prob, reduction="none") + F.kl_div(
            clean_logprob, F.softmax(scores, 1), reduction="none"
        )
        return bce + cfg.adv_kl_weight * kl.mean() * answers

    def ascend(delta: torch.Tensor, lr: float) -> torch.Tensor:
        grad = delta.grad.clone().detach()
        if cfg.norm_type == "l2":
            denorm = torch.norm(grad.view(grad.size(0), -1), dim=1).view(-1, 1, 1)
        else:
            denorm = torch.norm(grad.view(grad.size(0), -1), dim=1, p=float("inf")).view(-1, 1, 1)
        return (delta + lr * grad / torch.clamp(denorm, min=1e-8)).detach()

    txt_delta = torch.zeros(*batch["input_ids"].shape, model.config.hidden_size)
    img_delta = torch.zeros_like(batch["img_feat"])
    clean_scores = model(batch, compute_loss=False)["scores"]
    clean_prob, clean_logprob = F.softmax(clean_scores, dim=1), F.log_softmax(clean_scores, dim=1)
    losses = []
    text, image = "text" in cfg.adv_modality, "image" in cfg.adv_modality
    for astep in range(cfg.adv_steps):
        txt_delta.requires_grad_()
        img_delta.requires_grad_()
        if cfg.adv_modality == "alter":
            loss_1 = task_and_kl(model(with_deltas(batch, txt_delta, None), compute_loss=False)["scores"])
            loss_2 = task_and_kl(model(with_deltas(batch, None, img_delta), compute_loss=False)["scores"])
            loss = (loss_1 + loss_2) / (cfg.adv_steps * 2)
        else:
            deltas = (txt_delta if text else None, img_delta if image else None)
            loss = task_and_kl(model(with_deltas(batch, *deltas), compute_loss=False)["scores"]) / cfg.adv_steps
        loss.backward(retain_graph=True)
        losses.append(float(loss.detach()))
        if astep == cfg.adv_steps - 1:
            break
        if text or cfg.adv_modality == "alter":
            txt_delta = ascend(txt_delta, cfg.adv_lr_txt)
        if image or cfg.adv_modality == "alter":
            img_delta = ascend(img_delta, cfg.adv_lr_img)
    return losses, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("norm_type", ["l2", "linf"])
@pytest.mark.parametrize("modality", MODES)
def test_step_equals_the_released_algorithm(modality, norm_type) -> None:
    """Losses and accumulated gradients of our step (clean-logit gradients summed, one backward through the clean
    graph) equal the released loop's (retain_graph, the clean graph back-propagated every step), on both paths."""
    fast, reference, batch = task_models("vqa", seed=3)
    cfg = AdversarialConfig(adv_modality=modality, norm_type=norm_type, adv_lr_txt=0.05, adv_lr_img=0.5)
    want_losses, want_grads = released_step(reference, batch, cfg)
    assert len(want_losses) == 3
    for model in (fast, reference):
        _, grads, trace = run_step(model, batch, cfg, "vqa")
        np.testing.assert_allclose([float(t["loss"]) for t in trace], want_losses, rtol=1e-5)
        assert_grads_close(grads, want_grads)


class ScaledEngine(ModuleEngine):
    """An engine with a static loss scale of 1024, as DeepSpeed's fp16 scaler multiplies the loss before backward."""

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        (loss * 1024.0).backward()


def test_a_loss_scale_scales_the_parameter_gradients_only() -> None:
    """Under a loss scale the parameter gradients are the scale times those without one (the optimizer unscales
    them) and the perturbations ascend as without one: the clean logits' gradients, back-propagated once at the end,
    are unscaled with the scale the step reads off each backward."""
    fast, _, batch = task_models("vqa")
    cfg = AdversarialConfig(adv_modality="alter", norm_type="linf", adv_lr_txt=0.05, adv_lr_img=0.5)
    plain = run_step(fast, batch, cfg, "vqa")
    fast.zero_grad()
    step = AdversarialStep(cfg, fast)
    step.trace = []
    torch.manual_seed(1)
    step(ScaledEngine(fast), batch, "vqa")
    for got, want in zip(step.trace, plain[2]):
        for deltas_got, deltas_want in zip(got["deltas"], want["deltas"]):
            for key in deltas_want:
                torch.testing.assert_close(deltas_got[key], deltas_want[key], rtol=1e-5, atol=1e-7)
    grads = {n: p.grad / 1024.0 for n, p in fast.named_parameters() if p.grad is not None}
    assert_grads_close(grads, plain[1])


# ---------------------------------------------------------------------- K = 0
def test_zero_steps_is_plain_finetuning_exactly() -> None:
    fast, _, batch = task_models("nlvr2")
    out, grads, trace = run_step(fast, batch, AdversarialConfig(adv_steps=0), "nlvr2")
    fast.zero_grad()
    plain = fast(batch, "nlvr2")
    plain["loss"].backward()
    assert trace == [] and torch.equal(out["loss"], plain["loss"])
    for name, param in fast.named_parameters():
        if param.grad is not None:
            assert torch.equal(grads[name], param.grad), name


# ---------------------------------------------------------------------- the config block
BAD_BLOCKS = [
    ([1, 2], "'adversarial' must be a JSON object, got list"),
    ({"adv_step": 3}, r"unknown key\(s\) \['adv_step'\] in 'adversarial'"),
    ({"adv_steps": -1}, "adversarial.adv_steps must be an integer >= 0, got -1"),
    ({"adv_steps": 2.5}, "adversarial.adv_steps must be an integer >= 0, got 2.5"),
    ({"norm_type": "l1"}, r"adversarial.norm_type must be one of \['l2', 'linf'\], got 'l1'"),
    ({"adv_modality": "both"}, "adversarial.adv_modality must be one of .*got 'both'"),
    ({"adv_lr_txt": -1e-3}, "adversarial.adv_lr_txt must be a finite number >= 0, got -0.001"),
    ({"adv_kl_weight": "1.5"}, "adversarial.adv_kl_weight must be a finite number >= 0, got '1.5'"),
    ({"adv_max_norm": float("nan")}, "adversarial.adv_max_norm must be a finite number >= 0, got nan"),
    ({"adv_kl_weights": 0.5}, "adversarial.adv_kl_weights must be a JSON object of objective: finite number >= 0, "),
    ({"adv_kl_weights": {"mlm": -1}}, r"adversarial.adv_kl_weights must be .*, got \{'mlm': -1\}"),
]


@pytest.mark.parametrize("raw, message", BAD_BLOCKS)
def test_config_errors_name_the_field(raw, message) -> None:
    with pytest.raises(ConfigError, match=f"^cfg.json: {message}"):
        parse_adversarial(raw, "cfg.json")


def tiny_raw(task: str) -> dict:
    with open(os.path.join("configs", f"finetune-{task}-tiny.json"), encoding="utf-8") as f:
        return {**json.load(f), "checkpoint": None}


def test_config_block_is_optional_and_checked_per_task() -> None:
    assert parse_finetune_config(tiny_raw("vqa")).adversarial is None
    cfg = parse_finetune_config({**tiny_raw("vqa"), "adversarial": {"adv_modality": "alter"}})
    assert cfg.adversarial == AdversarialConfig(adv_modality="alter")
    vcr_pretrain = parse_finetune_config({**tiny_raw("vcr-pretrain"), "adversarial": {"adv_modality": "text+image"}})
    assert vcr_pretrain.adversarial == AdversarialConfig(adv_modality="text+image")  # APT on the second stage
    reused = parse_finetune_config({**tiny_raw("vcr-pretrain"), "adversarial": {"reuse_clean_forward": True}})
    assert reused.adversarial.reuse_clean_forward  # the shared clean pass, through the fused pretraining losses

    class NoLogits(Task):
        name = "no_logits"

    with pytest.raises(ConfigError, match="^cfg: 'adversarial' is not available for task 'no_logits'"):
        NoLogits().check_adversarial({}, "cfg")
    with pytest.raises(ConfigError, match="'adversarial' needs hard_neg_size 0 .*got [1-9]"):
        parse_finetune_config({**tiny_raw("itm-hn"), "adversarial": {}})


def test_kl_weights_name_the_run_objectives() -> None:
    """``adv_kl_weights`` names objectives the run trains with a KL: the task itself (one objective), VCR's second
    stage's configured objectives but MRFR (a regression); anything else is refused in one line."""
    block = {"adv_kl_weight": 1.5, "adv_kl_weights": {"vqa": 0.5}}
    assert parse_finetune_config({**tiny_raw("vqa"), "adversarial": block}).adversarial.kl_weight("vqa") == 0.5
    with pytest.raises(ConfigError, match=r"^cfg: adversarial.adv_kl_weights names \['mlm'\], .*are \['vqa'\]$"):
        parse_finetune_config({**tiny_raw("vqa"), "adversarial": {"adv_kl_weights": {"mlm": 0}}}, where="cfg")
    vcr = parse_finetune_config({**tiny_raw("vcr-pretrain"), "adversarial": {"adv_kl_weights": {"mrckl": 0}}})
    assert (vcr.adversarial.kl_weight("mrckl"), vcr.adversarial.kl_weight("mlm")) == (0, 1.5)
    with pytest.raises(ConfigError, match=r"names \['mrfr'\], .*are \['mlm', 'mrckl'\]$"):
        parse_finetune_config({**tiny_raw("vcr-pretrain"), "adversarial": {"adv_kl_weights": {"mrfr": 0}}}, where="cfg")


@pytest.mark.parametrize(
    "name",
    sorted(n for n in os.listdir("configs") if n.startswith("finetune-") and n.endswith("-villa.json"))
    or ["(no villa configs)"],
)
def test_released_settings_configs_parse(name) -> None:
    with open(os.path.join("configs", name), encoding="utf-8") as f:
        raw = json.load(f)
    block = parse_adversarial(raw["adversarial"], name)
    assert block.adv_steps == 3 and block.norm_type == "l2" and block.adv_max_norm == 0 and block.adv_init_mag == 0
    if raw["task"] == "vcr_pretrain":  # APT on VCR's second stage: its UNITER config (grad_norm -1) plus the block
        with open(os.path.join("configs", name.replace("-villa", "")), encoding="utf-8") as f:
            plain = json.load(f)
        assert {**raw, "adversarial": None, "output_dir": None} == {**plain, "adversarial": None, "output_dir": None}
        assert raw["output_dir"] != plain["output_dir"] and block.adv_modality == "text+image"
    else:
        assert raw["grad_norm"] == 2.0


# ---------------------------------------------------------------------- through finetune.py: exact resume
def test_resume_with_the_block_is_exact(tmp_path, monkeypatch) -> None:
    """``finetune.py`` with an ``adversarial`` block (alter mode, random init: every RNG draw matters) stopped after
    step 2 and resumed logs and exports exactly what the uninterrupted run does."""
    monkeypatch.setenv("PYTHONPATH", REPO)  # the package of this checkout in the child processes

    def edit(cfg: dict) -> None:
        cfg.pop("test_txt_db"), cfg.pop("test_img_db")
        cfg["adversarial"] = {"adv_modality": "alter", "adv_lr_txt": 1e-2, "adv_lr_img": 1e-1, "adv_init_mag": 1e-3}

    whole, split = tmp_path / "whole", tmp_path / "split"
    whole.mkdir(), split.mkdir()
    configs = [write_config(str(d), "vqa", steps=4, edit=edit) for d in (whole, split)]
    finetune(configs[0], ranks=[sys.executable])
    finetune(configs[1], "--stop_after", "2", ranks=[sys.executable])
    finetune(configs[1], "--resume", ranks=[sys.executable])
    records = step_log(configs[0])
    assert records == step_log(configs[1]) and {"adv_task_loss", "adv_kl"} <= set(records[0])
    got, want = (load_file(os.path.join(d, "out", "finetuned", "model.safetensors")) for d in (split, whole))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------- through DeepSpeed engines
def test_deepspeed_engines_hold_the_summed_gradients(tmp_path) -> None:
    """ZeRO-0 and ZeRO-2, one or two micro-batches, VQA (also with ``reuse_clean_forward``) and pretraining's MRFR:
    the gradients an engine holds before its update are the bare model's summed gradients of the same steps (ZeRO-2
    reduces at the boundary: only the last backward may be one); on a ZeRO-2 fp16 engine, VQA's two steps give the
    fp32 gradients times the loss scale and the fp32 perturbations."""
    run(
        [sys.executable, os.path.join(REPO, "tests", "adversarial_engine.py"), str(tmp_path)],
        str(tmp_path),
        timeout=300,
    )
    with open(tmp_path / "engine.json", encoding="utf-8") as f:
        results = json.load(f)
    steps = (("vqa", False), ("vqa", True), ("mrfr", False))  # VQA with and without reuse_clean_forward
    cases = [(task, reuse, stage, accum) for task, reuse in steps for stage in (0, 2) for accum in (1, 2)]
    fp32, fp16 = results[: len(cases)], results[len(cases) :]
    assert [(r["task"], r["reuse"], r["stage"], r["accum"]) for r in fp32] == cases
    for result in fp32:
        least = 1 if result["task"] == "vqa" else 1e-3  # MRFR's regression loss has smaller gradients
        assert result["max_grad"] > least and result["max_diff"] <= 1e-6 * result["max_grad"], result
    # a real fp16 engine (ZeRO-2, loss scale 8, not 1): the gradients it holds are the fp32 step's times its loss
    # scale, the perturbations the fp32 step's, to fp16's rounding
    assert [(r["reuse"], r["loss_scale"], r["ascents"]) for r in fp16] == [(False, 8.0, 3), (True, 8.0, 3)]
    for result in fp16:
        assert result["max_diff"] <= 1e-2 * result["max_grad"] and result["delta_diff"] <= 1e-2, result
