"""The reference IPOT: UNITER's original ``model/ot.py`` loop in plain PyTorch, fp32."""

from __future__ import annotations

import torch


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
