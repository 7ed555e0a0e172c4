"""Write real DeepSpeed checkpoints of a tiny ``UniterForPretraining`` (one process, CPU, fp32).

``python tests/deepspeed_checkpoint.py OUT`` takes one AdamW step on random gradients (so the weights differ from the
init) and saves, as the training loop does (a ``latest`` file naming tag ``step1``), ``OUT/ckpt/`` under ZeRO-2
(the fp32 master weights sit in the optimizer-state files) and ``OUT/ckpt0/`` without ZeRO (the module's weights
sit in the model-state file); and each engine's module state_dict as ``OUT/reference.pt`` / ``OUT/reference0.pt``.
"""

from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(out: str) -> None:
    from uniter_fast.config import UniterConfig
    from uniter_fast.pretraining.model import UniterForPretraining
    from uniter_fast.training.distributed import setup_environment

    setup_environment()
    import deepspeed

    deepspeed.init_distributed()
    for stage, suffix in ((2, ""), (0, "0")):
        torch.manual_seed(stage)
        model = UniterForPretraining(UniterConfig.tiny())
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
            "zero_optimization": {"stage": stage},
        }
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        loss = sum((p * torch.randn_like(p)).sum() for p in engine.module.parameters())
        engine.backward(loss)
        engine.step()
        engine.save_checkpoint(os.path.join(out, "ckpt" + suffix), tag="step1", save_latest=True)
        torch.save(engine.module.state_dict(), os.path.join(out, f"reference{suffix}.pt"))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main(sys.argv[1])
