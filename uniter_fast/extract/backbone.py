"""The trunk: the Caffe ResNet stem and res2-res4 (C4, stride 16, 1024 channels).

Caffe's stem differs from torchvision's: the 3x3/2 max-pool has **no padding and ``ceil_mode=True``** (torchvision
pads by 1), and every stage puts its stride on the first 1x1 conv (``stride_in_1x1``, MSRA ResNet v1).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.extract.layers import Conv2dNorm, make_stage

STEM_CHANNELS = 64
STAGE_WIDTHS = ((64, 256), (128, 512), (256, 1024), (512, 2048))  # (bottleneck, output) channels of res2..res5


class Stem(nn.Module):
    """conv1 7x7/2 pad 3 (no bias) + BN/Scale + ReLU + max-pool 3x3/2 pad 0 ceil_mode."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = Conv2dNorm(3, STEM_CHANNELS, 7, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] (mean-subtracted BGR) -> [N, 64, ceil((ceil(H/2) - 3) / 2) + 1, ...]."""
        return F.max_pool2d(F.relu(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Trunk(nn.Module):
    """stem, res2 (stride 4), res3 (8), res4 (16): ``blocks`` bottlenecks per stage, output [N, 1024, H/16, W/16]."""

    def __init__(self, blocks: Sequence[int]) -> None:
        super().__init__()
        self.stem = Stem()
        in_channels = STEM_CHANNELS
        for index, (name, stride) in enumerate((("res2", 1), ("res3", 2), ("res4", 2))):
            mid, out = STAGE_WIDTHS[index]
            self.add_module(name, make_stage(blocks[index], in_channels, mid, out, stride))
            in_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, 3, H, W] -> res4 features [N, 1024, Hf, Wf] in x's dtype and memory format."""
        return self.res4(self.res3(self.res2(self.stem(x))))


def make_res5(num_blocks: int) -> nn.Sequential:
    """The RoI head's res5: stride 1 and 3x3 convs with **dilation 2, pad 2** (1024 -> 2048 channels)."""
    mid, out = STAGE_WIDTHS[3]
    return make_stage(num_blocks, STAGE_WIDTHS[2][1], mid, out, stride=1, dilation=2)
