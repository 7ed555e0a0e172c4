"""Optimizer parameter groups and the learning-rate schedule of the original (``optim/misc.py``, ``optim/sched.py``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")
LR_FLOOR = 1e-8


def param_groups(
    model: nn.Module, weight_decay: float, lr_mul: float = 1.0, head_names: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """AdamW groups with the original name test: parameters whose name contains ``bias``, ``LayerNorm.bias`` or
    ``LayerNorm.weight`` get no decay, all others ``weight_decay``.

    The original quirk is kept on purpose: ``img_layer_norm.weight``, ``pos_layer_norm.weight``,
    ``feat_regress.net.2.weight`` and ``region_classifier.net.2.weight`` are LayerNorm weights whose names lack
    "LayerNorm", so they are decayed. Tied parameters appear once (``named_parameters`` de-duplicates them).

    With ``head_names`` (the task heads of ``train_vqa.py`` / ``train_re.py`` / ``train_vcr.py``, e.g.
    ``("vqa_output",)``) the parameters whose name contains one of them come first, in two groups of their own
    with ``lr_mul`` (their learning rate is ``lr_mul`` times the schedule's, see :func:`build_scheduler`): four
    groups in the original's order (head decay, head no-decay, rest decay, rest no-decay).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if lr_mul <= 0:
        raise ValueError(f"lr_mul must be > 0, got {lr_mul}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [(n, p) for n, p in named if any(h in n for h in head_names)]
    rest = [(n, p) for n, p in named if not any(h in n for h in head_names)]
    groups = []
    for part, mul in ((head, lr_mul), (rest, 1.0)):
        if part is head and not head_names:
            continue
        decay = [p for n, p in part if not any(nd in n for nd in NO_DECAY)]
        no_decay = [p for n, p in part if any(nd in n for nd in NO_DECAY)]
        groups += [
            {"params": decay, "weight_decay": weight_decay, "lr_mul": mul},
            {"params": no_decay, "weight_decay": 0.0, "lr_mul": mul},
        ]
    return groups


def lr_factor(step: int, warmup_steps: int, num_train_steps: int) -> float:
    """``warmup_linear`` of the original: step / warmup during warm-up, then (total - step) / (total - warmup)."""
    if step < warmup_steps:
        return step / warmup_steps
    if num_train_steps <= warmup_steps:
        return 1.0
    return max(0.0, (num_train_steps - step) / (num_train_steps - warmup_steps))


def lr_at(step: int, learning_rate: float, warmup_steps: int, num_train_steps: int) -> float:
    """The learning rate of optimizer step ``step`` (1-based, as ``get_lr_sched``), floored at 1e-8."""
    lr = learning_rate * lr_factor(step, warmup_steps, num_train_steps)
    return lr if lr > 0 else LR_FLOOR


def build_scheduler(
    optimizer: torch.optim.Optimizer, learning_rate: float, warmup_steps: int, num_train_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose k-th ``optimizer.step()`` (k = 1, 2, ...) runs at ``lr_at(k, ...)`` (times the group's
    ``lr_mul``, 1 when absent, as the head groups of the original task scripts).

    Every group's initial lr is set to ``learning_rate * lr_mul``. The scheduler is stepped after each optimizer step
    (DeepSpeed does so), so its epoch counter e maps to step e + 1.
    """
    if learning_rate <= 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
    if warmup_steps < 0 or num_train_steps <= 0:
        raise ValueError(f"need warmup_steps >= 0 and num_train_steps > 0, got {warmup_steps} and {num_train_steps}")
    for group in optimizer.param_groups:
        group["lr"] = learning_rate * group.get("lr_mul", 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: lr_at(e + 1, learning_rate, warmup_steps, num_train_steps) / learning_rate
    )
