"""The weights of a DeepSpeed checkpoint as one fp32 model, whatever the ZeRO stage (the export of every recipe)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from uniter_fast.checkpoint import read_deepspeed


def load_consolidated_zero(model: nn.Module, checkpoint_dir: str, tag: str) -> None:
    """Fill ``model`` with the fp32 master weights of a DeepSpeed checkpoint (any ZeRO stage), as
    ``uniter_fast.checkpoint.read_deepspeed`` consolidates them; every parameter must be found."""
    state = read_deepspeed(checkpoint_dir, tag)
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"{checkpoint_dir}/{tag}: the consolidated state lacks {missing}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state[name].to(param.dtype))


def consolidated_model(engine: Any, checkpoint_dir: str, tag: str, build: Callable[[], nn.Module]) -> nn.Module:
    """The trained model of checkpoint ``tag``: ``engine.module`` itself without ZeRO; under ZeRO (whose module holds
    only this rank's partition) a fresh ``build()`` filled with the consolidated fp32 master weights."""
    if engine.zero_optimization_stage() == 0:
        return engine.module
    model = build()
    load_consolidated_zero(model, checkpoint_dir, tag)
    return model
