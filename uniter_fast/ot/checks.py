"""Input validation for the OT entry points: shapes, dtypes, devices, lengths and the fp32-safe β range."""

from __future__ import annotations

import math
from typing import Optional

import torch

MIN_BETA = 0.05
"""Smallest β the exp-domain fp32 iteration is safe for (at β ≤ 0.02, exp(-C/β) of costs near 2 underflows: NaN)."""

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_params(beta: float, iteration: int, k: int) -> None:
    """Raise ValueError/TypeError unless β ≥ MIN_BETA is a finite number and iteration, k are positive ints."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        raise TypeError(f"beta must be a float, got {type(beta).__name__}")
    if not math.isfinite(beta) or beta < MIN_BETA:
        raise ValueError(f"beta must be a finite float >= {MIN_BETA} (fp32 underflows below), got {beta}")
    for name, value in (("iteration", iteration), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_pads(txt_pad: torch.Tensor, img_pad: torch.Tensor, batch: int, m: int, n: int, device: torch.device) -> None:
    """Raise unless txt_pad is [batch, m] bool and img_pad is [batch, n] bool on ``device``, each pair non-empty.

    The non-empty check reads the pads' values (a device sync on CUDA)."""
    check_pad_layout(txt_pad, img_pad, batch, m, n, device)
    if batch and bool((txt_pad.all(dim=1) | img_pad.all(dim=1)).any()):
        raise ValueError("every pair needs at least one non-pad text token and one non-pad region (txt_pad/img_pad)")


def check_pad_layout(
    txt_pad: torch.Tensor, img_pad: torch.Tensor, batch: int, m: int, n: int, device: torch.device
) -> None:
    """Raise unless txt_pad is [batch, m] bool and img_pad is [batch, n] bool on ``device`` (metadata only)."""
    for name, pad, size in (("txt_pad", txt_pad, m), ("img_pad", img_pad, n)):
        if not isinstance(pad, torch.Tensor) or pad.dtype != torch.bool:
            got = pad.dtype if isinstance(pad, torch.Tensor) else type(pad).__name__
            raise TypeError(f"{name} must be a bool tensor, got {got}")
        if tuple(pad.shape) != (batch, size):
            raise ValueError(f"{name} must have shape {(batch, size)}, got {tuple(pad.shape)}")
        if pad.device != device:
            raise ValueError(f"{name} must be on {device}, got {pad.device}")


def check_length_args(
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    txt_pad: torch.Tensor,
    img_pad: torch.Tensor,
    check_values: bool,
) -> None:
    """Raise unless txt_lens/img_lens are [B] integer tensors (CPU or the pads' device) matching the pads.

    Ranges (1 <= len <= pad width) are checked when both lengths are on the CPU, and the pads' agreement (True exactly
    from len on) when the pads are too: no device sync. Anything on an accelerator is read only when ``check_values``
    is True (a device sync).
    """
    for name, lens, pad in (("txt_lens", txt_lens, txt_pad), ("img_lens", img_lens, img_pad)):
        if not isinstance(lens, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(lens).__name__}")
        if lens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"{name} must be int64 (or int32), got {lens.dtype}")
        if tuple(lens.shape) != (pad.shape[0],):
            raise ValueError(f"{name} must have shape ({pad.shape[0]},), got {tuple(lens.shape)}")
        if lens.device.type != "cpu" and lens.device != pad.device:
            raise ValueError(f"{name} must be on the CPU or on {pad.device}, got {lens.device}")
    on_host = txt_lens.device.type == "cpu" and img_lens.device.type == "cpu"
    if not (on_host or check_values):
        return
    for name, lens, pad_name, pad in (
        ("txt_lens", txt_lens, "txt_pad", txt_pad),
        ("img_lens", img_lens, "img_pad", img_pad),
    ):
        bad = (lens < 1) | (lens > pad.shape[1])
        if bool(bad.any()):
            b = int(bad.nonzero()[0, 0])
            raise ValueError(f"{name}[{b}] must be in [1, {pad.shape[1]}], got {int(lens[b])}")
        if pad.device.type == "cpu" or check_values:
            expected = torch.arange(pad.shape[1], device=pad.device)[None] >= lens.to(pad.device)[:, None]
            if not bool(torch.equal(expected, pad)):
                raise ValueError(f"{pad_name} must be True exactly at positions >= {name} (suffix padding)")


def check_float(name: str, x: torch.Tensor, ndim: int) -> None:
    """Raise unless ``x`` is a float32/bfloat16/float16 tensor with ``ndim`` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_embeddings(txt_emb: torch.Tensor, img_emb: torch.Tensor) -> None:
    """Raise unless txt_emb [B, Lt, H] and img_emb [B, Nb, H] are float tensors with matching B, H and device."""
    check_float("txt_emb", txt_emb, 3)
    check_float("img_emb", img_emb, 3)
    if img_emb.shape[0] != txt_emb.shape[0] or img_emb.shape[2] != txt_emb.shape[2]:
        raise ValueError(
            f"img_emb must have shape [{txt_emb.shape[0]}, Nb, {txt_emb.shape[2]}] to match txt_emb "
            f"{tuple(txt_emb.shape)}, got {tuple(img_emb.shape)}"
        )
    if img_emb.device != txt_emb.device:
        raise ValueError(f"img_emb must be on {txt_emb.device} like txt_emb, got {img_emb.device}")


def suffix_lengths(pad: torch.Tensor) -> Optional[torch.Tensor]:
    """[B] int64 valid lengths when every row of ``pad`` [B, L] is False…False True…True; None otherwise."""
    lengths = pad.shape[1] - pad.sum(dim=1)
    expected = torch.arange(pad.shape[1], device=pad.device).unsqueeze(0) >= lengths.unsqueeze(1)
    return lengths if bool(torch.equal(expected, pad)) else None
