"""``ds.json``: read, checked and completed for a run; and the DeepSpeed engine with the original's optimizer groups.

The run config owns the learning rate and its schedule (``learning_rate``, ``warmup_steps``, ``num_train_steps``, as
the original ``config/*.json``); ``ds.json`` owns the optimizer's other settings, the precision, ZeRO, clipping and
``gradient_accumulation_steps``, except where the run config gives ``gradient_accumulation_steps``, ``grad_norm``,
``weight_decay`` or ``betas`` (the original keeps them there): those win. The checks below keep the two files from
contradicting each other.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from uniter_fast.errors import ConfigError
from uniter_fast.files import read_json
from uniter_fast.json_types import is_number
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.training.config import RunConfig, valid_betas
from uniter_fast.training.distributed import release_shm_workspace
from uniter_fast.training.ds_keys import check_with_deepspeed
from uniter_fast.training.optim import build_scheduler, param_groups
from uniter_fast.training.zero import register_external_parameters

logger = logging.getLogger(__name__)

FORBIDDEN_DS_KEYS = {
    "scheduler": "the LR schedule is the original linear warm-up/decay of optim.py, set by learning_rate, "
    "warmup_steps and num_train_steps in the training config",
    "train_batch_size": "the batch size is a per-rank token budget, train_batch_size of the training config",
}


def load_ds_config(path: str, cfg: RunConfig, allow_unknown_keys: bool = False) -> dict[str, Any]:
    """Read ``ds.json``, complete it for this run (:func:`complete_ds_config`) and check it with the installed
    DeepSpeed (values, unknown keys: :func:`~uniter_fast.training.ds_keys.check_with_deepspeed`), all before any
    process group exists."""
    ds = complete_ds_config(read_json(path, "DeepSpeed config"), cfg, source=path)
    check_with_deepspeed(ds, path, allow_unknown_keys)
    check_mixed_precision_stage(ds, path)
    return ds


def check_mixed_precision_stage(ds: dict[str, Any], source: str) -> None:
    """bf16 / fp16 (still enabled after :func:`complete_ds_config`) need ZeRO stage 1-3: without ZeRO, DeepSpeed keeps
    the fp32 master weights inside its bf16 / fp16 optimizer wrapper, where the export
    (``uniter_fast.training.zero.consolidated_model``) cannot read them, so it would write the rounded module copy."""
    precision = next((key for key in ("bf16", "fp16") if ds.get(key, {}).get("enabled")), None)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if precision is not None and stage == 0:
        raise ConfigError(
            f"{source}: {precision} needs zero_optimization.stage 1, 2 or 3, got 0: without ZeRO DeepSpeed keeps the "
            f"fp32 master weights where the export cannot read them (it would write the {precision} copy)"
        )


def apply_run_optimizer_settings(ds: dict[str, Any], cfg: RunConfig) -> None:
    """The run config's optimizer settings into ``ds`` (in place): ``gradient_accumulation_steps``, ``grad_norm`` ->
    ``gradient_clipping`` (-1 = none), ``weight_decay`` and ``betas`` of the optimizer, where the run config gives
    them."""
    if cfg.gradient_accumulation_steps is not None:
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    if cfg.grad_norm is not None:
        ds["gradient_clipping"] = 0.0 if cfg.grad_norm == -1 else float(cfg.grad_norm)
    optimizer = ds.get("optimizer")
    if isinstance(optimizer, dict):
        params = optimizer.setdefault("params", {})
        if cfg.weight_decay is not None:
            params["weight_decay"] = cfg.weight_decay
        if cfg.betas is not None:
            params["betas"] = list(cfg.betas)


DS_SECTIONS = ("optimizer", "bf16", "fp16", "zero_optimization")
"""The ``ds.json`` sections that are JSON objects (``{"enabled": true}``, not ``true``)."""
DS_NUMBERS = ("gradient_clipping", "optimizer.params.weight_decay", "optimizer.params.eps")


def check_ds_types(ds: dict[str, Any], source: str) -> None:
    """A ``ConfigError`` naming ``source`` and the key where ``ds`` has a value of the wrong JSON type for what this
    project reads of it (sections, the optimizer's type, numbers, ``betas``); DeepSpeed's own reader checks the rest
    (:mod:`uniter_fast.training.ds_keys`)."""
    for key in DS_SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f'{source}: {key} must be a JSON object (e.g. {{"enabled": true}}), got {ds[key]!r}')
    optimizer = ds.get("optimizer", {})
    if "type" in optimizer and not isinstance(optimizer["type"], str):
        raise ConfigError(f"{source}: optimizer.type must be a string ('AdamW'), got {optimizer['type']!r}")
    params = optimizer.get("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: optimizer.params must be a JSON object, got {params!r}")
    for path in DS_NUMBERS:
        node: Any = ds
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None and not is_number(node):
            raise ConfigError(f"{source}: {path} must be a number, got {node!r}")
    betas = params.get("betas")
    if betas is not None and not valid_betas(betas):
        raise ConfigError(f"{source}: optimizer.params.betas must be two numbers in [0, 1), got {betas!r}")


def complete_ds_config(ds: dict[str, Any], cfg: RunConfig, source: str = "ds config") -> dict[str, Any]:
    """``ds`` checked and completed for the run ``cfg`` (``ds`` itself is not modified): the run config's optimizer
    settings applied (:func:`apply_run_optimizer_settings`), the optimizer lr set from ``learning_rate``,
    ``train_micro_batch_size_per_gpu`` = 1 (one token-budgeted batch per micro-step); bf16 / fp16 turned off (with a
    warning) where the accelerator does not support them. Keys that belong to the run config are errors."""
    if not isinstance(ds, dict):
        raise TypeError(f"{source} must be a JSON object, got {type(ds).__name__}")
    check_ds_types(ds, source)
    ds = copy.deepcopy(ds)
    apply_run_optimizer_settings(ds, cfg)
    for key, why in FORBIDDEN_DS_KEYS.items():
        if key in ds:
            raise ValueError(f"{source}: remove {key!r}: {why}")
    optimizer = ds.get("optimizer")
    if not isinstance(optimizer, dict) or optimizer.get("type", "").lower() != "adamw":
        raise ValueError(f"{source}: 'optimizer' must be {{'type': 'AdamW', 'params': {{...}}}}, got {optimizer!r}")
    params = optimizer.setdefault("params", {})
    if "lr" in params:
        raise ValueError(f"{source}: remove optimizer.params.lr; learning_rate is set in the training config")
    params["lr"] = cfg.learning_rate
    micro = ds.setdefault("train_micro_batch_size_per_gpu", 1)
    if micro != 1 or isinstance(micro, bool):
        raise ValueError(
            f"{source}: train_micro_batch_size_per_gpu must be 1 (batches are token budgets), got {micro!r}"
        )
    gas = ds.setdefault("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or gas < 1:
        raise ValueError(f"{source}: gradient_accumulation_steps must be an integer >= 1, got {gas!r}")
    _fit_precision(ds, source)
    return ds


def _fit_precision(ds: dict[str, Any], source: str) -> None:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if ds.get("fp16", {}).get("enabled") and not accel.is_fp16_supported():
        logger.warning("%s: fp16 is not supported on %s; using bf16 or fp32", source, accel.device_name())
        ds["fp16"]["enabled"] = False
        ds.setdefault("bf16", {})["enabled"] = True
    if ds.get("bf16", {}).get("enabled") and not accel.is_bf16_supported():
        logger.warning("%s: bf16 is not supported on %s; training in fp32", source, accel.device_name())
        ds["bf16"]["enabled"] = False
    if ds.get("bf16", {}).get("enabled") and accel.device_name() == "cpu" and not cpu_has_native_bf16():
        logger.warning(
            "%s: this CPU has no native bf16 (AVX512-BF16 / AMX), where bf16 runs ~3x slower; training in fp32", source
        )
        ds["bf16"]["enabled"] = False


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (oneDNN's test: AVX512-BF16 or AMX); without, bf16 is emulated."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return True if probe is None else bool(probe())


def build_engine(
    model: UniterPreTrainedModel,
    cfg: RunConfig,
    ds_config: dict[str, Any],
    lr_mul: float = 1.0,
    head_names: tuple[str, ...] = (),
) -> Any:
    """``deepspeed.initialize`` with the original's no-decay parameter groups and LR schedule (``cfg`` needs
    ``learning_rate``, ``warmup_steps`` and ``num_train_steps``); ``lr_mul`` / ``head_names`` give task heads their
    own learning-rate multiplier (see :func:`param_groups`). Under ZeRO-3 the model's external parameters are
    registered (:func:`uniter_fast.training.zero.register_external_parameters`), and the fused encoder layer is
    refused (it reads its blocks' Linear / LayerNorm parameters outside their forwards, which ZeRO-3 does not
    gather). Its ranks' shared-memory names are released (:func:`release_shm_workspace`). Returns the engine."""
    stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
    if stage == 3 and getattr(getattr(model, "config", None), "encoder_layer_backend", None) == "triton":
        raise ValueError(
            "encoder_layer_backend 'triton' cannot run under ZeRO-3 (the fused layer reads parameters that ZeRO-3 "
            "gathers only inside their own modules' forwards); use ZeRO-1/2, or encoder_layer_backend 'reference'"
        )
    import deepspeed

    weight_decay = float(ds_config["optimizer"]["params"].get("weight_decay", 0.0))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, weight_decay, lr_mul, head_names),
        config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.learning_rate, cfg.warmup_steps, cfg.num_train_steps),
    )
    if engine.zero_optimization_partition_weights():
        register_external_parameters(model)
    release_shm_workspace()
    return engine
