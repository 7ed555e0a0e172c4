"""The GELU of the encoder and heads, in two written forms of the same function (the exact, erf GELU).

``"fused"`` (default) is ``torch.nn.functional.gelu``: one kernel. ``"original"`` is the formula as the original
UNITER / pytorch_pretrained_bert code writes it, ``x * 0.5 * (1 + erf(x / sqrt(2)))``: five elementwise kernels and
their intermediate tensors, which the benches' ``original`` path times. Both agree to rounding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.config import check_gelu


def original_gelu(x: torch.Tensor) -> torch.Tensor:
    """The erf GELU written out as the original code does. x: any shape and float dtype; returns the same."""
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


class Gelu(nn.Module):
    """The exact GELU in the written form ``variant`` (no parameters, so state dicts are unchanged)."""

    def __init__(self, variant: str = "fused") -> None:
        super().__init__()
        check_gelu(variant)
        self.variant = variant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: any shape and float dtype; returns GELU(x), same shape and dtype."""
        return F.gelu(x) if self.variant == "fused" else original_gelu(x)

    def extra_repr(self) -> str:
        """The variant, shown in the module's repr."""
        return f"variant={self.variant!r}"


def set_gelu(model: nn.Module, variant: str) -> None:
    """Switch every :class:`Gelu` of ``model`` (encoder and heads) to ``variant``, and ``model.config.gelu`` /
    ``model.uniter.config.gelu`` where present (one config object is shared)."""
    check_gelu(variant)
    for module in model.modules():
        if isinstance(module, Gelu):
            module.variant = variant
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "gelu"):
            config.gelu = variant
