"""Public OT entry points: the IPOT plan and UNITER's differentiable Wasserstein (WRA) distance."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from uniter_fast import backends
from uniter_fast.ot.backends import RUNNERS, run_reference
from uniter_fast.ot.checks import (
    check_embeddings,
    check_float,
    check_length_args,
    check_pad_layout,
    check_pads,
    check_params,
    suffix_lengths,
)
from uniter_fast.ot.wra import COSINE_EPS, fused_wra_distance


def _lengths(
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    txt_lens: Optional[torch.Tensor],
    img_lens: Optional[torch.Tensor],
    batch: int,
    m: int,
    n: int,
    device: torch.device,
    check_values: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The valid lengths: the given ones (checked without a device sync unless ``check_values``), else derived from
    the pads (a device sync on CUDA); (None, None) when the pads are not a suffix of every row."""
    if (txt_lens is None) != (img_lens is None):
        raise ValueError("txt_lens and img_lens must be given together (or neither)")
    if txt_lens is None:
        check_pads(txt_pad, img_pad, batch, m, n, device)
        txt_lens, img_lens = suffix_lengths(txt_pad), suffix_lengths(img_pad)
        return (txt_lens, img_lens) if txt_lens is not None and img_lens is not None else (None, None)
    check_pad_layout(txt_pad, img_pad, batch, m, n, device)
    check_length_args(txt_lens, img_lens, txt_pad, img_pad, check_values)
    return txt_lens, img_lens


class _IpotDistance(torch.autograd.Function):
    """distance_b = Σ_ij C_bij T_bij with the reference IPOT plan T computed from C.detach(); ∂distance/∂C = T."""

    @staticmethod
    def forward(
        ctx: Any,
        cost: torch.Tensor,
        txt_pad: torch.Tensor,
        img_pad: torch.Tensor,
        beta: float,
        iteration: int,
        k: int,
    ) -> torch.Tensor:
        plan, dist = run_reference(cost, txt_pad, img_pad, None, None, beta, iteration, k)
        ctx.save_for_backward(plan)
        ctx.cost_dtype = cost.dtype
        return dist

    @staticmethod
    def backward(ctx: Any, grad_dist: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (plan,) = ctx.saved_tensors
        grad_cost = (grad_dist.to(plan.dtype)[:, None, None] * plan).to(ctx.cost_dtype)
        return (grad_cost,) + (None,) * 5


def cost_matrix_cosine(txt_emb: torch.Tensor, img_emb: torch.Tensor, eps: float = COSINE_EPS) -> torch.Tensor:
    """1 − cosine similarity [B, Lt, Nb] of txt_emb [B, Lt, H] and img_emb [B, Nb, H] (L2 eps 1e-5), input dtype."""
    x = F.normalize(txt_emb, p=2, dim=-1, eps=eps)
    y = F.normalize(img_emb, p=2, dim=-1, eps=eps)
    return 1 - x.matmul(y.transpose(1, 2))


def ipot(
    cost: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    beta: float = 0.5,
    iteration: int = 50,
    k: int = 1,
    backend: str = "auto",
    txt_lens: Optional[torch.Tensor] = None,
    img_lens: Optional[torch.Tensor] = None,
    check_values: bool = False,
) -> torch.Tensor:
    """IPOT transport plan of UNITER's algorithm (uniform marginals 1/len over non-pad positions).

    Args:
        cost: [B, M, N] float32/bfloat16/float16 cost, text × regions (read in fp32; pad entries are ignored).
        txt_pad: [B, M] bool, True at text pads. img_pad: [B, N] bool, True at region pads. Every pair needs at
            least one non-pad on each side; the fast backends need pads only at the end of each row.
        beta: proximal step (>= 0.05), iteration: outer steps, k: inner Sinkhorn sweeps.
        backend: "auto", "reference", "cpp" (CPU) or "triton" (CUDA, or CPU under TRITON_INTERPRET=1); the choice is
            :func:`uniter_fast.backends.resolve`'s (component "ipot").
        txt_lens, img_lens: optional [B] int64 valid lengths (CPU or the cost's device), as in
            :func:`optimal_transport_dist`.
        check_values: also check device-resident lengths against the pads (a device sync).

    Returns:
        [B, M, N] float32 plan (note: the original returns it transposed, [B, N, M]), zero at pads, no gradient.
    """
    check_float("cost", cost, 3)
    check_params(beta, iteration, k)
    batch, m, n = cost.shape
    txt_lens, img_lens = _lengths(txt_pad, img_pad, txt_lens, img_lens, batch, m, n, cost.device, check_values)
    name = backends.resolve(
        "ipot", backend, cost.device, cost.dtype, suffix_padded=txt_lens is not None, pair_size=(m, n)
    )
    with torch.no_grad():
        return RUNNERS[name](cost.detach(), txt_pad, img_pad, txt_lens, img_lens, beta, iteration, k)[0]


def optimal_transport_dist(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    beta: float = 0.5,
    iteration: int = 50,
    k: int = 1,
    backend: str = "auto",
    txt_lens: Optional[torch.Tensor] = None,
    img_lens: Optional[torch.Tensor] = None,
    check_values: bool = False,
) -> torch.Tensor:
    """UNITER's WRA distance: Σ C ⊙ T with C = 1 − cos(txt, img) (pads zeroed) and T the detached IPOT plan.

    Args:
        txt_emb: [B, Lt, H] float32/bfloat16/float16 text embeddings (incl. [CLS]/[SEP]).
        img_emb: [B, Nb, H] same dtype family, region embeddings.
        txt_pad: [B, Lt] bool, True at text pads. img_pad: [B, Nb] bool, True at region pads.
        beta, iteration, k, backend: as in :func:`ipot` (component "wra"). "cpp" and "triton" run the fused kernels
            (cost, IPOT, distance and backward without materialising normalised copies); "reference" the original
            maths. Pairs beyond the Triton tile use the reference, with a warning.
        txt_lens, img_lens: optional [B] int64 valid lengths, e.g. CPU tensors from the collate, so that nothing is
            derived from the pads (which costs device syncs on CUDA). On the CPU they are checked against the pads;
            on an accelerator only with ``check_values=True``.
        check_values: also check device-resident lengths and pads (a device sync).

    Returns:
        [B] float32 distance; differentiable w.r.t. both embeddings through the cost only (fp32 maths, gradients in
        the embeddings' dtype).
    """
    check_embeddings(txt_emb, img_emb)
    check_params(beta, iteration, k)
    batch, m, _ = txt_emb.shape
    n = img_emb.shape[1]
    txt_lens, img_lens = _lengths(txt_pad, img_pad, txt_lens, img_lens, batch, m, n, txt_emb.device, check_values)
    name = backends.resolve(
        "wra", backend, txt_emb.device, txt_emb.dtype, suffix_padded=txt_lens is not None, pair_size=(m, n)
    )
    if name != "reference":
        return fused_wra_distance(txt_emb, img_emb, txt_lens, img_lens, beta, iteration, k, name)
    cost = cost_matrix_cosine(txt_emb.float(), img_emb.float())
    cost = cost.masked_fill(txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2), 0)
    return _IpotDistance.apply(cost, txt_pad, img_pad, beta, iteration, k)
