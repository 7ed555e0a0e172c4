"""Write a real DeepSpeed ZeRO-2 checkpoint of a tiny ``UniterForPretraining`` (one process, CPU, fp32).

``python tests/deepspeed_checkpoint.py OUT`` takes one AdamW step on random gradients (so the fp32 master weights
differ from the init), saves ``OUT/ckpt/`` with a ``latest`` file (tag ``step1``) as the training loop does, and the
module's own state_dict as ``OUT/reference.pt`` for comparison.
"""

from __future__ import annotations

import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(out: str) -> None:
    from uniter_fast.config import UniterConfig
    from uniter_fast.pretraining.engine import setup_environment
    from uniter_fast.pretraining.model import UniterForPretraining

    setup_environment()
    import deepspeed

    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = UniterForPretraining(UniterConfig.tiny())
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "zero_optimization": {"stage": 2},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    loss = sum((p.float() * torch.randn_like(p.float())).sum() for p in engine.module.parameters())
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(os.path.join(out, "ckpt"), tag="step1", save_latest=True)
    torch.save(engine.module.state_dict(), os.path.join(out, "reference.pt"))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    main(sys.argv[1])
