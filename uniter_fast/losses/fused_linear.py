"""The chunk loop shared by the fused backends: final projection + row loss + all gradients in one forward pass.

For each chunk of rows: ``logits = x @ Wᵀ + b`` (GEMM in the input dtype), then a row op turns the chunk's logits
into per-row losses and overwrites them with d (row loss) / d logits, and three more GEMM-shaped updates give
grad_x[chunk], grad_W += ... and grad_b += ... of the summed loss. Backward only multiplies the stored gradients by
the incoming gradient times the mean's 1/N (applied here rather than to the logits' gradient, where float16 would
underflow: KL gradients are ~1/C per entry, and 1/(M·C) of that is below float16's range). Peak extra memory is one
chunk of logits plus the gradient buffers, never the full [M, C] logits (Liger-Kernel's fused linear cross-entropy;
``src/liger_kernel/ops/fused_linear_cross_entropy.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Union

import torch

#: fn(logits [R,C] in the input dtype, target chunk) -> (per-row loss [R] float32, d row loss / d logits [R,C] in
#: the input dtype); the gradient may overwrite (alias) ``logits``.
RowFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


#: The most chunks a call is split into, and the fewest logits a chunk holds per device type: 16M on both (32 MB in
#: bf16; 578 rows of MLM logits). On an H200 a 4M floor (144 MLM rows per chunk) made the fused MLM loss 0.42x the
#: reference's speed at M = 1000 (bench/results/gpu_suite_nvidia_h200, first run): GEMMs of a hundred rows are slow.
CHUNKS = 8
CHUNK_ELEMENTS = {"cuda": 1 << 24, "cpu": 1 << 24}


@dataclass(frozen=True)
class RowOp:
    """A row-wise loss: ``fn`` computes loss and gradient; ``per_element`` means the mean is over M×C, not M."""

    name: str
    fn: RowFn
    per_element: bool

    def scale(self, rows: Union[int, torch.Tensor], classes: int) -> Union[float, torch.Tensor]:
        """The mean's normaliser 1/N for ``rows`` rows of ``classes`` columns (``rows`` a 0-dim tensor: the weighted
        rows' count, counted on the device)."""
        return 1.0 / (rows * classes if self.per_element else rows)


def chunk_rows(rows: int, classes: int, device: torch.device) -> int:
    """Rows per chunk on ``device``: at most :data:`CHUNKS` chunks, each with at least :data:`CHUNK_ELEMENTS` logits.

    Few large chunks keep the GEMMs efficient and the per-chunk grad_W update (a read + write of [C, H] in float32)
    rare. MLM's chunks hold 1/CHUNKS of the full [M, C] logits (or the floor, at small M); the small heads (MRC,
    MRC-kl, MRFR: C ≤ 2048) run as one chunk up to 2048 rows on GPUs and 8192 rows on CPUs.
    """
    least = CHUNK_ELEMENTS["cuda" if device.type == "cuda" else "cpu"]
    return max(1, math.ceil(rows / CHUNKS), least // classes)


_KEEP_GRADIENTS = [0]  # > 0 inside kept_gradients(); a global, as CUDA runs backward on the autograd engine's thread


@contextlib.contextmanager
def kept_gradients() -> Iterator[None]:
    """A backward inside this scope leaves each fused loss's stored gradients as they are (it scales copies), so that
    a second backward through the same graph can follow: the input-only backward of adversarial training's shared
    clean pass (``uniter_fast.training.adversarial``), before the step's full backward. Outside, a backward scales
    them in place and releases them: one backward per forward, no copy."""
    _KEEP_GRADIENTS[0] += 1
    try:
        yield
    finally:
        _KEEP_GRADIENTS[0] -= 1


class _FusedLinearLoss(torch.autograd.Function):
    """Autograd wrapper; gradients are computed in forward and scaled in backward (one backward per forward, or
    more inside :func:`kept_gradients`)."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        target: torch.Tensor,
        op: RowOp,
        transposed: bool,
        chunk: Optional[int],
        weights: Optional[torch.Tensor],
    ) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):  # the caller settled the dtypes
            total, grads = _forward_chunks(
                hidden, weight, bias, target, op, transposed, chunk, ctx.needs_input_grad, weights
            )
        ctx.grads = grads
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype)
        ctx.scale = op.scale(hidden.shape[0] if weights is None else weights.sum(), bias.shape[0])
        return total * ctx.scale

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss's gradients were already used: backward runs once per forward (outside kept_gradients)"
            )
        grads, keep = ctx.grads, _KEEP_GRADIENTS[0] > 0
        if not keep:
            ctx.grads = None
        factor = grad_out * ctx.scale
        scaled = [None if g is None else g * factor if keep else g.mul_(factor) for g in grads]
        out = tuple(None if g is None else g.to(d) for g, d in zip(scaled, ctx.dtypes))
        return (*out, None, None, None, None, None)


def _forward_chunks(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    op: RowOp,
    transposed: bool,
    chunk: Optional[int],
    needs_grad: tuple[bool, ...],
    weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, tuple[Optional[torch.Tensor], ...]]:
    """The chunk loop over the summed loss: (sum, 0-dim float32; (grad_x, grad_w, grad_b) of the sum).

    grad_w and grad_b are float32 accumulators; each gradient is None where ``needs_grad`` says it is not needed.
    ``weights`` [M] (0 / 1) scale each row's loss and gradient (a padding row adds exactly 0).
    """
    rows, classes = hidden.shape[0], bias.shape[0]
    w_ch = weight.t() if transposed else weight  # [C, H] view
    hidden = hidden.contiguous()
    grad_x = torch.empty_like(hidden) if needs_grad[0] else None
    grad_w = grad_b = None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    step = chunk or chunk_rows(rows, classes, hidden.device)
    for start in range(0, rows, step):
        x = hidden[start : start + step]
        logits = torch.addmm(bias, x, w_ch.t())
        row_loss, grad = op.fn(logits, target[start : start + step])
        if weights is not None:
            row_weights = weights[start : start + step]
            row_loss = row_loss * row_weights
            grad = grad.mul_(row_weights[:, None].to(grad.dtype))
        total += row_loss.sum()
        if grad_x is not None:
            torch.mm(grad, w_ch, out=grad_x[start : start + step])
        if needs_grad[1]:
            grad_w = _accumulate(grad_w, x.t(), grad) if transposed else _accumulate(grad_w, grad.t(), x)
        if needs_grad[2]:
            grad_b = _accumulate(grad_b, grad.t(), None)
    return total, (grad_x, grad_w, grad_b)


def _accumulate(acc: Optional[torch.Tensor], a: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """acc + a @ b (or + a.sum(1) when ``b`` is None) in float32; the first chunk (``acc`` None) starts it.

    Float32 products accumulate in place (``addmm_``); bf16/fp16 products on CUDA too, through cuBLAS's float32
    output (``addmm`` with ``out_dtype``, PyTorch ≥ 2.8), else through a chunk-sized product added to ``acc``.
    """
    if b is None:
        if acc is None:
            return a.sum(1, dtype=torch.float32)
        acc += a.sum(1, dtype=torch.float32)
        return acc
    if acc is None:
        acc = torch.zeros(a.shape[0], b.shape[1], dtype=torch.float32, device=a.device)
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _has_out_dtype_gemm():
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += a @ b
    return acc


@functools.cache
def _has_out_dtype_gemm() -> bool:
    """Whether this PyTorch has ``addmm(..., out_dtype=)`` (a half-precision GEMM with a float32 output)."""
    return hasattr(torch.ops.aten.addmm, "dtype_out")


def fused_linear_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    op: RowOp,
    transposed: bool = False,
    *,
    chunk: Optional[int] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean loss of ``op`` over ``hidden [M,H] @ weight[C,H]ᵀ + bias [C]`` (``weight`` [H,C] if ``transposed``).

    ``target`` is [M] int64 labels or [M, C] float targets, as ``op`` expects; hidden, weight and bias share a
    dtype. ``chunk`` overrides the rows per chunk (default :func:`chunk_rows`). ``weights`` [M] float32 (1 for a
    real row, 0 for padding) make it the mean over the real rows. Returns a 0-dim float32 tensor whose backward gives
    grads for hidden, weight and bias.
    """
    if chunk is not None and chunk < 1:
        raise ValueError(f"chunk must be a positive number of rows, got {chunk}")
    if not torch.is_grad_enabled():  # evaluation: loss only, no gradient work
        with torch.autocast(hidden.device.type, enabled=False):
            total = _forward_chunks(
                hidden, weight, bias, target, op, transposed, chunk, (False, False, False), weights
            )[0]
        return total * op.scale(hidden.shape[0] if weights is None else weights.sum(), bias.shape[0])
    return _FusedLinearLoss.apply(hidden, weight, bias, target, op, transposed, chunk, weights)
