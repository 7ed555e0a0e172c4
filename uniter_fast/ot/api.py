"""Public OT entry points: the IPOT plan and UNITER's differentiable Wasserstein distance."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from uniter_fast.ot.backends import RUNNERS, resolve_backend
from uniter_fast.ot.checks import check_embeddings, check_float, check_pads, check_params, suffix_lengths


def _prepare(
    cost: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float, iteration: int, k: int, backend: str
) -> tuple[str, Any, Any]:
    """Validate a [B, M, N] cost problem; returns (backend, txt_lens, img_lens) (lengths None if not suffix pads)."""
    check_float("cost", cost, 3)
    check_params(beta, iteration, k)
    check_pads(txt_pad, img_pad, cost.shape[0], cost.shape[1], cost.shape[2], cost.device)
    txt_lens, img_lens = suffix_lengths(txt_pad), suffix_lengths(img_pad)
    name = resolve_backend(backend, cost.device, txt_lens is not None and img_lens is not None)
    return name, txt_lens, img_lens


class _IpotDistance(torch.autograd.Function):
    """distance_b = Σ_ij C_bij T_bij with the IPOT plan T computed from C.detach(); ∂distance/∂C = T (detached)."""

    @staticmethod
    def forward(ctx: Any, cost: torch.Tensor, txt_pad, img_pad, txt_lens, img_lens, beta, iteration, k, backend):
        plan, dist = RUNNERS[backend](cost, txt_pad, img_pad, txt_lens, img_lens, beta, iteration, k)
        ctx.save_for_backward(plan)
        ctx.cost_dtype = cost.dtype
        return dist

    @staticmethod
    def backward(ctx: Any, grad_dist: torch.Tensor):
        (plan,) = ctx.saved_tensors
        grad_cost = (grad_dist.to(plan.dtype)[:, None, None] * plan).to(ctx.cost_dtype)
        return (grad_cost,) + (None,) * 8


def cost_matrix_cosine(txt_emb: torch.Tensor, img_emb: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
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
) -> torch.Tensor:
    """IPOT transport plan of UNITER's algorithm (uniform marginals 1/len over non-pad positions).

    Args:
        cost: [B, M, N] float32/bfloat16/float16 cost, text × regions (read in fp32; pad entries are ignored).
        txt_pad: [B, M] bool, True at text pads. img_pad: [B, N] bool, True at region pads. Every pair needs at
            least one non-pad on each side; the fast backends need pads only at the end of each row.
        beta: proximal step (>= 0.05), iteration: outer steps, k: inner Sinkhorn sweeps.
        backend: "reference", "cpp" (CPU), "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "auto".

    Returns:
        [B, M, N] float32 plan (note: the original returns it transposed, [B, N, M]), zero at pads, no gradient.
    """
    name, txt_lens, img_lens = _prepare(cost, txt_pad, img_pad, beta, iteration, k, backend)
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
) -> torch.Tensor:
    """UNITER's WRA distance: Σ C ⊙ T with C = 1 − cos(txt, img) (pads zeroed) and T the detached IPOT plan.

    Args:
        txt_emb: [B, Lt, H] float32/bfloat16/float16 text embeddings (incl. [CLS]/[SEP]).
        img_emb: [B, Nb, H] same dtype family, region embeddings.
        txt_pad: [B, Lt] bool, True at text pads. img_pad: [B, Nb] bool, True at region pads.
        beta, iteration, k, backend: as in :func:`ipot`.

    Returns:
        [B] float32 distance; differentiable w.r.t. both embeddings through the cost only (computed in fp32).
    """
    check_embeddings(txt_emb, img_emb)
    cost = cost_matrix_cosine(txt_emb.float(), img_emb.float())
    name, txt_lens, img_lens = _prepare(cost, txt_pad, img_pad, beta, iteration, k, backend)
    cost = cost.masked_fill(txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2), 0)
    return _IpotDistance.apply(cost, txt_pad, img_pad, txt_lens, img_lens, beta, iteration, k, name)
