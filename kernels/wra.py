"""The fused WRA distance in Triton: one program per pair, forward in one launch, backward in one launch.

Forward (``_wra_forward_kernel``): the program streams its pair's text rows [M, D] and region rows [N, D] from HBM
once in column chunks of ``BLOCK_D`` (fp32/bf16/fp16, fp32 arithmetic), accumulating the dot products X Yᵀ with an
exact-fp32 ``tl.dot`` (``input_precision="ieee"``, no TF32) and the squared row norms; forms the cosine cost
C = 1 − diag(a) X Yᵀ diag(a') (a = 1 / max(|x|, eps)) of the valid block, runs UNITER's IPOT loop on it in registers
(:func:`uniter_fast.kernels.ipot.ipot_plan`), and writes the distance Σ C ⊙ T and, when asked, the plan and the row
stats (a, c) that the backward needs (c = a [|x| ≥ eps] ρ / |x|, ρ_i = Σ_j T_ij (1 − C_ij)). As in the IPOT kernel,
C is recovered after the loop as −β·log A, so it occupies no registers during the iterations.

Backward (``_wra_backward_kernel``): G = −g diag(a) T diag(a') from the saved plan and stats, then per column chunk
dX = G Y + g c X and dY = Gᵀ X + g c' Y, reading each chunk of X and Y once and writing the gradients once (zero at
pad rows). See uniter_fast/ot/wra.py for the maths. Tiles hold at most ``MAX_BLOCK × MAX_BLOCK`` per pair; larger
inputs use the reference path (uniter_fast/ot/api.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from uniter_fast.kernels.aot import AotSpec
from uniter_fast.kernels.ipot import MAX_BLOCK, MIN_BLOCK, block_sizes, ipot_plan, maxnreg_for, num_warps_for

BLOCK_D = 32
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}

__all__ = ["MAX_BLOCK", "aot_specs", "wra_backward_triton", "wra_forward_triton"]


@triton.jit
def _wra_forward_kernel(
    txt_ptr,
    img_ptr,
    txt_lens_ptr,
    img_lens_ptr,
    dist_ptr,
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
    beta,
    eps,
    iteration,
    K,
    save,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    mv = tl.load(txt_lens_ptr + pid).to(tl.int32)
    nv = tl.load(img_lens_ptr + pid).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_D)
    rmask = rows < mv
    cmask = cols < nv

    x_ptrs = txt_ptr + pid * stride_txt_b + rows[:, None].to(tl.int64) * stride_txt_m + ks[None, :]
    y_ptrs = img_ptr + pid * stride_img_b + cols[:, None].to(tl.int64) * stride_img_n + ks[None, :]
    dots = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sq_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        kmask = (d0 + ks) < D
        x = tl.load(x_ptrs + d0, mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        y = tl.load(y_ptrs + d0, mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        sq_x += tl.sum(x * x, axis=1)
        sq_y += tl.sum(y * y, axis=1)
        dots = tl.dot(x, tl.trans(y), dots, input_precision="ieee")
    norm_x = tl.sqrt_rn(sq_x)
    norm_y = tl.sqrt_rn(sq_y)
    inv_x = 1.0 / tl.maximum(norm_x, eps)
    inv_y = 1.0 / tl.maximum(norm_y, eps)
    mask = rmask[:, None] & cmask[None, :]
    cost = 1.0 - dots * inv_x[:, None] * inv_y[None, :]
    a = tl.where(mask, tl.exp(-cost / beta), 0.0)
    t = ipot_plan(a, rmask, cmask, mv, nv, iteration, K)

    # C = -beta * log(A) wherever T > 0 (T > 0 implies A > 0); entries with T = 0 add nothing.
    c_rec = tl.where(t > 0.0, -beta * tl.log(tl.where(t > 0.0, a, 1.0)), 0.0)
    tl.store(dist_ptr + pid, tl.sum(tl.sum(t * c_rec, axis=1), axis=0))
    if save != 0:
        p_rows = tl.arange(0, BLOCK_M)
        p_cols = tl.arange(0, BLOCK_N)
        p_ptrs = plan_ptr + pid * M * N + p_rows[:, None] * N + p_cols[None, :]
        tl.store(p_ptrs, t, mask=(p_rows[:, None] < M) & (p_cols[None, :] < N))
        cos_t = t * (1.0 - c_rec)
        rho_x = tl.sum(cos_t, axis=1)
        rho_y = tl.sum(cos_t, axis=0)
        coef_x = tl.where(rmask & (norm_x >= eps), inv_x * rho_x / tl.where(norm_x > 0.0, norm_x, 1.0), 0.0)
        coef_y = tl.where(cmask & (norm_y >= eps), inv_y * rho_y / tl.where(norm_y > 0.0, norm_y, 1.0), 0.0)
        tx_ptrs = txt_stats_ptr + pid * M * 2 + p_rows * 2
        ty_ptrs = img_stats_ptr + pid * N * 2 + p_cols * 2
        tl.store(tx_ptrs, tl.where(rmask, inv_x, 0.0), mask=p_rows < M)
        tl.store(tx_ptrs + 1, coef_x, mask=p_rows < M)
        tl.store(ty_ptrs, tl.where(cmask, inv_y, 0.0), mask=p_cols < N)
        tl.store(ty_ptrs + 1, coef_y, mask=p_cols < N)


@triton.jit
def _wra_backward_kernel(
    txt_ptr,
    img_ptr,
    txt_lens_ptr,
    img_lens_ptr,
    plan_ptr,
    txt_stats_ptr,
    img_stats_ptr,
    grad_dist_ptr,
    grad_txt_ptr,
    grad_img_ptr,
    M,
    N,
    D,
    stride_txt_b,
    stride_txt_m,
    stride_img_b,
    stride_img_n,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    mv = tl.load(txt_lens_ptr + pid).to(tl.int32)
    nv = tl.load(img_lens_ptr + pid).to(tl.int32)
    g = tl.load(grad_dist_ptr + pid)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_D)
    rmask = rows < mv
    cmask = cols < nv

    t = tl.load(
        plan_ptr + pid * M * N + rows[:, None] * N + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0
    )
    inv_x = tl.load(txt_stats_ptr + pid * M * 2 + rows * 2, mask=rmask, other=0.0)
    coef_x = tl.load(txt_stats_ptr + pid * M * 2 + rows * 2 + 1, mask=rmask, other=0.0)
    inv_y = tl.load(img_stats_ptr + pid * N * 2 + cols * 2, mask=cmask, other=0.0)
    coef_y = tl.load(img_stats_ptr + pid * N * 2 + cols * 2 + 1, mask=cmask, other=0.0)
    gm = (-g * inv_x)[:, None] * t * inv_y[None, :]
    gm_t = tl.trans(gm)
    e_x = g * coef_x
    e_y = g * coef_y

    x_ptrs = txt_ptr + pid * stride_txt_b + rows[:, None].to(tl.int64) * stride_txt_m + ks[None, :]
    y_ptrs = img_ptr + pid * stride_img_b + cols[:, None].to(tl.int64) * stride_img_n + ks[None, :]
    gx_ptrs = grad_txt_ptr + pid * M * D + rows[:, None].to(tl.int64) * D + ks[None, :]
    gy_ptrs = grad_img_ptr + pid * N * D + cols[:, None].to(tl.int64) * D + ks[None, :]
    for d0 in range(0, D, BLOCK_D):
        kmask = (d0 + ks) < D
        x = tl.load(x_ptrs + d0, mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        y = tl.load(y_ptrs + d0, mask=cmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        grad_x = tl.dot(gm, y, input_precision="ieee") + e_x[:, None] * x
        grad_y = tl.dot(gm_t, x, input_precision="ieee") + e_y[:, None] * y
        tl.store(
            gx_ptrs + d0,
            grad_x.to(grad_txt_ptr.dtype.element_ty),
            mask=(rows[:, None] < M) & kmask[None, :],
        )
        tl.store(
            gy_ptrs + d0,
            grad_y.to(grad_img_ptr.dtype.element_ty),
            mask=(cols[:, None] < N) & kmask[None, :],
        )


def _launch_options(m: int, n: int) -> dict:
    """Block sizes, warps and register cap of a pair of at most m × n (the IPOT kernel's tiling)."""
    block_m, block_n = block_sizes(m, n)
    num_warps = num_warps_for(block_m, block_n)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_D": BLOCK_D,
        "num_warps": num_warps,
        "num_stages": 1,
        "maxnreg": maxnreg_for(num_warps),
    }


def _check_inputs(txt_emb: torch.Tensor, img_emb: torch.Tensor) -> None:
    if txt_emb.dtype not in _DTYPES or img_emb.dtype != txt_emb.dtype:
        raise TypeError(
            f"txt_emb/img_emb must share a float32/bfloat16/float16 dtype, got {txt_emb.dtype}/{img_emb.dtype}"
        )
    b, m, d = txt_emb.shape
    n = img_emb.shape[1]
    if m > MAX_BLOCK or n > MAX_BLOCK:
        raise ValueError(f"txt_emb/img_emb must have at most {MAX_BLOCK} rows per pair, got {m} and {n}")
    if txt_emb.stride(2) != 1 or img_emb.stride(2) != 1:
        raise ValueError("txt_emb and img_emb must have unit stride along their last dimension")


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
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """WRA distance [B] fp32 in one launch; with ``save`` also (plan [B, M, N], txt_stats [B, M, 2], img_stats
    [B, N, 2]) fp32 for :func:`wra_backward_triton`.

    txt_emb [B, M, D], img_emb [B, N, D]: same dtype (fp32/bf16/fp16), unit stride along D, M, N ≤ MAX_BLOCK.
    txt_lens/img_lens: [B] int64 on the embeddings' device, in [1, M] / [1, N] (validated by the caller).
    out: optional preallocated contiguous fp32 (dist, plan, txt_stats, img_stats) to write into (``save`` only).
    """
    _check_inputs(txt_emb, img_emb)
    b, m, d = txt_emb.shape
    n = img_emb.shape[1]
    device = txt_emb.device
    if out is None:
        dist = torch.empty(b, dtype=torch.float32, device=device)
        plan = torch.empty((b, m, n) if save else (1,), dtype=torch.float32, device=device)
        txt_stats = torch.empty((b, m, 2) if save else (1,), dtype=torch.float32, device=device)
        img_stats = torch.empty((b, n, 2) if save else (1,), dtype=torch.float32, device=device)
    else:
        dist, plan, txt_stats, img_stats = out
        shapes = [(b,), (b, m, n), (b, m, 2), (b, n, 2)]
        if not save or any(
            t.shape != s or t.dtype != torch.float32 or not t.is_contiguous() for t, s in zip(out, shapes)
        ):
            raise ValueError(f"out must be contiguous float32 tensors of shapes {shapes} (with save=True)")
    if b > 0:
        _wra_forward_kernel[(b,)](
            txt_emb,
            img_emb,
            txt_lens,
            img_lens,
            dist,
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
            float(beta),
            float(eps),
            int(iteration),
            int(k),
            int(save),
            **_launch_options(m, n),
        )
    return dist, ((plan, txt_stats, img_stats) if save else None)


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
    Σ_b grad_dist[b] · dist_b, from the forward's saved (plan, txt_stats, img_stats); grad_dist [B] fp32.
    out: optional preallocated (grad_txt, grad_img) to write into."""
    _check_inputs(txt_emb, img_emb)
    plan, txt_stats, img_stats = saved
    b, m, d = txt_emb.shape
    n = img_emb.shape[1]
    if out is None:
        grad_txt = torch.empty(txt_emb.shape, dtype=txt_emb.dtype, device=txt_emb.device)
        grad_img = torch.empty(img_emb.shape, dtype=img_emb.dtype, device=img_emb.device)
    else:
        grad_txt, grad_img = out
        for name, grad, emb in (("grad_txt", grad_txt, txt_emb), ("grad_img", grad_img, img_emb)):
            if grad.shape != emb.shape or grad.dtype != emb.dtype or not grad.is_contiguous():
                raise ValueError(f"out {name} must be contiguous {emb.dtype} {tuple(emb.shape)}")
    if b > 0:
        _wra_backward_kernel[(b,)](
            txt_emb,
            img_emb,
            txt_lens,
            img_lens,
            plan,
            txt_stats,
            img_stats,
            grad_dist,
            grad_txt,
            grad_img,
            m,
            n,
            d,
            txt_emb.stride(0),
            txt_emb.stride(1),
            img_emb.stride(0),
            img_emb.stride(1),
            **_launch_options(m, n),
        )
    return grad_txt, grad_img


def aot_specs() -> list[AotSpec]:
    """Every launch configuration the WRA dispatchers use: block sizes 32..128 per side × embedding dtype, forward
    and backward."""
    blocks = [MIN_BLOCK << i for i in range((MAX_BLOCK // MIN_BLOCK).bit_length())]
    specs = []
    for dtype in _DTYPES.values():
        for block_m in blocks:
            for block_n in blocks:
                options = _launch_options(block_m, block_n)
                constexprs = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_D": BLOCK_D}
                common = {"num_warps": options["num_warps"], "num_stages": 1, "maxnreg": options["maxnreg"]}
                sizes = {name: "i32" for name in ("M", "N", "D")}
                strides = {name: "i32" for name in ("stride_txt_b", "stride_txt_m", "stride_img_b", "stride_img_n")}
                blocks_sig = {"BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_D": "constexpr"}
                emb = {"txt_ptr": f"*{dtype}", "img_ptr": f"*{dtype}", "txt_lens_ptr": "*i64", "img_lens_ptr": "*i64"}
                forward = {
                    **emb,
                    "dist_ptr": "*fp32",
                    "plan_ptr": "*fp32",
                    "txt_stats_ptr": "*fp32",
                    "img_stats_ptr": "*fp32",
                    **sizes,
                    **strides,
                    "beta": "fp32",
                    "eps": "fp32",
                    "iteration": "i32",
                    "K": "i32",
                    "save": "i32",
                    **blocks_sig,
                }
                backward = {
                    **emb,
                    "plan_ptr": "*fp32",
                    "txt_stats_ptr": "*fp32",
                    "img_stats_ptr": "*fp32",
                    "grad_dist_ptr": "*fp32",
                    "grad_txt_ptr": f"*{dtype}",
                    "grad_img_ptr": f"*{dtype}",
                    **sizes,
                    **strides,
                    **blocks_sig,
                }
                tile = f"{dtype}_{block_m}x{block_n}"
                specs.append(AotSpec(f"wra_fwd_{tile}", _wra_forward_kernel, forward, constexprs, **common))
                specs.append(AotSpec(f"wra_bwd_{tile}", _wra_backward_kernel, backward, constexprs, **common))
    return specs
