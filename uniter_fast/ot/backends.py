"""The IPOT backends behind one signature, and the choice among them.

Every runner takes a [B, M, N] cost, the pad masks and the valid lengths, and returns ``(plan [B, M, N] fp32,
distance [B] fp32 = Σ cost ⊙ plan)``. The fast runners need suffix padding (valid entries first), which is what every
UNITER collate produces; they read only the valid ``txt_lens[b] × img_lens[b]`` block of each pair.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch

from uniter_fast.ot.reference import ipot_reference

BACKENDS = ("reference", "cpp", "triton", "auto")
Runner = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


def cpp_available() -> bool:
    """True when the compiled extension ``uniter_fast._C`` with the IPOT kernel is importable."""
    try:
        from uniter_fast import _C
    except ImportError:
        return False
    return hasattr(_C, "ipot_forward")


def triton_available(device: torch.device) -> bool:
    """True when Triton imports and can run on ``device`` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends(device: torch.device) -> list[str]:
    """The backends usable for tensors on ``device``, fastest first (always ends with 'reference')."""
    names = []
    if device.type == "cuda" and triton_available(device):
        names.append("triton")
    if device.type == "cpu" and cpp_available():
        names.append("cpp")
    if device.type == "cpu" and triton_available(device):
        names.append("triton")
    return names + ["reference"]


def resolve_backend(backend: str, device: torch.device, suffix_padded: bool) -> str:
    """The concrete backend for ``backend`` on ``device``; ValueError if unknown or unusable there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not suffix_padded:
            warnings.warn("IPOT: pads are not a suffix of each row; using the reference backend", stacklevel=3)
            return "reference"
        return available_backends(device)[0]
    if backend not in available_backends(device):
        raise ValueError(f"backend {backend!r} is not available for tensors on {device}")
    if backend != "reference" and not suffix_padded:
        raise ValueError(f"backend {backend!r} needs txt_pad/img_pad True only at the end of each row")
    return backend


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
    """Plan [B, M, N] fp32 and distance [B] fp32 by the Triton kernel; shapes beyond its tile use the reference."""
    from uniter_fast.kernels.ipot import MAX_BLOCK, ipot_triton

    if cost.shape[1] > MAX_BLOCK or cost.shape[2] > MAX_BLOCK:
        warnings.warn(
            f"IPOT Triton kernel holds at most {MAX_BLOCK}x{MAX_BLOCK} per pair, got {tuple(cost.shape[1:])}; "
            "using the reference backend",
            stacklevel=3,
        )
        return run_reference(cost, txt_pad, img_pad, txt_lens, img_lens, beta, iteration, k)
    return ipot_triton(cost.detach(), txt_lens, img_lens, beta, iteration, k)


RUNNERS: dict[str, Runner] = {"reference": run_reference, "cpp": run_cpp, "triton": run_triton}
