"""Triton row kernels of the fused masked-position losses (MLM / MRC cross-entropy, MRC-kl, MRFR squared error).

One program per row of a chunk of logits [R, C] (C = 28996, 1601 or 2048), looping over C in tiles of ``BLOCK``:
pass 1 reads the row once (online max / sum-exp for the softmax losses, in float32) and writes the row's loss;
pass 2 overwrites the logits in place with d (row loss) / d logits. The mean's 1/N is applied later, to the
accumulated gradients, so that float16 gradients do not underflow. The GEMMs
around them (logits = x Wᵀ + b, grad_x, grad_W) stay in cuBLAS (:mod:`uniter_fast.losses.fused_linear`).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_BLOCK = 4096


def block_size(classes: int) -> int:
    """The column tile for a row of ``classes`` entries: next power of two, capped at :data:`MAX_BLOCK`."""
    return min(MAX_BLOCK, triton.next_power_of_2(classes))


def num_warps(block: int) -> int:
    """Warps per program for a ``block``-wide tile (8 from 2048 columns up, else 4)."""
    return 8 if block >= 2048 else 4


@triton.jit
def ce_rows_kernel(logits_ptr, stride, labels_ptr, loss_ptr, n_cols, BLOCK: tl.constexpr):
    """loss[r] = lse(z_r) − z_r[y_r]; z_r ← softmax(z_r) − onehot(y_r), in place."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    label = tl.load(labels_ptr + row)
    m = float("-inf")
    d = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    z_label = tl.load(ptr + label).to(tl.float32)
    tl.store(loss_ptr + row, lse - z_label)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse)
        grad = tl.where(cols == label, grad - 1.0, grad)
        tl.store(ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def kl_rows_kernel(logits_ptr, stride, soft_ptr, soft_stride, loss_ptr, n_cols, BLOCK: tl.constexpr):
    """loss[r] = Σ xlogy(p,p) − Σ p·z + (Σ p)·lse(z); z_r ← softmax(z_r)·Σ p − p, in place."""
    row = tl.program_id(0).to(tl.int64)
    ptr = logits_ptr + row * stride
    soft = soft_ptr + row * soft_stride
    m = float("-inf")
    d = 0.0
    mass = 0.0
    plogp = 0.0
    pz = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(soft + cols, mask=mask, other=0.0).to(tl.float32)
        z_max = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_max, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z_max - m_new), 0)
        m = m_new
        mass += tl.sum(p, 0)
        plogp += tl.sum(p * tl.log(tl.where(p > 0, p, 1.0)), 0)
        pz += tl.sum(p * z, 0)
    lse = m + tl.log(d)
    tl.store(loss_ptr + row, plogp - pz + mass * lse)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(soft + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(z - lse) * mass - p
        tl.store(ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


@triton.jit
def mse_rows_kernel(pred_ptr, stride, target_ptr, target_stride, loss_ptr, n_cols, BLOCK: tl.constexpr):
    """loss[r] = Σ (pred_r − t_r)²; pred_r ← 2·(pred_r − t_r), in place (one pass)."""
    row = tl.program_id(0).to(tl.int64)
    ptr = pred_ptr + row * stride
    target = target_ptr + row * target_stride
    acc = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        diff = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
        diff -= tl.load(target + cols, mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(diff * diff, 0)
        tl.store(ptr + cols, (2.0 * diff).to(pred_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + row, acc)


_DTYPES = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}
#: (kernel, column counts of its UNITER launches): MLM/MRC cross-entropy over 28996 or 1601 classes, MRC-kl over
#: 1601, MRFR over 2048 feature dims.
_LAUNCHES = (("ce", ce_rows_kernel, (28996, 1601)), ("kl", kl_rows_kernel, (1601,)), ("mse", mse_rows_kernel, (2048,)))


def _signature(kind: str, logits: str) -> dict[str, str]:
    """The Triton signature of kernel ``kind`` for logits of pointer type ``logits`` (targets/labels as stored)."""
    if kind == "ce":
        pointers = {"logits_ptr": logits, "stride": "i32", "labels_ptr": "*i64"}
    elif kind == "kl":
        pointers = {"logits_ptr": logits, "stride": "i32", "soft_ptr": "*fp32", "soft_stride": "i32"}
    else:
        pointers = {"pred_ptr": logits, "stride": "i32", "target_ptr": "*fp32", "target_stride": "i32"}
    return {**pointers, "loss_ptr": "*fp32", "n_cols": "i32", "BLOCK": "constexpr"}


def aot_specs() -> list:
    """The launch configurations the loss dispatcher uses (kernel × logits dtype × BLOCK), for the AOT report."""
    from uniter_fast.kernels.aot import AotSpec

    specs = []
    for kind, fn, column_counts in _LAUNCHES:
        for dtype, pointer in _DTYPES.items():
            for block in sorted({block_size(c) for c in column_counts}):
                specs.append(
                    AotSpec(
                        name=f"{kind}_rows_{dtype}_b{block}",
                        fn=fn,
                        signature=_signature(kind, pointer),
                        constexprs={"BLOCK": block},
                        num_warps=num_warps(block),
                    )
                )
    return specs
