"""The reference IPOT (UNITER's original ``model/ot.py`` loop in plain PyTorch, fp32) and the original's distance."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ipot_reference(
    cost: torch.Tensor, txt_pad: torch.Tensor, img_pad: torch.Tensor, beta: float, iteration: int, k: int
) -> torch.Tensor:
    """IPOT plan by the original loop (same init, update order, pad guards); any pad masks, any device.

    Args:
        cost: [B, M, N] cost (text × regions), any float dtype; computed in fp32.
        txt_pad: [B, M] bool, True at text pads.
        img_pad: [B, N] bool, True at region pads.
        beta, iteration, k: proximal step size, outer iterations, inner Sinkhorn sweeps.

    Returns:
        [B, M, N] float32 plan, exactly zero at pad rows/columns.
    """
    with torch.no_grad():
        c = cost.detach().float()
        b, m, n = c.shape
        x_len = (m - txt_pad.sum(dim=1)).to(c.dtype)
        y_len = (n - img_pad.sum(dim=1)).to(c.dtype)
        joint_pad = (txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2)).transpose(1, 2)  # [B, N, M]
        sigma = torch.ones(b, m, dtype=c.dtype, device=c.device) / x_len.unsqueeze(1)
        plan = torch.ones(b, n, m, dtype=c.dtype, device=c.device)
        kernel = torch.exp(-c.transpose(1, 2) / beta)
        sigma.masked_fill_(txt_pad, 0)
        plan.masked_fill_(joint_pad, 0)
        kernel.masked_fill_(joint_pad, 0)
        x_len = x_len.view(b, 1, 1)
        y_len = y_len.view(b, 1, 1)
        x_mask = (txt_pad.to(c.dtype) * 1e4).unsqueeze(1)
        y_mask = (img_pad.to(c.dtype) * 1e4).unsqueeze(1)
        for _ in range(iteration):
            q = kernel * plan
            for _ in range(k):  # the original reshapes sigma once per outer step, which breaks k > 1
                delta = 1 / (y_len * q.matmul(sigma.view(b, m, 1)).view(b, 1, n) + y_mask)
                sigma = 1 / (x_len * delta.matmul(q) + x_mask)
            plan = delta.view(b, n, 1) * q * sigma
        plan.masked_fill_(joint_pad, 0)
        return plan.transpose(1, 2).contiguous()


def original_optimal_transport_dist(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    beta: float = 0.5,
    iteration: int = 50,
    k: int = 1,
) -> torch.Tensor:
    """The original ``model/ot.py`` ``optimal_transport_dist`` maths, step for step: the cosine cost of the
    L2-normalised copies (eps 1e-5), pads zeroed, the IPOT plan in the original's [B, N, M] layout, and the distance as
    trace(C @ T) (a [B, M, M] product). The benchmarks' anchor and a test oracle; the library's reference path computes
    the same value as Σ C ⊙ T.

    Args: txt_emb [B, M, D], img_emb [B, N, D] float (computed in their dtype), pads [B, M] / [B, N] bool.
    Returns: [B] distance, differentiable w.r.t. the embeddings through the cost (plan detached).
    """
    x = F.normalize(txt_emb, p=2, dim=-1, eps=1e-5)
    y = F.normalize(img_emb, p=2, dim=-1, eps=1e-5)
    cost = 1 - x.matmul(y.transpose(1, 2))
    cost = cost.masked_fill(txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2), 0)
    plan_nm = ipot_reference(cost.detach(), txt_pad, img_pad, beta, iteration, k).transpose(1, 2)
    return torch.diagonal(cost.matmul(plan_nm), dim1=1, dim2=2).sum(dim=-1)
