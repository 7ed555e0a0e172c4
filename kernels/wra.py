"""The fused WRA distance in Triton: one program per pair, the forward in one launch, the backward in one launch.

Forward (``_wra_forward_kernel``). Phase 1 streams the pair's text rows [M, D] and region rows [N, D] once
(fp32/bf16/fp16, fp32 arithmetic) and builds the cosine cost C = 1 − diag(a) X Yᵀ diag(a'), a = 1 / max(|x|, eps),
by D rank-1 updates of a register tile (exact fp32 FMAs, no ``tl.dot``, which is TF32 on GPU), with the row norms on
the way. Phase 2 is the IPOT kernel (uniter_fast/kernels/ipot.py): the cost, reloaded from the ``cost`` buffer where
phase 1 left it, becomes the Gibbs kernel, the loop runs in registers (:func:`~uniter_fast.kernels.ipot.ipot_plan`),
the plan T is written, and the distance Σ C ⊙ T (C recovered as −β·log A). With ``save`` the rows' (a, f) factors,
f = a [|x| ≥ eps] / |x|, go to ``txt_stats``/``img_stats``: with the cost and the plan, all the backward needs.

Backward (``_wra_backward_kernel``). From T, C and the stats: ρ = Σ T ⊙ (1 − C) per row and column and the
coefficients c = f ρ; then per chunk of ``BLOCK_D`` embedding columns dX = g c X + G Y and
dY = g c' Y + Gᵀ X with G = −g diag(a) T diag(a') (rank-1 updates over the valid rows), reading each chunk of X and Y
once and writing the gradients once (zero at pad rows). See uniter_fast/ot/wra.py for the maths.

Tiles hold at most ``MAX_BLOCK × MAX_BLOCK`` per pair (larger inputs use the reference path: uniter_fast/backends.py).
The kernels assume rows that start on 16-byte boundaries with a width divisible by 4 (:func:`rows_aligned`; the
dispatcher pads other inputs), which gives each thread 4 adjacent columns in the backward's tiles.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from uniter_fast.kernels.aot import AotSpec
from uniter_fast.kernels.ipot import (
    MAX_BLOCK,
    _empty_aligned,
    block_sizes,
    ipot_plan,
    maxnreg_for,
    num_warps_for,
)

MIN_TILE = 64
"""Smallest tile side: UNITER pairs have 10-62 text tokens and 10-100 regions, so a batch's widths almost never fit
32, and fewer tile shapes keep the ahead-of-time compile (CI) short."""

BLOCK_D = 128
"""Embedding columns per step of the backward (its [rows, BLOCK_D] gradient accumulators)."""
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

__all__ = ["MAX_BLOCK", "aot_specs", "wra_backward_triton", "wra_forward_triton"]


@triton.jit
def _wra_forward_kernel(
    txt_ptr,
    img_ptr,
    txt_lens_ptr,
    img_lens_ptr,
    dist_ptr,
    cost_ptr,
    plan_ptr,
    txt_stats_ptr,
    img_stats_ptr,
    M,
    N,
    D,
    stride_txt_b,
    stride_txt_m,
    stride_img_b,
    stride_img_n,
    stride_cost_b,
    stride_cost_m,
    stride_plan_b,
    stride_plan_m,
    beta,
    eps,
    iteration,
    K,
    save,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    mv = tl.load(txt_lens_ptr + pid).to(tl.int32)
    nv = tl.load(img_lens_ptr + pid).to(tl.int32)

    # Phase 1, the cosine cost, in blocks of ROWS text rows: X Yᵀ as D rank-1 updates of a [ROWS, BLOCK_N]
    # accumulator (one column of X and of Y at a time; the rows come through L1) and the squared norms on the way.
    # The cost goes to the cost buffer (16-byte aligned rows) and phase 2 loads it as the IPOT kernel does, which
    # gives the iterations its register layout (4 adjacent columns per thread, no layout conversions in the loop).
    cols = tl.arange(0, BLOCK_N)
    y_base = img_ptr + pid * stride_img_b
    y_off = (cols * stride_img_n)[None, :]
    y_mask = (cols < nv)[None, :]
    for r0 in tl.static_range(0, BLOCK_M, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        x_base = txt_ptr + pid * stride_txt_b
        x_off = (rows * stride_txt_m)[:, None]
        x_mask = (rows < mv)[:, None]
        dots = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        sq_x = tl.zeros([ROWS, 1], dtype=tl.float32)
        sq_y = tl.zeros([1, BLOCK_N], dtype=tl.float32)
        for kk in range(0, D):
            xk = tl.load(x_base + (x_off + kk), mask=x_mask, other=0.0).to(tl.float32)
            yk = tl.load(y_base + (y_off + kk), mask=y_mask, other=0.0).to(tl.float32)
            dots += xk * yk
            sq_x += xk * xk
            sq_y += yk * yk
        norm_x = tl.sqrt_rn(sq_x)
        norm_y = tl.sqrt_rn(sq_y)
        inv_x = 1.0 / tl.maximum(norm_x, eps)
        inv_y = 1.0 / tl.maximum(norm_y, eps)
        cost = 1.0 - dots * inv_x * inv_y
        cost_rows = tl.multiple_of(pid * stride_cost_b + rows * stride_cost_m, 4)[:, None]
        tl.store(cost_ptr + (cost_rows + cols[None, :]), cost, mask=(rows[:, None] < M) & (cols[None, :] < N))
        if save != 0:
            # stats (a, f) per row, f = a [|x| >= eps] / |x|, zero at pads; the backward's c is f rho
            stats_x = txt_stats_ptr + pid * M * 2 + rows[:, None] * 2
            f_x = tl.where(norm_x >= eps, inv_x / tl.where(norm_x > 0.0, norm_x, 1.0), 0.0)
            tl.store(stats_x, tl.where(x_mask, inv_x, 0.0), mask=rows[:, None] < M)
            tl.store(stats_x + 1, tl.where(x_mask, f_x, 0.0), mask=rows[:, None] < M)
            if r0 == 0:
                stats_y = img_stats_ptr + pid * N * 2 + cols[None, :] * 2
                f_y = tl.where(norm_y >= eps, inv_y / tl.where(norm_y > 0.0, norm_y, 1.0), 0.0)
                tl.store(stats_y, tl.where(y_mask, inv_y, 0.0), mask=cols[None, :] < N)
                tl.store(stats_y + 1, tl.where(y_mask, f_y, 0.0), mask=cols[None, :] < N)
    tl.debug_barrier()

    # Phase 2, IPOT on the cost, as in uniter_fast.kernels.ipot.
    r = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_N)
    rmask = r < mv
    cmask = c < nv
    mask = rmask[:, None] & cmask[None, :]
    c_ptrs = cost_ptr + tl.multiple_of(pid * stride_cost_b + r * stride_cost_m, 4)[:, None] + c[None, :]
    a = tl.where(mask, tl.exp(-tl.load(c_ptrs, mask=mask, other=0.0) / beta), 0.0)
    t = ipot_plan(a, rmask, cmask, mv, nv, iteration, K)
    o_rows = tl.arange(0, BLOCK_M)[:, None]
    o_cols = tl.arange(0, BLOCK_N)[None, :]
    # The plan's own strides (equal to the cost's) make these addresses a fresh computation, so no address tile stays
    # live in registers through the loop (as in the IPOT kernel).
    o_off = tl.multiple_of(pid * stride_plan_b + tl.arange(0, BLOCK_M) * stride_plan_m, 4)[:, None]
    tl.store(plan_ptr + (o_off + o_cols), t, mask=(o_rows < M) & (o_cols < N))
    # C = -beta * log(A) wherever T > 0 (T > 0 implies A > 0); entries with T = 0 add nothing.
    ct = tl.where(t > 0.0, t * tl.log(tl.where(t > 0.0, a, 1.0)), 0.0)
    tl.store(dist_ptr + pid, -beta * tl.sum(tl.sum(ct, axis=1), axis=0))


@triton.jit
def _wra_backward_kernel(
    txt_ptr,
    img_ptr,
    txt_lens_ptr,
    img_lens_ptr,
    cost_ptr,
    plan_ptr,
    txt_stats_ptr,
    img_stats_ptr,
    grad_dist_ptr,
    grad_txt_ptr,
    grad_img_ptr,
    M,
    N,
    D4,
    stride_txt_b,
    stride_txt_m,
    stride_img_b,
    stride_img_n,
    stride_cost_b,
    stride_cost_m,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    D = D4 * 4  # the embedding width, a multiple of 4 (rows_aligned); saying so lets the masks cover 4 columns
    mv = tl.load(txt_lens_ptr + pid).to(tl.int32)
    nv = tl.load(img_lens_ptr + pid).to(tl.int32)
    g = tl.load(grad_dist_ptr + pid)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ds = tl.arange(0, BLOCK_D)
    rmask = rows < mv
    cmask = cols < nv

    # rho = Σ T ⊙ (1 − C) on both sides and the coefficients c = f rho (f = a [|x| >= eps] / |x| from the forward).
    pair = tl.multiple_of(pid * stride_cost_b, 4)
    tile = pair + tl.multiple_of(rows * stride_cost_m, 4)[:, None] + cols[None, :]
    tile_mask = rmask[:, None] & cmask[None, :]
    cos_t = tl.load(plan_ptr + tile, mask=tile_mask, other=0.0) * (
        1.0 - tl.load(cost_ptr + tile, mask=tile_mask, other=0.0)
    )
    txt_stats = txt_stats_ptr + pid * M * 2
    img_stats = img_stats_ptr + pid * N * 2
    inv_x = tl.load(txt_stats + rows * 2, mask=rmask, other=0.0)
    inv_y = tl.load(img_stats + cols * 2, mask=cmask, other=0.0)
    coef_x = tl.load(txt_stats + rows * 2 + 1, mask=rmask, other=0.0) * tl.sum(cos_t, axis=1)
    coef_y = tl.load(img_stats + cols * 2 + 1, mask=cmask, other=0.0) * tl.sum(cos_t, axis=0)
    # G = -g diag(a) T diag(a'): column j of G is (-g a) T[:, j] a'_j, row i is a_i T[i, :] (-g a').
    g_inv_x = (-g * inv_x)[:, None]
    g_inv_y = (-g * inv_y)[:, None]
    e_x = (g * coef_x)[:, None]
    e_y = (g * coef_y)[:, None]

    plan = plan_ptr + pair
    txt = txt_ptr + pid * stride_txt_b
    img = img_ptr + pid * stride_img_b
    grad_txt = grad_txt_ptr + pid * M * D
    grad_img = grad_img_ptr + pid * N * D
    t_col = (rows * stride_cost_m)[:, None]  # T[:, j] = plan[t_col + j]
    t_row = cols[:, None]  # T[i, :] = plan[i * stride_cost_m + t_row]
    x_rows = tl.multiple_of(rows * stride_txt_m, 4)[:, None]
    y_rows = tl.multiple_of(cols * stride_img_n, 4)[:, None]
    gx_rows = tl.multiple_of(rows * D, 4)[:, None]
    gy_rows = tl.multiple_of(cols * D, 4)[:, None]
    for d0 in range(0, D, BLOCK_D):
        dcols = (d0 + ds)[None, :]
        dmask = dcols < D
        # dX[:, chunk] = e_x X[:, chunk] + G Y[:, chunk], the product as rank-1 updates over the valid regions j
        # (starting from the loaded tile gives the accumulator the tile's vectorised register layout)
        x = tl.load(txt + (x_rows + dcols), mask=rmask[:, None] & dmask, other=0.0).to(tl.float32)
        grad_x = e_x * x
        for j in range(0, nv):
            w = tl.load(plan + (t_col + j), mask=rmask[:, None], other=0.0) * g_inv_x
            w = w * tl.load(img_stats + j * 2)
            y_j = tl.load(img + (tl.multiple_of(j * stride_img_n, 4) + dcols), mask=dmask, other=0.0)
            grad_x += w * y_j.to(tl.float32)
        grad_x = grad_x.to(grad_txt_ptr.dtype.element_ty)
        tl.store(grad_txt + (gx_rows + dcols), grad_x, mask=(rows[:, None] < M) & dmask)
        # dY[:, chunk] = e_y Y[:, chunk] + Gᵀ X[:, chunk], over the valid text tokens i
        y = tl.load(img + (y_rows + dcols), mask=cmask[:, None] & dmask, other=0.0).to(tl.float32)
        grad_y = e_y * y
        for i in range(0, mv):
            w = tl.load(plan + (i * stride_cost_m + t_row), mask=cmask[:, None], other=0.0) * g_inv_y
            w = w * tl.load(txt_stats + i * 2)
            x_i = tl.load(txt + (tl.multiple_of(i * stride_txt_m, 4) + dcols), mask=dmask, other=0.0)
            grad_y += w * x_i.to(tl.float32)
        grad_y = grad_y.to(grad_img_ptr.dtype.element_ty)
        tl.store(grad_img + (gy_rows + dcols), grad_y, mask=(cols[:, None] < N) & dmask)


def _configs(m: int, n: int) -> tuple[dict, dict, dict]:
    """(forward constexprs, backward constexprs, launch options) for pairs of at most m × n: the IPOT kernel's tiles
    and warps; phase 1 of the forward in row blocks and the backward in column chunks of about 16 accumulator
    elements per thread."""
    block_m, block_n = (max(MIN_TILE, side) for side in block_sizes(m, n))
    num_warps = num_warps_for(block_m, block_n)
    threads = 32 * num_warps
    forward = {"BLOCK_M": block_m, "BLOCK_N": block_n, "ROWS": max(1, min(block_m, 8 * threads // block_n))}
    block_d = max(16, min(BLOCK_D, 16 * threads // max(block_m, block_n)))
    backward = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": block_d}
    # One program per SM: at two, the fp32 forward spills at 64 x 128 (12 B on sm_90a); one is spill-free and measured
    # 9% slower than two on an H200 (bench/results/gpu_suite_nvidia_h200, ipot part: 1.86 vs 1.70 ms).
    options = {"num_warps": num_warps, "num_stages": 1, "maxnreg": maxnreg_for(block_m, block_n, programs_per_sm=1)}
    return forward, backward, options


def _check_inputs(txt_emb: torch.Tensor, img_emb: torch.Tensor) -> None:
    if txt_emb.dtype not in _DTYPES or img_emb.dtype != txt_emb.dtype:
        raise TypeError(
            f"txt_emb/img_emb must share a float32/bfloat16/float16 dtype, got {txt_emb.dtype}/{img_emb.dtype}"
        )
    m, n = txt_emb.shape[1], img_emb.shape[1]
    if m > MAX_BLOCK or n > MAX_BLOCK:
        raise ValueError(f"txt_emb/img_emb must have at most {MAX_BLOCK} rows per pair, got {m} and {n}")
    if not (rows_aligned(txt_emb) and rows_aligned(img_emb)):
        raise ValueError(
            "txt_emb and img_emb must have 16-byte aligned rows of a width divisible by 4 (see rows_aligned), got "
            f"shapes {tuple(txt_emb.shape)}/{tuple(img_emb.shape)} with strides {txt_emb.stride()}/{img_emb.stride()}"
        )


def rows_aligned(x: torch.Tensor) -> bool:
    """True if ``x`` [B, L, D] has unit stride along D, D and both other strides divisible by 4 and a 16-byte aligned
    start: what the kernels assume (the dispatcher pads other inputs)."""
    return (
        x.stride(2) == 1
        and x.shape[2] % 4 == 0
        and x.stride(1) % 4 == 0
        and x.stride(0) % 4 == 0
        and x.data_ptr() % 16 == 0
    )


def _check_out(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype = torch.float32) -> None:
    if tuple(t.shape) != shape or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"out {name} must be a contiguous {dtype} tensor of shape {shape}, got {t.dtype} {t.shape}")


def wra_forward_triton(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    beta: float,
    iteration: int,
    k: int,
    eps: float,
    save: bool,
    out: Optional[tuple[torch.Tensor, ...]] = None,
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
    """WRA distance [B] fp32 in one launch; with ``save`` also what :func:`wra_backward_triton` needs: (cost, plan,
    txt_stats, img_stats), fp32: the cost and the plan [B, M, N] (views with 16-byte aligned rows; the plan is zero
    outside the valid block), and per row (a, f) = (1 / max(|x|, eps), a [|x| ≥ eps] / |x|), [B, M, 2] / [B, N, 2].

    txt_emb [B, M, D], img_emb [B, N, D]: same dtype (fp32/bf16/fp16), :func:`rows_aligned`, M, N ≤ MAX_BLOCK.
    txt_lens/img_lens: [B] int64 on the embeddings' device, in [1, M] / [1, N] (validated by the caller).
    out: optional preallocated (dist [B], plan (aligned as above), txt_stats, img_stats) to write into.
    """
    _check_inputs(txt_emb, img_emb)
    b, m, d = txt_emb.shape
    n = img_emb.shape[1]
    device = txt_emb.device
    cost = _empty_aligned((b, m, n), torch.float32, device)
    if out is None:
        dist = torch.empty(b, dtype=torch.float32, device=device)
        plan = _empty_aligned((b, m, n), torch.float32, device)
        txt_stats = torch.empty((b, m, 2) if save else (1,), dtype=torch.float32, device=device)
        img_stats = torch.empty((b, n, 2) if save else (1,), dtype=torch.float32, device=device)
    else:
        dist, plan, txt_stats, img_stats = out
        _check_out("dist", dist, (b,))
        _check_out("txt_stats", txt_stats, (b, m, 2))
        _check_out("img_stats", img_stats, (b, n, 2))
        if plan.shape != cost.shape or plan.dtype != torch.float32 or plan.stride() != cost.stride():
            raise ValueError(f"out plan must be float32 {tuple(cost.shape)} with strides {cost.stride()}")
    if b > 0:
        forward, _, options = _configs(m, n)
        _wra_forward_kernel[(b,)](
            txt_emb,
            img_emb,
            txt_lens,
            img_lens,
            dist,
            cost,
            plan,
            txt_stats,
            img_stats,
            m,
            n,
            d,
            txt_emb.stride(0),
            txt_emb.stride(1),
            img_emb.stride(0),
            img_emb.stride(1),
            cost.stride(0),
            cost.stride(1),
            plan.stride(0),
            plan.stride(1),
            float(beta),
            float(eps),
            int(iteration),
            int(k),
            int(save),
            **forward,
            **options,
        )
    return dist, ((cost, plan, txt_stats, img_stats) if save else None)


def wra_backward_triton(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    grad_dist: torch.Tensor,
    out: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients [B, M, D] and [B, N, D] (contiguous, the embeddings' dtype, zero at pad rows) of
    Σ_b grad_dist[b] · dist_b in one launch, from the forward's saved (cost, plan, txt_stats, img_stats);
    grad_dist [B] fp32. out: optional preallocated (grad_txt, grad_img) to write into."""
    _check_inputs(txt_emb, img_emb)
    cost, plan, txt_stats, img_stats = saved
    b, m, d = txt_emb.shape
    n = img_emb.shape[1]
    if out is None:
        grad_txt = torch.empty(txt_emb.shape, dtype=txt_emb.dtype, device=txt_emb.device)
        grad_img = torch.empty(img_emb.shape, dtype=img_emb.dtype, device=img_emb.device)
    else:
        grad_txt, grad_img = out
        _check_out("grad_txt", grad_txt, tuple(txt_emb.shape), txt_emb.dtype)
        _check_out("grad_img", grad_img, tuple(img_emb.shape), img_emb.dtype)
    if b > 0:
        _, backward, options = _configs(m, n)
        _wra_backward_kernel[(b,)](
            txt_emb,
            img_emb,
            txt_lens,
            img_lens,
            cost,
            plan,
            txt_stats,
            img_stats,
            grad_dist,
            grad_txt,
            grad_img,
            m,
            n,
            d // 4,
            txt_emb.stride(0),
            txt_emb.stride(1),
            img_emb.stride(0),
            img_emb.stride(1),
            cost.stride(0),
            cost.stride(1),
            **backward,
            **options,
        )
    return grad_txt, grad_img


def aot_specs() -> list[AotSpec]:
    """Every launch configuration the WRA dispatchers use: tile sides 64 and 128 × embedding dtype, forward and
    backward."""
    blocks = [MIN_TILE << i for i in range((MAX_BLOCK // MIN_TILE).bit_length())]
    strides = ("stride_txt_b", "stride_txt_m", "stride_img_b", "stride_img_n", "stride_cost_b", "stride_cost_m")
    forward_sizes = {name: "i32" for name in ("M", "N", "D", *strides, "stride_plan_b", "stride_plan_m")}
    backward_sizes = {name: "i32" for name in ("M", "N", "D4", *strides)}
    specs = []
    for dtype in _DTYPES.values():
        inputs = {"txt_ptr": f"*{dtype}", "img_ptr": f"*{dtype}", "txt_lens_ptr": "*i64", "img_lens_ptr": "*i64"}
        forward_sig = {
            **inputs,
            **{name: "*fp32" for name in ("dist_ptr", "cost_ptr", "plan_ptr", "txt_stats_ptr", "img_stats_ptr")},
            **forward_sizes,
            **{"beta": "fp32", "eps": "fp32", "iteration": "i32", "K": "i32", "save": "i32"},
            **{"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "ROWS": "constexpr"},
        }
        backward_sig = {
            **inputs,
            **{name: "*fp32" for name in ("cost_ptr", "plan_ptr", "txt_stats_ptr", "img_stats_ptr", "grad_dist_ptr")},
            **{"grad_txt_ptr": f"*{dtype}", "grad_img_ptr": f"*{dtype}"},
            **backward_sizes,
            **{"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"},
        }
        for block_m in blocks:
            for block_n in blocks:
                forward, backward, options = _configs(block_m, block_n)
                tile = f"{dtype}_{block_m}x{block_n}"
                specs.append(AotSpec(f"wra_fwd_{tile}", _wra_forward_kernel, forward_sig, forward, **options))
                specs.append(AotSpec(f"wra_bwd_{tile}", _wra_backward_kernel, backward_sig, backward, **options))
    return specs
