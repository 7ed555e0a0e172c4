"""The fused element-wise parts of an encoder layer (``encoder_layer_backend="triton"``), and their references.

- :func:`bias_gelu`: ``gelu(x + b)`` after the intermediate matmul (run without its bias), one kernel each way;
- :func:`bias_dropout_add_layer_norm`: ``LayerNorm(dropout(x + b) + residual)`` after the attention-output and output
  matmuls, one kernel each way;
- :func:`qkv_projection`: query, key and value as one matmul of the three weights concatenated at each call (so the
  checkpoint keys and the optimizer's parameters stay the three original ones).

Dropout draws a fresh Philox seed from torch's generator of the tensors' device at each call (:func:`draw_seed`), so
a run resumed from saved RNG states draws the same seeds and masks; :func:`dropout_keep` writes the mask a seed gives,
and the references given that mask compute the same values. Kernels in :mod:`uniter_fast.kernels.fused_layer`.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.nn.functional as F

from uniter_fast.kernels import fused_layer as kernels


def draw_seed(device: torch.device) -> torch.Tensor:
    """A Philox seed drawn from torch's default generator of ``device``: int64 [1] on ``device`` (no host sync)."""
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


@functools.cache
def _unused_seed(device: torch.device) -> torch.Tensor:
    """The seed argument of a call without dropout (never read): one int64 [1] per device, not a launch per call."""
    return torch.zeros(1, dtype=torch.int64, device=device)


def dropout_keep(seed: torch.Tensor, shape: torch.Size, p: float) -> torch.Tensor:
    """The keep mask (bool, ``shape``) the fused kernels draw for element ``i`` of a contiguous tensor: rand(seed, i)
    >= p. seed: int64 [1] on the device of the result."""
    numel = 1
    for size in shape:
        numel *= size
    keep = torch.empty(numel, dtype=torch.int8, device=seed.device)
    grid = (_cdiv(numel, kernels.ELEMENT_BLOCK),)
    kernels.dropout_mask_kernel[grid](seed, keep, numel, p, BLOCK=kernels.ELEMENT_BLOCK)
    return keep.view(shape).bool()


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b)."""
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------- references
def bias_gelu_reference(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias), erf form. x: [..., N]; bias: [N]. Returns x's shape and dtype."""
    return F.gelu(x + bias.to(x.dtype))


def bias_dropout_add_layer_norm_reference(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    keep: torch.Tensor | None = None,
    p: float = 0.0,
) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + residual) with the given ``keep`` mask (bool, x's shape; None: no dropout), as
    the eager layer computes it (dropout scales the kept entries by 1 / (1 - p)). x, residual: [..., H]."""
    h = x + bias.to(x.dtype)
    if keep is not None:
        h = h * keep.to(h.dtype) * (1.0 / (1.0 - p))
    return F.layer_norm(h + residual, weight.shape, weight, beta, eps)


# ------------------------------------------------------------------------------------------------------ kernels
def grads_needed(ctx: Any) -> tuple[bool, ...]:
    """Per leading tensor argument of a custom Function (in the backward): whether this backward pass uses its
    gradient. ``ctx.needs_input_grad`` is fixed at the forward; a backward that names its inputs
    (``torch.autograd.backward(..., inputs=...)``, the input-only backward of adversarial training's shared clean
    pass) runs only the nodes that lead to them, so a weight's gradient is skipped there. ``autograd.grad`` cannot be
    asked about leaves: they count as needed."""
    needed = []
    for need, (node, _) in zip(ctx.needs_input_grad, ctx.next_functions):
        try:
            needed.append(need and node is not None and torch._C._will_engine_execute_node(node))
        except RuntimeError:  # a leaf under autograd.grad
            needed.append(need)
    return tuple(needed)


class _BiasGelu(torch.autograd.Function):
    """gelu(x + bias): saves x and bias, recomputes x + bias in the backward kernel."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        y = torch.empty_like(x)
        numel, grid = x.numel(), (_cdiv(x.numel(), kernels.ELEMENT_BLOCK),)
        kernels.bias_gelu_fwd_kernel[grid](x, bias, y, numel, bias.numel(), BLOCK=kernels.ELEMENT_BLOCK)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        need_x, need_bias = grads_needed(ctx)
        x, bias = ctx.saved_tensors
        dy = dy.contiguous()
        dx = torch.empty_like(x)
        numel, grid = x.numel(), (_cdiv(x.numel(), kernels.ELEMENT_BLOCK),)
        kernels.bias_gelu_bwd_kernel[grid](x, bias, dy, dx, numel, bias.numel(), BLOCK=kernels.ELEMENT_BLOCK)
        dbias = dx.reshape(-1, bias.numel()).sum(0, dtype=torch.float32).to(bias.dtype) if need_bias else None
        return dx if need_x else None, dbias


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) in one kernel (forward and backward). x: [..., N] (fp32/bf16/fp16); bias: [N] (any float
    dtype; under autocast float32 beside a half x). Returns x's shape and dtype."""
    return _BiasGelu.apply(x, bias)


class _BiasDropoutAddLayerNorm(torch.autograd.Function):
    """LayerNorm(dropout(x + bias) + residual): saves z (float32), the row statistics and the seed (not the mask)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        bias: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        beta: torch.Tensor,
        eps: float,
        p: float,
        seed: torch.Tensor,
    ) -> torch.Tensor:
        width = x.shape[-1]
        x2, res2 = x.reshape(-1, width).contiguous(), residual.reshape(-1, width).contiguous()
        rows = x2.shape[0]
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, residual.dtype), weight.dtype)
        y = torch.empty((rows, width), dtype=out_dtype, device=x.device)
        z = torch.empty((rows, width), dtype=torch.float32, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty_like(mean)
        block = kernels.row_block(width)
        kernels.bias_dropout_add_ln_fwd_kernel[(rows,)](
            x2, bias, res2, weight, beta, y, z, mean, rstd, seed, width, p, eps,
            HAS_DROPOUT=p > 0, BLOCK=block, num_warps=kernels.row_warps(block),
        )  # fmt: skip
        ctx.save_for_backward(z, mean, rstd, weight, seed)
        ctx.p, ctx.shape, ctx.dtypes = p, x.shape, (x.dtype, bias.dtype, residual.dtype, beta.dtype)
        return y.view(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        need_x, need_bias, need_res, need_weight, need_beta = grads_needed(ctx)[:5]
        z, mean, rstd, weight, seed = ctx.saved_tensors
        x_dtype, bias_dtype, res_dtype, beta_dtype = ctx.dtypes
        rows, width = z.shape
        dy2 = dy.reshape(rows, width).contiguous()
        dx = torch.empty((rows, width), dtype=x_dtype, device=z.device)
        dres = torch.empty((rows, width), dtype=res_dtype, device=z.device)
        dyxhat = torch.empty_like(z)
        block = kernels.row_block(width)
        kernels.bias_dropout_add_ln_bwd_kernel[(rows,)](
            dy2, z, mean, rstd, weight, seed, dx, dres, dyxhat, width, ctx.p,
            HAS_DROPOUT=ctx.p > 0, BLOCK=block, num_warps=kernels.row_warps(block),
        )  # fmt: skip
        dbias = dx.sum(0, dtype=torch.float32).to(bias_dtype) if need_bias else None
        dweight = dyxhat.sum(0).to(weight.dtype) if need_weight else None
        dbeta = dy2.sum(0, dtype=torch.float32).to(beta_dtype) if need_beta else None
        dx, dres = dx.view(ctx.shape) if need_x else None, dres.view(ctx.shape) if need_res else None
        return dx, dbias, dres, dweight, dbeta, None, None, None


def bias_dropout_add_layer_norm(
    x: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    p: float = 0.0,
    seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(x + bias) + residual) · weight + beta in one kernel each way.

    x: [..., H] (the matmul output, fp32/bf16/fp16); residual: [..., H]; bias, weight, beta: [H]. ``p`` > 0 needs
    ``seed`` (int64 [1] on x's device, :func:`draw_seed`); the mask is :func:`dropout_keep` (seed, x.shape, p).
    Returns [..., H] in the promoted dtype of x, residual and weight (float32 under autocast with float32 weights,
    as the eager LayerNorm gives), statistics in float32.
    """
    if p > 0 and seed is None:
        raise ValueError("bias_dropout_add_layer_norm: dropout p > 0 needs a seed (draw_seed)")
    if seed is None:
        seed = _unused_seed(x.device)
    return _BiasDropoutAddLayerNorm.apply(x, bias, residual, weight, beta, eps, p, seed)


def qkv_projection(
    hidden: torch.Tensor, linears: tuple[torch.nn.Linear, torch.nn.Linear, torch.nn.Linear]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query, key, value [..., H] each, from one matmul of hidden [..., H] with the three weights concatenated at this
    call (a fresh ``torch.cat``, so an optimizer step that updates the three parameters is always seen)."""
    weight = torch.cat([linear.weight for linear in linears])
    bias = torch.cat([linear.bias for linear in linears])
    return F.linear(hidden, weight, bias).chunk(3, dim=-1)
