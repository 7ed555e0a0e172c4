"""Reference losses: plain PyTorch, exactly the original UNITER heads' final projection + loss (``model/pretrain.py``).

These are the oracle for the fused paths. Each returns a 0-dim float32 tensor; zero rows give 0.0 with zero
gradients (the original's mean over an empty tensor would be NaN, which never happens there because at least one
token/region is always masked). ``weights`` [M] (1 for a real row, 0 for a fixed-shape batch's padding row,
``uniter_fast.data.buckets``) make the mean one over the real rows only (:func:`weighted_mean`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def weighted_mean(values: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``values.mean()`` [M] or [M, C], or with ``weights`` [M] (0 / 1) the mean over the rows of weight 1:
    Σ w_i · values_i / (Σ w · C). Rows of weight 0 must be finite; they add exactly 0 to the value and the gradient.
    Computed on the device (no host sync); 0-dim, in the promoted dtype of ``values`` and ``weights``."""
    if weights is None:
        return values.mean()
    row_weights = weights.view(-1, *([1] * (values.dim() - 1)))
    per_row = values[0].numel() if values.dim() > 1 else 1
    return (values * row_weights).sum() / (weights.sum() * per_row)


def cross_entropy_mean(
    logits: torch.Tensor, targets: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [N, C] (taken in fp32) against ``targets`` int64 [N]: ``F.cross_entropy``'s mean
    over the rows (the task heads' loss), or with ``weights`` [N] (0 / 1, a fixed-shape batch's
    ``example_weights``) the mean over the rows of weight 1 (:func:`weighted_mean`). 0-dim float32."""
    if weights is None:
        return F.cross_entropy(logits.float(), targets)
    return weighted_mean(F.cross_entropy(logits.float(), targets, reduction="none"), weights)


def empty_loss(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """0.0 (float32, 0-dim) still connected to ``hidden``, ``weight`` and ``bias`` so backward gives zero gradients."""
    return (hidden.sum() * 0 + weight.sum() * 0 + bias.sum() * 0).float()


def mrc_targets(soft_labels: torch.Tensor) -> torch.Tensor:
    """MRC hard target of soft labels [M, C]: argmax over classes 1..C-1, plus 1 (background never wins); [M] int64."""
    return soft_labels[:, 1:].argmax(dim=-1) + 1


Weights = Optional[torch.Tensor]


def mlm_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, weights: Weights = None
) -> torch.Tensor:
    """Mean CE of ``F.linear(hidden [M,H], weight [V,H], bias [V])`` against ``labels`` [M] int64; 0-dim float32."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    logits = F.linear(hidden, weight, bias)
    return weighted_mean(F.cross_entropy(logits, labels, reduction="none"), weights).float()


def mrfr_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor, weights: Weights = None
) -> torch.Tensor:
    """Mean over M×D of ``(hidden @ weight + bias - targets)**2``; hidden [M,H], weight [H,D], targets [M,D]."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    pred = F.linear(hidden, weight.t(), bias)
    return weighted_mean(F.mse_loss(pred, targets.to(pred.dtype), reduction="none"), weights).float()


def mrc_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, soft_labels: torch.Tensor, weights: Weights = None
) -> torch.Tensor:
    """Mean CE of ``F.linear(hidden, weight [C,H], bias [C])`` against :func:`mrc_targets` of ``soft_labels`` [M,C]."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    logits = F.linear(hidden, weight, bias)
    ce = F.cross_entropy(logits, mrc_targets(soft_labels), ignore_index=0, reduction="none")
    return weighted_mean(ce, weights).float()


def mrc_kl_loss(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, soft_labels: torch.Tensor, weights: Weights = None
) -> torch.Tensor:
    """Mean over M×C of ``kl_div(log_softmax(F.linear(hidden, weight, bias)), soft_labels)``; 0-dim float32."""
    if hidden.shape[0] == 0:
        return empty_loss(hidden, weight, bias)
    logits = F.linear(hidden, weight, bias)
    log_probs = F.log_softmax(logits, dim=-1)
    return weighted_mean(F.kl_div(log_probs, soft_labels.to(log_probs.dtype), reduction="none"), weights).float()
