"""Batched IPOT in Triton: one program per pair, the Gibbs kernel and the plan kept on chip for all iterations.

The program loads its pair's valid ``txt_len × img_len`` block of the cost from HBM once (fp32/bf16/fp16, fp32
arithmetic), runs UNITER's IPOT loop (uniter_fast/ot/reference.py) with the Gibbs kernel, the plan and the scaling
vectors in registers, and writes the plan [M, N] (zero at pads) and the distance Σ C ⊙ T once (with C recovered as
−β·log A, so the cost occupies no registers during the loop). Matrix-vector steps are broadcast-multiply + ``tl.sum`` in
exact fp32 (no ``tl.dot``: TF32 on GPU). Tiles hold at most ``MAX_BLOCK × MAX_BLOCK``; larger problems go to the
reference (uniter_fast/backends.py, the resolver).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from uniter_fast.kernels.aot import AotSpec

from uniter_fast.backends import TRITON_OT_MAX_BLOCK as MAX_BLOCK

MIN_BLOCK = 32
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def ipot_plan(a, rmask, cmask, mv, nv, iteration, K):
    """UNITER's IPOT loop on one pair held in registers: the plan T [BLOCK_M, BLOCK_N] fp32 for the Gibbs kernel
    ``a`` = exp(−C/β) (zero outside the valid block), row/column masks of the valid block and its lengths."""
    mvf = mv.to(tl.float32)
    nvf = nv.to(tl.float32)
    sigma = tl.where(rmask, 1.0 / mvf, 0.0)
    delta = tl.zeros(cmask.shape, dtype=tl.float32)
    t = tl.full(a.shape, 1.0, dtype=tl.float32)  # a is zero at pads, so Q and T are too
    for _ in range(iteration):
        q = a * t
        for _ in range(K):
            colsum = tl.sum(q * sigma[:, None], axis=0)
            delta = tl.where(cmask, 1.0 / (nvf * tl.where(cmask, colsum, 1.0)), 0.0)
            rowsum = tl.sum(q * delta[None, :], axis=1)
            sigma = tl.where(rmask, 1.0 / (mvf * tl.where(rmask, rowsum, 1.0)), 0.0)
        t = delta[None, :] * q * sigma[:, None]
    return t


@triton.jit
def _ipot_kernel(
    cost_ptr,
    txt_lens_ptr,
    img_lens_ptr,
    plan_ptr,
    dist_ptr,
    M,
    N,
    stride_cost_b,
    stride_cost_m,
    stride_plan_b,
    stride_plan_m,
    beta,
    iteration,
    K,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    mv = tl.load(txt_lens_ptr + pid).to(tl.int32)
    nv = tl.load(img_lens_ptr + pid).to(tl.int32)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    rmask = rows < mv
    cmask = cols < nv
    mask = rmask[:, None] & cmask[None, :]

    # The dispatcher guarantees rows start on 16-byte boundaries; saying so lets Triton give each thread 4 adjacent
    # columns, which keeps the per-row vectors (sigma, masks) small per thread and the kernel free of spills.
    c_off = tl.multiple_of(pid * stride_cost_b + rows * stride_cost_m, 4)
    c_ptrs = cost_ptr + c_off[:, None] + cols[None, :]
    c = tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    a = tl.where(mask, tl.exp(-c / beta), 0.0)
    t = ipot_plan(a, rmask, cmask, mv, nv, iteration, K)

    # The plan's own strides make these addresses a fresh computation, so no address tile stays live in registers
    # through the loop. The distance takes C = -beta * log(A) (T > 0 implies A > 0) instead of holding or re-reading
    # the cost: |error| <= beta * ~3e-7 per entry.
    p_rows = tl.arange(0, BLOCK_M)[:, None]
    p_cols = tl.arange(0, BLOCK_N)[None, :]
    p_off = tl.multiple_of(pid * stride_plan_b + tl.arange(0, BLOCK_M) * stride_plan_m, 4)
    p_ptrs = plan_ptr + p_off[:, None] + p_cols
    tl.store(p_ptrs, t, mask=(p_rows < M) & (p_cols < N))
    ct = tl.where(t > 0.0, t * tl.log(tl.where(t > 0.0, a, 1.0)), 0.0)
    tl.store(dist_ptr + pid, -beta * tl.sum(tl.sum(ct, axis=1), axis=0))


def block_sizes(m: int, n: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): the powers of two ≥ max(m, MIN_BLOCK) and ≥ max(n, MIN_BLOCK) holding the whole pair."""
    return max(MIN_BLOCK, triton.next_power_of_2(m)), max(MIN_BLOCK, triton.next_power_of_2(n))


#: Launch shape of the IPOT and WRA programs, (tile elements per thread, programs meant to share an SM): the first
#: sets the warps, the second the register cap. Tiles up to ``SMALL_TILE`` elements (UNITER's main tile, text <= 64 x
#: regions <= 128) use ``SMALL_TILE_LAUNCH``: on an H200 (bench/results/gpu_suite_nvidia_h200, ipot part) 32/2 ran
#: IPOT 2.0x and the WRA forward 1.5x faster than 16/1 at B = 256, 60 x 100. Larger tiles keep 16/1: 32 elements per
#: thread spill at 128 x 128 (tests/test_ot_triton.py compiles them spill-free). bench/gpu_suite.py's ipot part sweeps
#: ``SMALL_TILE_LAUNCH``.
SMALL_TILE = 64 * 128
SMALL_TILE_LAUNCH = (32, 2)
LARGE_TILE_LAUNCH = (16, 1)


def _launch(block_m: int, block_n: int) -> tuple[int, int]:
    return SMALL_TILE_LAUNCH if block_m * block_n <= SMALL_TILE else LARGE_TILE_LAUNCH


def num_warps_for(block_m: int, block_n: int) -> int:
    """Warps per program of a ``block_m`` x ``block_n`` tile: its elements over 32 x the launch shape's elements per
    thread (8 warps for 64×128, 32 for 128×128), between 4 and 32."""
    elements, _ = _launch(block_m, block_n)
    return max(4, min(32, block_m * block_n // (32 * elements)))


def maxnreg_for(block_m: int, block_n: int, programs_per_sm: Optional[int] = None) -> int:
    """The register cap of a ``block_m`` x ``block_n`` tile's program that lets ``programs_per_sm`` programs (default:
    the launch shape's) share the register file (1: one program may use all of it; ptxas otherwise aims for 2)."""
    programs = _launch(block_m, block_n)[1] if programs_per_sm is None else programs_per_sm
    return min(255, 65536 // (32 * num_warps_for(block_m, block_n) * programs))


def _rows_aligned(x: torch.Tensor) -> bool:
    """True if every row of ``x`` [B, M, N] starts on a 16-byte boundary with unit column stride."""
    return x.stride(2) == 1 and x.stride(1) % 4 == 0 and x.stride(0) % 4 == 0 and x.data_ptr() % 16 == 0


def _empty_aligned(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised [B, M, N] view of a [B, M, ceil4(N)] buffer, so that its rows are 16-byte aligned."""
    b, m, n = shape
    return torch.empty((b, m, (n + 3) // 4 * 4), dtype=dtype, device=device)[:, :, :n]


def ipot_triton(
    cost: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    beta: float,
    iteration: int,
    k: int,
    plan_out: Optional[torch.Tensor] = None,
    dist_out: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPOT plan [B, M, N] fp32 and distance [B] fp32 for a [B, M, N] fp32/bf16/fp16 cost (M, N ≤ MAX_BLOCK).

    txt_lens/img_lens: [B] int, valid lengths in [1, M] / [1, N] (pads are a suffix); validated by the caller.
    plan_out [B, M, N] fp32 with 16-byte-aligned rows and dist_out [B] fp32 are written if given (else allocated).
    A cost whose rows are not 16-byte aligned is first copied into an aligned buffer.
    """
    if cost.dtype not in _DTYPES:
        raise TypeError(f"cost must be float32, bfloat16 or float16, got {cost.dtype}")
    b, m, n = cost.shape
    if m > MAX_BLOCK or n > MAX_BLOCK:
        raise ValueError(f"cost must be at most [B, {MAX_BLOCK}, {MAX_BLOCK}], got {tuple(cost.shape)}")
    if not _rows_aligned(cost):
        cost = _empty_aligned(cost.shape, cost.dtype, cost.device).copy_(cost)
    plan = _empty_aligned(cost.shape, torch.float32, cost.device) if plan_out is None else plan_out
    dist = torch.empty(b, dtype=torch.float32, device=cost.device) if dist_out is None else dist_out
    if plan.shape != cost.shape or plan.dtype != torch.float32 or not _rows_aligned(plan):
        raise ValueError(f"plan_out must be float32 {tuple(cost.shape)} with 16-byte aligned rows, got {plan.shape}")
    if dist.shape != (b,) or dist.dtype != torch.float32:
        raise ValueError(f"dist_out must be float32 of shape ({b},), got {dist.dtype} {tuple(dist.shape)}")
    if b == 0:
        return plan, dist
    block_m, block_n = block_sizes(m, n)
    num_warps = num_warps_for(block_m, block_n)
    _ipot_kernel[(b,)](
        cost,
        txt_lens.to(device=cost.device, dtype=torch.int64, non_blocking=True).contiguous(),
        img_lens.to(device=cost.device, dtype=torch.int64, non_blocking=True).contiguous(),
        plan,
        dist,
        m,
        n,
        cost.stride(0),
        cost.stride(1),
        plan.stride(0),
        plan.stride(1),
        float(beta),
        int(iteration),
        int(k),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=1,
        maxnreg=maxnreg_for(block_m, block_n),
        enable_fp_fusion=True,
    )
    return plan, dist


def aot_specs() -> list[AotSpec]:
    """Every launch configuration ``ipot_triton`` uses: block sizes 32..128 on each side × cost dtype."""
    blocks = [MIN_BLOCK << i for i in range((MAX_BLOCK // MIN_BLOCK).bit_length())]
    specs = []
    for dtype in ("fp32", "bf16", "fp16"):
        for block_m in blocks:
            for block_n in blocks:
                signature = {
                    "cost_ptr": f"*{dtype}",
                    "txt_lens_ptr": "*i64",
                    "img_lens_ptr": "*i64",
                    "plan_ptr": "*fp32",
                    "dist_ptr": "*fp32",
                    "M": "i32",
                    "N": "i32",
                    "stride_cost_b": "i32",
                    "stride_cost_m": "i32",
                    "stride_plan_b": "i32",
                    "stride_plan_m": "i32",
                    "beta": "fp32",
                    "iteration": "i32",
                    "K": "i32",
                    "BLOCK_M": "constexpr",
                    "BLOCK_N": "constexpr",
                }
                specs.append(
                    AotSpec(
                        name=f"ipot_{dtype}_{block_m}x{block_n}",
                        fn=_ipot_kernel,
                        signature=signature,
                        constexprs={"BLOCK_M": block_m, "BLOCK_N": block_n},
                        num_warps=num_warps_for(block_m, block_n),
                        num_stages=1,
                        maxnreg=maxnreg_for(block_m, block_n),
                    )
                )
    return specs
