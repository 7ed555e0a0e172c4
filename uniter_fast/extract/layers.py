"""The building blocks of the Caffe ResNet: frozen BatchNorm+Scale, conv with its norm, the MSRA bottleneck.

Module and buffer names follow MILVLG's detectron2 tree (``conv1.weight``, ``conv1.norm.running_var``,
``shortcut.norm.bias``) so that its checkpoint loads without renaming.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5  # Caffe BatchNorm's default eps


class FrozenBatchNorm2d(nn.Module):
    """Caffe ``BatchNorm`` (global statistics) + ``Scale``: y = (x - mean) / sqrt(var + eps) * weight + bias.

    Buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` [C] fp32, as detectron2's FrozenBatchNorm2d.
    """

    def __init__(self, num_features: int, eps: float = BN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale [C], shift [C]) with y = x * scale + shift, in the buffers' dtype."""
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C, H, W] -> same shape and dtype."""
        scale, shift = self.affine()
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class Conv2dNorm(nn.Conv2d):
    """A bias-free convolution followed by its ``norm`` (FrozenBatchNorm2d), as detectron2's ``Conv2d(norm=...)``.

    :meth:`fold_norm` merges the norm into the weights and a bias (the fast path); the unfolded module is the
    reference.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        padding = dilation * (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=False)
        self.norm: Optional[FrozenBatchNorm2d] = FrozenBatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, Cin, H, W] -> [N, Cout, H', W'] (conv, then the norm unless folded)."""
        x = super().forward(x)
        return x if self.norm is None else self.norm(x)

    @torch.no_grad()
    def fold_norm(self) -> None:
        """Fold the norm into the conv: w' = w * scale, bias = shift (computed in fp64, stored in the conv dtype)."""
        if self.norm is None:
            return
        scale, shift = (t.double() for t in self.norm.affine())
        self.weight.copy_((self.weight.double() * scale.view(-1, 1, 1, 1)).to(self.weight.dtype))
        self.bias = nn.Parameter(shift.to(self.weight.dtype), requires_grad=False)
        self.norm = None


class Bottleneck(nn.Module):
    """MSRA ResNet v1 bottleneck: the stride sits on the first 1x1 conv (``stride_in_1x1``), projection shortcut on
    the first block of a stage. x [N, Cin, H, W] -> relu(conv3(conv2(conv1(x))) + shortcut(x)) [N, Cout, H/s, W/s].
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.shortcut: Optional[Conv2dNorm] = None
        if in_channels != out_channels:
            self.shortcut = Conv2dNorm(in_channels, out_channels, 1, stride=stride)
        self.conv1 = Conv2dNorm(in_channels, mid_channels, 1, stride=stride)
        self.conv2 = Conv2dNorm(mid_channels, mid_channels, 3, dilation=dilation)
        self.conv3 = Conv2dNorm(mid_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, Cin, H, W] -> [N, Cout, H', W'] in x's dtype."""
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def make_stage(
    num_blocks: int, in_channels: int, mid_channels: int, out_channels: int, stride: int, dilation: int = 1
) -> nn.Sequential:
    """``num_blocks`` bottlenecks; only the first has the stride and the projection shortcut."""
    blocks = [Bottleneck(in_channels, mid_channels, out_channels, stride, dilation)]
    blocks += [Bottleneck(out_channels, mid_channels, out_channels, 1, dilation) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)
