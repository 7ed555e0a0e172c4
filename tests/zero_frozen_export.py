"""Export of a model with frozen parameters trained under bf16 (one process, CPU): ``python
tests/zero_frozen_export.py OUT`` trains a tiny ``UniterForPretraining`` whose encoder is frozen (its heads train)
for one AdamW step under DeepSpeed bf16, ZeRO stages 0 and 2, saves the checkpoint, and writes ``OUT/export.json``:
per stage, the largest difference of the frozen parameters from their loaded values in ``consolidated_model``'s
export without and with ``frozen_parameters``, and of the trained ones from the checkpoint's fp32 weights
(``read_deepspeed``)."""

from __future__ import annotations

import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(out: str) -> None:
    from uniter_fast.checkpoint import read_deepspeed
    from uniter_fast.config import UniterConfig
    from uniter_fast.pretraining.model import UniterForPretraining
    from uniter_fast.training.distributed import setup_environment
    from uniter_fast.training.zero import consolidated_model, frozen_parameters

    setup_environment()
    import deepspeed

    deepspeed.init_distributed()

    def build() -> UniterForPretraining:
        return UniterForPretraining(UniterConfig.tiny())

    def frozen_error(exported: torch.nn.Module, frozen: dict[str, torch.Tensor]) -> float:
        params = dict(exported.named_parameters())
        return max(float((params[name].float() - value).abs().max()) for name, value in frozen.items())

    report = {}
    for stage in (0, 2):
        torch.manual_seed(stage)
        model = UniterForPretraining(UniterConfig.tiny())
        model.uniter.requires_grad_(False)
        frozen = frozen_parameters(model)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        }
        trainable = [p for p in model.parameters() if p.requires_grad]
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        loss = sum((p.float() * torch.randn_like(p.float())).sum() for p in trainable)
        engine.backward(loss)
        engine.step()
        ckpt = os.path.join(out, f"ckpt{stage}")
        engine.save_checkpoint(ckpt, tag="step1")

        with_frozen = consolidated_model(engine, ckpt, "step1", build, frozen)
        saved = read_deepspeed(ckpt, "step1")
        trained = {n: p for n, p in with_frozen.named_parameters() if n not in frozen}
        report[str(stage)] = {
            "frozen_error_without": frozen_error(consolidated_model(engine, ckpt, "step1", build), frozen),
            "frozen_error_with": frozen_error(with_frozen, frozen),
            "trained_error": max(float((p.float() - saved[n].float()).abs().max()) for n, p in trained.items()),
            "frozen_tensors": len(frozen),
        }
    with open(os.path.join(out, "export.json"), "w", encoding="utf-8") as f:
        json.dump(report, f)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main(sys.argv[1])
