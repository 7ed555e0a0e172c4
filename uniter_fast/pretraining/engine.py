"""DeepSpeed set-up for pretraining: process-group environment, the ``ds.json`` checks, and the engine.

The training config owns the learning rate and its schedule (``learning_rate``, ``warmup_steps``,
``num_train_steps``, as the original ``pretrain-*.json``); ``ds.json`` owns the optimizer's other settings, the
precision, ZeRO, clipping and ``gradient_accumulation_steps``. The checks below keep the two from contradicting each
other.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
from typing import Any, Optional

import torch

from uniter_fast.pretraining.config import TrainingConfig
from uniter_fast.pretraining.optim import build_scheduler, param_groups

logger = logging.getLogger(__name__)

FORBIDDEN_DS_KEYS = {
    "scheduler": "the LR schedule is the original linear warm-up/decay of optim.py, set by learning_rate, "
    "warmup_steps and num_train_steps in the training config",
    "train_batch_size": "the batch size is a per-rank token budget, train_batch_size of the training config",
}


def setup_environment() -> None:
    """Make ``python pretrain.py`` work like a launcher-started rank 0 of 1, and pick the CPU accelerator of DeepSpeed
    when there is no GPU (must run before ``import deepspeed``)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        defaults["MASTER_PORT"] = str(port)
        for key, value in defaults.items():
            os.environ.setdefault(key, value)


def init_ranks(seed: int, num_workers: Optional[int]) -> tuple[int, int, int]:
    """After ``setup_environment``: one PyTorch thread per CPU rank (unless ``OMP_NUM_THREADS`` is set; more threads
    oversubscribe the cores, 10x slower on a shared machine), DeepSpeed's process group, warnings-only logging off
    rank 0, every RNG seeded. Returns (rank, world size, loader workers: ``num_workers``, else 2 on GPU, 0 on CPU)."""
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    import deepspeed

    from uniter_fast.pretraining.trainer import seed_everything

    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(seed)
    workers = num_workers if num_workers is not None else (2 if torch.cuda.is_available() else 0)
    return rank, world, workers


def load_ds_config(path: str, cfg: TrainingConfig) -> dict[str, Any]:
    """Read ``ds.json``, check it, and complete it for this run.

    Sets the optimizer lr from the training config and ``train_micro_batch_size_per_gpu`` = 1 (one token-budgeted
    batch per micro-step); turns bf16 / fp16 off (with a warning) where the accelerator does not support them.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            ds = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"DeepSpeed config {path!r} is not valid JSON: {err}") from None
    return complete_ds_config(ds, cfg, source=path)


def complete_ds_config(ds: dict[str, Any], cfg: TrainingConfig, source: str = "ds config") -> dict[str, Any]:
    """See :func:`load_ds_config`; ``ds`` is not modified."""
    ds = copy.deepcopy(ds)
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
    if micro != 1:
        raise ValueError(f"{source}: train_micro_batch_size_per_gpu must be 1 (batches are token budgets), got {micro}")
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
    model: torch.nn.Module,
    cfg: TrainingConfig,
    ds_config: dict[str, Any],
    lr_mul: float = 1.0,
    head_names: tuple[str, ...] = (),
) -> Any:
    """``deepspeed.initialize`` with the original's no-decay parameter groups and LR schedule (``cfg`` needs
    ``learning_rate``, ``warmup_steps`` and ``num_train_steps``); ``lr_mul`` / ``head_names`` give task heads their
    own learning-rate multiplier (see :func:`param_groups`). Returns the engine."""
    import deepspeed

    weight_decay = float(ds_config["optimizer"]["params"].get("weight_decay", 0.0))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, weight_decay, lr_mul, head_names),
        config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.learning_rate, cfg.warmup_steps, cfg.num_train_steps),
    )
    return engine
