"""The Triton row ops of the chunk loop: launch the kernels of :mod:`uniter_fast.kernels.fused_linear_losses`.

Same contract as :mod:`uniter_fast.losses.chunked` (per-row float32 loss, logits overwritten with the
gradient). On CUDA tensors the kernels compile for the GPU; on CPU tensors they run only under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

from typing import Any

import torch

from uniter_fast.kernels import fused_linear_losses as k
from uniter_fast.losses.fused_linear import RowOp


def _launch_shape(logits: torch.Tensor) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK, num_warps) for one program per row of ``logits`` [R, C]."""
    block = k.block_size(logits.shape[1])
    return (logits.shape[0],), block, k.num_warps(block)


def _rows(kernel: Any, logits: torch.Tensor, *target: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the row ``kernel`` on logits [R, C] (stride-1 columns) and its ``target`` arguments: (per-row float32
    loss [R], ``logits`` overwritten with the gradient)."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grid, block, warps = _launch_shape(logits)
    kernel[grid](logits, logits.stride(0), *target, loss, logits.shape[1], BLOCK=block, num_warps=warps)
    return loss, logits


def _ce_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy rows of logits [R,C] (stride-1 columns) vs labels [R] int64 via ``ce_rows_kernel``."""
    return _rows(k.ce_rows_kernel, logits, labels.contiguous())


def _kl_rows(logits: torch.Tensor, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(soft ‖ softmax(logits)) rows of logits [R,C] vs soft labels [R,C] via ``kl_rows_kernel``."""
    soft = soft.contiguous()
    return _rows(k.kl_rows_kernel, logits, soft, soft.stride(0))


def _mse_rows(pred: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-error rows of pred [R,C] vs targets [R,C] via ``mse_rows_kernel``."""
    targets = targets.contiguous()
    return _rows(k.mse_rows_kernel, pred, targets, targets.stride(0))


ROW_OPS: dict[str, RowOp] = {
    "ce": RowOp("ce", _ce_rows, per_element=False),
    "kl": RowOp("kl", _kl_rows, per_element=True),
    "mse": RowOp("mse", _mse_rows, per_element=True),
}
