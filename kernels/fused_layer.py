"""Triton kernels of the fused encoder layer: bias + erf GELU, and bias + dropout + residual + LayerNorm.

They run after the cuBLAS matmuls of the layer (the matmuls themselves stay in cuBLAS, without their bias):

- ``bias_gelu_*``: ``y = gelu(x + b)`` (the exact, erf GELU UNITER uses), element-wise over x [T, N] in blocks of
  ``BLOCK`` elements; the backward writes ``dx = dy · gelu'(x + b)`` (db is its column sum, in PyTorch).
- ``bias_dropout_add_ln_*``: one program per row of x [T, H]: ``z = dropout(x + b) + residual``,
  ``y = LayerNorm(z) · w + beta``, with z, the row's mean and 1/std kept for the backward, which recomputes the mask
  and writes d residual = dz and dx = dz · mask / (1 - p) (plus dy · x̂ for the LayerNorm weight's gradient, summed
  over rows in PyTorch).

Arithmetic is float32 whatever the storage dtype. The dropout mask of element ``r·H + c`` is ``tl.rand(seed, r·H + c)
>= p`` (Philox), the seed an int64 read from a one-element device tensor that the caller draws from torch's generator
for each call (no host sync, and graph-capturable), so the same seed gives the same mask in the forward, the
backward and :func:`dropout_mask_kernel`, which writes the mask for the reference path and the tests.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Elements per program of the element-wise kernels.
ELEMENT_BLOCK = 1024


def row_block(columns: int) -> int:
    """The row tile of the LayerNorm kernels: the next power of two of ``columns`` (the whole row in one tile)."""
    return triton.next_power_of_2(columns)


def row_warps(block: int) -> int:
    """Warps per program of the row kernels: 4 values per thread from 1024 columns up (with 4 warps and dropout the
    backward spilled on sm_90a), else 4 warps."""
    return max(4, min(16, block // 128))


@triton.jit
def bias_gelu_fwd_kernel(x_ptr, b_ptr, y_ptr, numel, n_cols, BLOCK: tl.constexpr):
    """y = gelu(x + b[col]) over a flat [T, N] block of ``BLOCK`` elements."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    y = 0.5 * u * (1.0 + tl.erf(u * 0.7071067811865476))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_gelu_bwd_kernel(x_ptr, b_ptr, dy_ptr, dx_ptr, numel, n_cols, BLOCK: tl.constexpr):
    """dx = dy · (Φ(u) + u·φ(u)), u = x + b[col]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    u = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u += tl.load(b_ptr + offs % n_cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(u * 0.7071067811865476))
    pdf = tl.exp(-0.5 * u * u) * 0.3989422804014327
    tl.store(dx_ptr + offs, (dy * (cdf + u * pdf)).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dropout_mask_kernel(seed_ptr, keep_ptr, numel, p, BLOCK: tl.constexpr):
    """keep[i] = rand(seed, i) >= p: the mask the fused kernels draw, for the reference path and the tests."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    seed = tl.load(seed_ptr)
    keep = tl.rand(seed, offs.to(tl.uint32)) >= p
    tl.store(keep_ptr + offs, keep.to(tl.int8), mask=mask)


@triton.jit
def bias_dropout_add_ln_fwd_kernel(
    x_ptr,
    b_ptr,
    res_ptr,
    w_ptr,
    beta_ptr,
    y_ptr,
    z_ptr,
    mean_ptr,
    rstd_ptr,
    seed_ptr,
    n_cols,
    p,
    eps,
    HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row r: z = dropout(x + b) + residual (kept in float32), y = (z - mean) · rstd · w + beta."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    h = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), offs.to(tl.uint32)) >= p
        h = tl.where(keep, h / (1.0 - p), 0.0)
    z = h + tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(z, 0) / n_cols
    centred = tl.where(mask, z - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, (centred * rstd * w + beta).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(z_ptr + offs, z, mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def bias_dropout_add_ln_bwd_kernel(
    dy_ptr,
    z_ptr,
    mean_ptr,
    rstd_ptr,
    w_ptr,
    seed_ptr,
    dx_ptr,
    dres_ptr,
    dyxhat_ptr,
    n_cols,
    p,
    HAS_DROPOUT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Row r: dz = rstd · (w·dy − mean(w·dy) − x̂ · mean(w·dy·x̂)); d residual = dz; dx = dz · mask / (1 − p);
    dy·x̂ (float32) for the LayerNorm weight's gradient."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    offs = row * n_cols + cols
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + row)
    xhat = tl.where(mask, (z - tl.load(mean_ptr + row)) * rstd, 0.0)
    wdy = dy * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dz = rstd * (wdy - tl.sum(wdy, 0) / n_cols - xhat * (tl.sum(wdy * xhat, 0) / n_cols))
    tl.store(dres_ptr + offs, dz.to(dres_ptr.dtype.element_ty), mask=mask)
    tl.store(dyxhat_ptr + offs, dy * xhat, mask=mask)
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), offs.to(tl.uint32)) >= p
        dz = tl.where(keep, dz / (1.0 - p), 0.0)
    tl.store(dx_ptr + offs, dz.to(dx_ptr.dtype.element_ty), mask=mask)


#: (storage of the matmul output x, storage of bias / residual / LayerNorm weights, storage of y): the same dtype
#: throughout, or autocast's half-precision matmul output beside float32 parameters and residual stream.
_COMBOS = {
    "fp32": ("*fp32", "*fp32", "*fp32"),
    "bf16": ("*bf16", "*bf16", "*bf16"),
    "bf16_amp": ("*bf16", "*fp32", "*fp32"),
    "fp16_amp": ("*fp16", "*fp32", "*fp32"),
}
#: Row widths of the UNITER launches: hidden 768 (base) and 1024 (large).
_HIDDEN = (768, 1024)


def aot_specs() -> list:
    """The launch configurations the fused layer uses (kernel × dtypes × tile), for the AOT report."""
    from uniter_fast.kernels.aot import AotSpec

    specs = []
    for name, (x, param, out) in _COMBOS.items():
        elementwise = {"numel": "i32", "n_cols": "i32", "BLOCK": "constexpr"}
        block = {"BLOCK": ELEMENT_BLOCK}
        specs.append(
            AotSpec(
                f"bias_gelu_fwd_{name}",
                bias_gelu_fwd_kernel,
                {"x_ptr": x, "b_ptr": param, "y_ptr": x, **elementwise},
                block,
            )
        )
        specs.append(
            AotSpec(
                f"bias_gelu_bwd_{name}",
                bias_gelu_bwd_kernel,
                {"x_ptr": x, "b_ptr": param, "dy_ptr": x, "dx_ptr": x, **elementwise},
                block,
            )
        )
        for width in sorted({row_block(h) for h in _HIDDEN}):
            for dropout in (True, False):
                consts = {"HAS_DROPOUT": dropout, "BLOCK": width}
                tag = f"{name}_b{width}{'_dropout' if dropout else ''}"
                forward = {
                    "x_ptr": x,
                    "b_ptr": param,
                    "res_ptr": out,
                    "w_ptr": param,
                    "beta_ptr": param,
                    "y_ptr": out,
                    "z_ptr": "*fp32",
                    "mean_ptr": "*fp32",
                    "rstd_ptr": "*fp32",
                    "seed_ptr": "*i64",
                    "n_cols": "i32",
                    "p": "fp32",
                    "eps": "fp32",
                    "HAS_DROPOUT": "constexpr",
                    "BLOCK": "constexpr",
                }
                backward = {
                    "dy_ptr": out,
                    "z_ptr": "*fp32",
                    "mean_ptr": "*fp32",
                    "rstd_ptr": "*fp32",
                    "w_ptr": param,
                    "seed_ptr": "*i64",
                    "dx_ptr": x,
                    "dres_ptr": out,
                    "dyxhat_ptr": "*fp32",
                    "n_cols": "i32",
                    "p": "fp32",
                    "HAS_DROPOUT": "constexpr",
                    "BLOCK": "constexpr",
                }
                warps = row_warps(width)
                specs.append(AotSpec(f"ln_fwd_{tag}", bias_dropout_add_ln_fwd_kernel, forward, consts, warps))
                specs.append(AotSpec(f"ln_bwd_{tag}", bias_dropout_add_ln_bwd_kernel, backward, consts, warps))
    specs.append(
        AotSpec(
            "dropout_mask",
            dropout_mask_kernel,
            {"seed_ptr": "*i64", "keep_ptr": "*i8", "numel": "i32", "p": "fp32", "BLOCK": "constexpr"},
            {"BLOCK": ELEMENT_BLOCK},
        )
    )
    return specs
