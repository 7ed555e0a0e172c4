"""The Triton row ops of the chunk loop: launch the kernels of :mod:`uniter_fast.kernels.fused_linear_losses`.

Same contract as :mod:`uniter_fast.losses.chunked` (per-row float32 loss, logits overwritten with the
gradient). On CUDA tensors the kernels compile for the GPU; on CPU tensors they run only under
``TRITON_INTERPRET=1`` (tests).
"""

from __future__ import annotations

import torch

from uniter_fast.kernels import fused_linear_losses as k
from uniter_fast.losses.fused_linear import RowOp


def _launch_shape(logits: torch.Tensor) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK, num_warps) for one program per row of ``logits`` [R, C]."""
    block = k.block_size(logits.shape[1])
    return (logits.shape[0],), block, k.num_warps(block)


def _ce_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy rows of logits [R,C] (stride-1 columns) vs labels [R] int64 via ``ce_rows_kernel``."""
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grid, block, warps = _launch_shape(logits)
    k.ce_rows_kernel[grid](
        logits, logits.stride(0), labels.contiguous(), loss, logits.shape[1], BLOCK=block, num_warps=warps
    )
    return loss, logits


def _kl_rows(logits: torch.Tensor, soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(soft ‖ softmax(logits)) rows of logits [R,C] vs soft labels [R,C] via ``kl_rows_kernel``."""
    soft = soft.contiguous()
    loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grid, block, warps = _launch_shape(logits)
    k.kl_rows_kernel[grid](
        logits, logits.stride(0), soft, soft.stride(0), loss, logits.shape[1], BLOCK=block, num_warps=warps
    )
    return loss, logits


def _mse_rows(pred: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared-error rows of pred [R,C] vs targets [R,C] via ``mse_rows_kernel``."""
    targets = targets.contiguous()
    loss = torch.empty(pred.shape[0], dtype=torch.float32, device=pred.device)
    grid, block, warps = _launch_shape(pred)
    k.mse_rows_kernel[grid](
        pred, pred.stride(0), targets, targets.stride(0), loss, pred.shape[1], BLOCK=block, num_warps=warps
    )
    return loss, pred


ROW_OPS: dict[str, RowOp] = {
    "ce": RowOp("ce", _ce_rows, per_element=False),
    "kl": RowOp("kl", _kl_rows, per_element=True),
    "mse": RowOp("mse", _mse_rows, per_element=True),
}
