"""The CPU fused path: the row ops of the chunk loop (:mod:`uniter_fast.losses.fused_linear`) in PyTorch.

Each op works on one chunk of logits in float32 and returns the per-row loss and d (row loss) / d logits in the
logits' dtype, reusing the logits buffer where the dtype allows.
"""

from __future__ import annotations

import torch

from uniter_fast.losses.fused_linear import RowOp


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product of a, b [R, C] -> [R] (einsum runs it as a batched GEMM, faster than (a*b).sum(1))."""
    return torch.einsum("rc,rc->r", a, b)


def _ce_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CE per row of logits [R,C] vs labels [R] int64: (−log_softmax(z)[y] [R] fp32, softmax − onehot)."""
    log_probs = torch.log_softmax(logits.float(), dim=1)
    loss = log_probs.gather(1, labels[:, None]).squeeze(1).neg_()
    grad = log_probs.exp_()
    grad.scatter_add_(1, labels[:, None], torch.full_like(loss[:, None], -1.0))
    return loss, grad.to(logits.dtype)


def _kl_rows(logits: torch.Tensor, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_c kl_div(log_softmax(z), p) per row of logits [R,C] vs soft labels p [R,C], and its gradient.

    loss = Σ xlogy(p, p) − Σ p·log_softmax(z);  grad = softmax(z)·Σ p − p.
    """
    log_probs = torch.log_softmax(logits.float(), dim=1)
    p = soft.float()
    loss = torch.xlogy(p, p).sum(1) - _row_dot(p, log_probs)
    grad = log_probs.exp_().mul_(p.sum(1, keepdim=True)).sub_(p)
    return loss, grad.to(logits.dtype)


def _mse_rows(pred: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_c (pred − t)² per row of pred [R,C] vs targets [R,C], and its gradient 2·(pred − t)."""
    diff = pred.float().sub_(targets.float()) if pred.dtype != torch.float32 else pred.sub_(targets.float())
    return _row_dot(diff, diff), diff.mul_(2.0).to(pred.dtype)


ROW_OPS: dict[str, RowOp] = {
    "ce": RowOp("ce", _ce_rows, per_element=False),
    "kl": RowOp("kl", _kl_rows, per_element=True),
    "mse": RowOp("mse", _mse_rows, per_element=True),
}
