"""The whole BUTD Faster R-CNN (ResNet-101 C4, Visual Genome) as one module with MILVLG's state-dict keys.

``backbone`` (stem, res2-res4) -> ``proposal_generator`` (RPN + proposal layer) -> ``roi_heads`` (RoI pooling, res5,
class and attribute heads). :meth:`Detector.forward` takes a batch of preprocessed images of any sizes: the trunk
and RPN run on images grouped by resized shape (no padding, so no border effects), the RoI head on all RoIs at once.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from uniter_fast.extract.backbone import Trunk
from uniter_fast.extract.config import DetectorConfig
from uniter_fast.extract.layers import Conv2dNorm
from uniter_fast.extract.roi_heads import RoIHeads
from uniter_fast.extract.rpn import ProposalGenerator


@dataclasses.dataclass
class RawDetections:
    """The detector's outputs for one image, before the max-confidence loop and box selection.

    rois [R, 4] float32 (x1, y1, x2, y2 in resized-image pixels, RPN score order); features [R, 2048] fp32
    (``pool5_flat``); cls_prob [R, 1601] fp32 (background in column 0); attr_prob [R, 401] fp32 or None.
    """

    rois: torch.Tensor
    features: torch.Tensor
    cls_prob: torch.Tensor
    attr_prob: Optional[torch.Tensor] = None


class Detector(nn.Module):
    """BUTD detector; ``config.blocks`` sets the depth (ResNet-101: (3, 4, 23, 3))."""

    def __init__(self, config: Optional[DetectorConfig] = None) -> None:
        super().__init__()
        self.config = config or DetectorConfig()
        self.backbone = Trunk(self.config.blocks[:3])
        self.proposal_generator = ProposalGenerator(self.config)
        self.roi_heads = RoIHeads(self.config)

    def fold_batchnorm(self) -> Detector:
        """Fold every frozen BatchNorm into its conv (the fast path); returns self."""
        for module in self.modules():
            if isinstance(module, Conv2dNorm):
                module.fold_norm()
        return self

    @torch.no_grad()
    def forward(
        self,
        blobs: Sequence[torch.Tensor],
        scales: Sequence[float],
        ops: str = "torch",
        chunk: int = 256,
        attributes: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> list[RawDetections]:
        """blobs: per image [3, H', W'] (``preprocess.image_blob``), scales: their resize factors.

        ``ops``: "torch" (plain-PyTorch RoI pooling and NMS) or "torchvision"; ``chunk``: RoIs per res5 call.
        """
        fmaps: list[Optional[torch.Tensor]] = [None] * len(blobs)
        rois: list[Optional[torch.Tensor]] = [None] * len(blobs)
        for size, members, fmap in self.trunk_by_shape(blobs, memory_format):
            proposals = self.proposal_generator(fmap, size, [scales[i] for i in members], ops)
            for slot, index in enumerate(members):
                fmaps[index], rois[index] = fmap[slot], proposals[slot]
        return self.heads(fmaps, rois, ops, chunk, attributes, memory_format)

    @torch.no_grad()
    def forward_boxes(
        self,
        blobs: Sequence[torch.Tensor],
        rois: Sequence[torch.Tensor],
        ops: str = "torch",
        chunk: int = 256,
        attributes: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> list[RawDetections]:
        """Given-box mode: the RoI head on ``rois`` (per image [R_i, 4] float32, resized-image pixels), no RPN."""
        fmaps: list[Optional[torch.Tensor]] = [None] * len(blobs)
        for _, members, fmap in self.trunk_by_shape(blobs, memory_format):
            for slot, index in enumerate(members):
                fmaps[index] = fmap[slot]
        return self.heads(fmaps, rois, ops, chunk, attributes, memory_format)

    def trunk_by_shape(
        self, blobs: Sequence[torch.Tensor], memory_format: torch.memory_format
    ) -> Iterator[tuple[tuple[int, int], list[int], torch.Tensor]]:
        """The trunk on images grouped by resized shape: yields ((H', W'), image indices, fmap [B, 1024, Hf, Wf])."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, blob in enumerate(blobs):
            groups[tuple(blob.shape[1:])].append(index)
        for size, members in groups.items():
            x = torch.stack([blobs[i] for i in members]).contiguous(memory_format=memory_format)
            yield size, members, self.backbone(x)

    def heads(
        self,
        fmaps: Sequence[torch.Tensor],
        rois: Sequence[torch.Tensor],
        ops: str,
        chunk: int,
        attributes: bool,
        memory_format: torch.memory_format,
    ) -> list[RawDetections]:
        """The RoI head on every image's RoIs at once, split back per image."""
        features, cls_prob, attr_prob = self.roi_heads(fmaps, rois, ops, chunk, attributes, memory_format)
        counts = [r.shape[0] for r in rois]
        split = [t.split(counts) if t is not None else [None] * len(counts) for t in (features, cls_prob, attr_prob)]
        return [RawDetections(r, f, c, a) for r, f, c, a in zip(rois, *split)]
