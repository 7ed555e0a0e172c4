"""The AFT step through real DeepSpeed engines (one process, CPU, fp32; and VQA on a ZeRO-2 fp16 engine), against
the same step over the bare model and torch's AdamW: ``python tests/adversarial_engine.py OUT`` writes
``OUT/engine.json``, for VQA (the default step and ``reuse_clean_forward``: an input-only backward that is no engine
backward) and pretraining's MRFR (no logits: its last perturbed backward is the step's last), ZeRO stages 0 and 2 and
1 or 2 micro-batches per optimizer step, the largest difference of the gradients the engine holds before its
optimizer update (``deepspeed.utils.safe_get_full_grad``, any ZeRO stage) from the bare model's summed gradients, and
the largest gradient; for fp16 also the loss scale and the perturbations' largest difference (:func:`fp16_results`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADAM = {"lr": 1e-3, "betas": [0.9, 0.98], "eps": 1e-6, "weight_decay": 0.0}


class ModuleEngine:
    """The engine interface over a bare model: forward, plain backward (gradients summed)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, batch: dict, task: str, **kwargs) -> dict:
        return self.model(batch, task, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False) -> None:
        loss.backward()


def main(out: str) -> None:
    from tests.pretrain_batches import task_batch
    from tests.tasks_helpers import perturb, tiny_config
    from tests.test_pretrain_heads import tiny_model
    from uniter_fast.tasks import get_task
    from uniter_fast.training.adversarial import AdversarialConfig, AdversarialStep
    from uniter_fast.training.distributed import setup_environment

    setup_environment()
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    deepspeed.init_distributed()
    task, config = get_task("vqa"), tiny_config()
    cfg = AdversarialConfig(adv_modality="text+image", adv_lr_txt=0.05, adv_lr_img=0.5)
    results = []
    for name, reuse in (("vqa", False), ("vqa", True), ("mrfr", False)):
        for stage in (0, 2):
            for accum in (1, 2):
                torch.manual_seed(stage)
                if name == "vqa":
                    rng = np.random.default_rng(accum)
                    drawn = [task.example(config, 3, rng, (5, 14), (3, 9)) for _ in range(accum)]
                    examples = [batch for _, batch in drawn]
                    model = perturb(task.build_model(config, drawn[0][0], fast=True))
                else:
                    model = tiny_model(True)
                    vocab = model.config.vocab_size
                    examples = [task_batch("mrfr", [6, 3, 9], [5, 8, 2], vocab, seed=accum + i) for i in range(accum)]
                model.train()
                reference = copy.deepcopy(model)
                ds_config = {
                    "train_micro_batch_size_per_gpu": 1,
                    "gradient_accumulation_steps": accum,
                    "optimizer": {"type": "AdamW", "params": {**ADAM, "torch_adam": True}},
                    "zero_optimization": {"stage": stage},
                }
                engine, _, _, _ = deepspeed.initialize(
                    model=model, model_parameters=model.parameters(), config=ds_config
                )
                step = AdversarialStep(dataclasses.replace(cfg, reuse_clean_forward=reuse), model)
                for index, batch in enumerate(examples):
                    step(engine, batch, name)
                    if index + 1 < accum:
                        engine.step()  # within the accumulation: no update
                got = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()}
                for batch in examples:
                    step(ModuleEngine(reference), batch, name)
                zero = torch.zeros(())
                want = {n: zero if p.grad is None else p.grad for n, p in reference.named_parameters()}
                diff = max(float((zero if got[n] is None else got[n] - g).abs().max()) for n, g in want.items())
                size = max(float(g.abs().max()) for g in want.values())
                results.append(
                    {"task": name, "reuse": reuse, "stage": stage, "accum": accum, "max_diff": diff, "max_grad": size}
                )
    results += fp16_results(task, config, cfg)
    with open(os.path.join(out, "engine.json"), "w", encoding="utf-8") as f:
        json.dump(results, f)


def fp16_results(task, config, cfg) -> list[dict]:
    """VQA's default step and ``reuse_clean_forward`` on a ZeRO-2 fp16 engine (loss scale 2^3; a KL weight of 100, so
    that the KL's gradient through the clean logits, un-scaled from the loss scale each step, weighs in the sum)
    against the fp32 step over the bare model: the engine's gradients divided by its loss scale, the perturbations
    after each ascent, relative to the largest entry."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from tests.tasks_helpers import perturb
    from uniter_fast.training.adversarial import AdversarialStep

    results = []
    for reuse in (False, True):
        step_cfg = dataclasses.replace(cfg, adv_kl_weight=100.0, reuse_clean_forward=reuse)
        torch.manual_seed(0)
        options, batch = task.example(config, 3, np.random.default_rng(1), (5, 14), (3, 9))
        model = perturb(task.build_model(config, options, fast=True)).train()
        reference = copy.deepcopy(model)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "AdamW", "params": {**ADAM, "torch_adam": True}},
            "fp16": {"enabled": True, "initial_scale_power": 3},
            "zero_optimization": {"stage": 2},
        }
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        steps = AdversarialStep(step_cfg, model), AdversarialStep(step_cfg, reference)
        for step in steps:
            step.trace = []
        steps[0](engine, batch, "vqa")
        steps[1](ModuleEngine(reference), batch, "vqa")
        scale = float(engine.optimizer.loss_scale)
        got = {n: safe_get_full_grad(p).float() / scale for n, p in engine.module.named_parameters()}
        want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
        size = max(float(g.abs().max()) for g in want.values())
        delta_diff = max(
            float((mine[key].float() - theirs[key]).abs().max() / theirs[key].abs().max())
            for fp16_step, fp32_step in zip(steps[0].trace, steps[1].trace)
            for mine, theirs in zip(fp16_step["deltas"], fp32_step["deltas"])
            for key in theirs
            if theirs[key].any()
        )
        results.append(
            {
                "task": "vqa",
                "reuse": reuse,
                "precision": "fp16",
                "loss_scale": scale,
                "max_diff": max(float((got[n] - g).abs().max()) for n, g in want.items()),
                "max_grad": size,
                "delta_diff": delta_diff,
                "ascents": len(steps[0].trace),
            }
        )
    return results


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main(sys.argv[1])
