"""The benches' ``original`` path: the original UNITER training step's maths and habits, as a configuration of this
project's model (no copy of the original code; what it does is described from ChenRocks/UNITER's ``model/model.py``,
``model/layer.py``, ``optim/adamw.py`` and ``pretrain.py``):

- eager attention (matmul, scale, additive -10000 mask, softmax, dropout, matmul): ``attention_backend="reference"``
  of the padded encoder;
- the erf GELU written out, ``x * 0.5 * (1 + erf(x / sqrt(2)))`` (``uniter_fast.model.activations``);
- the plain ("reference") losses and IPOT, on the padded layout (``fast=False``);
- :class:`OriginalAdamW`: the per-parameter loop of the original ``optim/adamw.py`` (no foreach, no fused kernel);
- gradient clipping at the recipe's norm (:data:`GRAD_NORM`, 2.0 in the original pretraining and fine-tuning configs);
- on CUDA, fp16 autocast with dynamic loss scaling (``torch.amp.GradScaler``: scale, unscale, inf check, skipped step
  on overflow), standing for apex O2's; on CPU, fp32 without scaling (no fp16 autocast there).

:func:`use_path` switches one model between the three paths' maths (``original``, ``reference``, ``fast``), so every
path runs the same weights.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from uniter_fast.model.activations import set_gelu

PATHS = ("original", "reference", "fast")
GRAD_NORM = 2.0  # "grad_norm" of the original config/pretrain-*.json and train-*.json


class OriginalAdamW(torch.optim.Optimizer):
    """AdamW as the original ``optim/adamw.py`` computes it, one parameter at a time: m, v updated in place;
    step size lr * sqrt(1 - b2^t) / (1 - b1^t); p -= step_size * m / (sqrt(v) + eps); then decoupled decay
    p -= lr * weight_decay * p (on the updated p)."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:
        """One update of every parameter with a gradient (``closure`` is not supported: pass None)."""
        if closure is not None:
            raise ValueError("OriginalAdamW.step takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                p.addcdiv_(exp_avg, denom, value=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


def use_path(model: nn.Module, path: str) -> None:
    """Set ``model`` (a UNITER pretraining or task model with ``.uniter`` and ``.fast``) to the maths of ``path``:
    ``original`` (padded, eager attention, written-out GELU), ``reference`` (padded, attention ``auto``: SDPA, one-
    kernel GELU) or ``fast`` (packed encoder and fused kernels)."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    model.fast = path == "fast"
    model.uniter.set_attention_backend("reference" if path == "original" else "auto")
    set_gelu(model, "original" if path == "original" else "fused")


def autocast_for(path: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """The autocast of ``path`` on ``device``: on CUDA fp16 for ``original`` (apex O2's half precision), bf16 for the
    others (DeepSpeed's bf16); on CPU none (fp32) for every path."""
    if device.type != "cuda":
        return contextlib.nullcontext
    dtype = torch.float16 if path == "original" else torch.bfloat16
    return lambda: torch.autocast("cuda", dtype=dtype)


def make_optimizer(path: str, groups: list[dict[str, Any]], device: torch.device) -> Any:
    """The optimizer of ``path`` over ``groups`` (the original parameter groups), lr 5e-5, betas (0.9, 0.98), eps
    1e-6: :class:`OriginalAdamW` for ``original``, else ``torch.optim.AdamW`` (fused on CUDA)."""
    if path == "original":
        return OriginalAdamW(groups, lr=5e-5, betas=(0.9, 0.98), eps=1e-6)
    return torch.optim.AdamW(groups, lr=5e-5, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda")


def make_step(
    model: nn.Module, optimizer: Any, path: str, loss_fn: Callable[[], torch.Tensor], device: torch.device
) -> Callable[[], None]:
    """One optimizer step of ``path``: zero_grad, forward (``loss_fn()`` returns the scalar loss) under the path's
    autocast, backward, then for ``original`` loss scaling (CUDA) and clipping at :data:`GRAD_NORM` before the step."""
    autocast = autocast_for(path, device)
    original = path == "original"
    scaler = torch.amp.GradScaler("cuda") if original and device.type == "cuda" else None
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def step() -> None:
        use_path(model, path)
        optimizer.zero_grad(set_to_none=not original)  # the original's PyTorch 1.x zero_grad zeroes in place
        with autocast():
            loss = loss_fn()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if original:
            torch.nn.utils.clip_grad_norm_(params, GRAD_NORM, foreach=False)  # per parameter, as 1.x
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    return step


def original_adversarial_step(engine: Any, batch: dict, task: str, cfg: Any, hidden_size: int) -> None:
    """One AFT micro-step with the released ``train_*_adv.py`` loop's habits (github.com/zhegan27/VILLA), for timing:
    the clean logits keep their graph and every backward is ``retain_graph=True``, so the KL back-propagates through
    the clean graph at each of the K steps (K + 1 forwards, 2K backward passes); the ascent is the released one
    (``uniter_fast.training.adversarial.ascend``). ``cfg``: an ``AdversarialConfig`` (not ``alter``); ``engine``:
    ``__call__(batch, task, with_logits=True)`` and ``backward(loss, retain_graph=...)``."""
    from uniter_fast.model.perturbation import with_deltas
    from uniter_fast.training.adversarial import ascend, symmetric_kl

    clean = engine(batch, task, with_logits=True)["logits"]
    ((text, image),) = cfg.branches
    deltas = {}
    if text:
        deltas["txt"] = torch.zeros(*batch["input_ids"].shape, hidden_size, device=batch["input_ids"].device)
    if image:
        deltas["img"] = torch.zeros_like(batch["img_feat"], dtype=torch.float32)
    for astep in range(cfg.adv_steps):
        for delta in deltas.values():
            delta.requires_grad_()
        out = engine(with_deltas(batch, deltas.get("txt"), deltas.get("img")), task, with_logits=True)
        loss = (out["loss"].float() + cfg.adv_kl_weight * symmetric_kl(clean, out["logits"])) / cfg.adv_steps
        engine.backward(loss, retain_graph=True)
        if astep + 1 < cfg.adv_steps:
            lrs = {"txt": cfg.adv_lr_txt, "img": cfg.adv_lr_img}
            deltas = {k: ascend(d.detach(), d.grad, lrs[k], cfg.norm_type, cfg.adv_max_norm) for k, d in deltas.items()}
