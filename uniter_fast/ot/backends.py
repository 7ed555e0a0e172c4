"""The IPOT backends behind one signature.

Every runner takes a [B, M, N] cost, the pad masks and the valid lengths, and returns ``(plan [B, M, N] fp32,
distance [B] fp32 = Σ cost ⊙ plan)``. The fast runners need suffix padding (valid entries first), which is what every
UNITER collate produces; they read only the valid ``txt_lens[b] × img_lens[b]`` block of each pair. Which one runs is
:func:`uniter_fast.backends.resolve`'s choice (component ``"ipot"``; ``"wra"`` for the fused distance).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from uniter_fast import backends
from uniter_fast.ot.reference import ipot_reference

Runner = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def available_backends(device: torch.device) -> list[str]:
    """The IPOT / WRA backends usable for tensors on ``device``, fastest first (always ends with 'reference');
    :func:`uniter_fast.backends.available` of component ``"ipot"``."""
    return backends.available("ipot", device)


def run_reference(
    cost: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    txt_lens: Optional[torch.Tensor],
    img_lens: Optional[torch.Tensor],
    beta: float,
    iteration: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan [B, M, N] fp32 and distance [B] fp32 by the original PyTorch loop (lengths unused)."""
    plan = ipot_reference(cost, txt_pad, img_pad, beta, iteration, k)
    cost32 = cost.detach().float().masked_fill(txt_pad.unsqueeze(-1) | img_pad.unsqueeze(-2), 0)
    return plan, (cost32 * plan).sum(dim=(1, 2))


def run_cpp(
    cost: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    beta: float,
    iteration: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan [B, M, N] fp32 and distance [B] fp32 by the OpenMP C++ kernel (CPU tensors, suffix pads)."""
    from uniter_fast import _C

    cost32 = cost.detach().float().contiguous()
    lens_t = txt_lens.to(torch.int64).contiguous()
    lens_i = img_lens.to(torch.int64).contiguous()
    plan = torch.empty(cost32.shape, dtype=torch.float32)
    dist = torch.empty(cost32.shape[0], dtype=torch.float32)
    _C.ipot_forward(
        cost32.numpy(),
        lens_t.numpy(),
        lens_i.numpy(),
        float(beta),
        int(iteration),
        int(k),
        plan.numpy(),
        dist.numpy(),
        torch.get_num_threads(),
    )
    return plan, dist


def run_triton(
    cost: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    beta: float,
    iteration: int,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plan [B, M, N] fp32 and distance [B] fp32 by the Triton kernel (M, N at most its tile, ``MAX_BLOCK`` of
    :mod:`uniter_fast.kernels.ipot`; the resolver sends larger pairs to the reference)."""
    from uniter_fast.kernels.ipot import ipot_triton

    return ipot_triton(cost.detach(), txt_lens, img_lens, beta, iteration, k)


RUNNERS: dict[str, Runner] = {"reference": run_reference, "cpp": run_cpp, "triton": run_triton}
