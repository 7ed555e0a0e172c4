"""DeepSpeed ZeRO helpers: what ZeRO-3 needs (the parameters it must gather outside their owners' forwards, zero
gradients for the parameters a step does not reach), and the weights of a DeepSpeed checkpoint as one fp32 model,
whatever the ZeRO stage (the export of every recipe)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from uniter_fast.checkpoint import read_deepspeed
from uniter_fast.model.base import UniterPreTrainedModel


def register_external_parameters(model: UniterPreTrainedModel) -> int:
    """Register with DeepSpeed ZeRO-3 every (module, parameter) pair of ``model.external_parameters()`` (a parameter
    that ``module``'s forward reads outside its owning module's forward), so that ZeRO-3 gathers it for that module's
    forward and backward (``deepspeed.zero.register_external_parameter``). Only for ZeRO-3; returns the count."""
    import deepspeed

    pairs = model.external_parameters()
    for module, param in pairs:
        deepspeed.zero.register_external_parameter(module, param)
    return len(pairs)


def clear_zero3_gradients(engine: Any) -> None:
    """Zero the gradient partitions that ZeRO-3 keeps from one optimizer step to the next; call it under ZeRO-3
    before the first backward of each step.

    DeepSpeed (0.19.8) holds each parameter's reduced gradient partition in one flat buffer (with the optimizer
    offloaded to the CPU, also in the fp32 groups' ``.grad``). The first micro-batch of a step overwrites the
    partitions of the parameters it reaches and nothing clears the others, so a parameter that the step's task does
    not reach (another task's head) would be stepped again with its last gradient, which also enters the clipping
    norm. ZeRO-1/2 give such a parameter a zero gradient; so does this. One memset per step, no host sync."""
    optimizer = engine.optimizer
    optimizer.grad_partitions_flat_buffer.zero_()
    if optimizer.offload_optimizer:
        for group in optimizer.fp32_partitioned_groups_flat:
            if group.grad is not None:
                group.grad.zero_()


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


def frozen_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: a detached copy, as loaded} of ``model``'s parameters that do not train (``requires_grad`` off), for
    :func:`consolidated_model`; call it before the engine is built (DeepSpeed then casts the module to bf16 / fp16
    under mixed precision, and keeps fp32 master weights only of the parameters it trains)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}


def consolidated_model(
    engine: Any,
    checkpoint_dir: str,
    tag: str,
    build: Callable[[], nn.Module],
    frozen: Optional[dict[str, torch.Tensor]] = None,
) -> nn.Module:
    """The trained model of checkpoint ``tag``: ``engine.module`` itself without ZeRO; under ZeRO (whose module holds
    only this rank's partition) a fresh ``build()`` filled with the consolidated fp32 master weights. ``frozen``
    (:func:`frozen_parameters`) gives the parameters that did not train their values as loaded: a checkpoint holds
    them only in the module's precision (bf16-rounded under bf16), so they are taken from there instead (without
    ZeRO, in a fresh ``build()`` filled from the module)."""
    if engine.zero_optimization_stage() == 0:
        if not frozen:
            return engine.module
        model = build()
        model.load_state_dict(engine.module.state_dict())
    else:
        model = build()
        load_consolidated_zero(model, checkpoint_dir, tag)
    if frozen:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in frozen.items():
                params[name].copy_(value)
    return model
