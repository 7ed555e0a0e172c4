"""Reference losses: plain PyTorch, exactly the original UNITER heads' final projection + loss (``model/pretrain.py``).

These are the oracle for the fused paths. Each returns a 0-dim float32 tensor; zero rows give 0.0 with zero
gradients (the original's mean over an empty tensor would be NaN, which never happens there because at least one
token/region is always masked).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def empty_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """0.0 (float32, 0-dim) still connected to ``hidden``, ``weight`` and ``bias`` so backward gives zero gradients."""
    return (hidden.sum() * 0 + weight.sum() * 0 + bias.sum() * 0).float()


def mrc_targets(soft_labels: torch.Tensor) -> torch.Tensor:
    """MRC hard target of soft labels [M, C]: argmax over classes 1..C-1, plus 1 (background never wins); [M] int64."""
    return soft_labels[:, 1:].argmax(dim=-1) + 1


def mlm_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``F.linear(hidden [M,H], weight [V,H], bias [V])`` against ``labels`` [M] int64; 0-dim float32."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits, labels, reduction="none").mean().float()


def mrfr_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over M×D of ``(hidden @ weight + bias - targets)**2``; hidden [M,H], weight [H,D], targets [M,D]."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    pred = F.linear(hidden, weight.t(), bias)
    return F.mse_loss(pred, targets.to(pred.dtype), reduction="none").mean().float()


def mrc_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, soft_labels: torch.Tensor) -> torch.Tensor:
    """Mean CE of ``F.linear(hidden, weight [C,H], bias [C])`` against :func:`mrc_targets` of ``soft_labels`` [M,C]."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits, mrc_targets(soft_labels), ignore_index=0, reduction="none").mean().float()


def mrc_kl_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, soft_labels: torch.Tensor
) -> torch.Tensor:
    """Mean over M×C of ``kl_div(log_softmax(F.linear(hidden, weight, bias)), soft_labels)``; 0-dim float32."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    logits = F.linear(hidden, weight, bias)
    log_probs = F.log_softmax(logits, dim=-1)
    return F.kl_div(log_probs, soft_labels.to(log_probs.dtype), reduction="none").mean().float()
