"""The region proposal network: the pairwise-softmax head and the proposal layer (``lib/rpn/proposal_layer.py``).

Head: ``rpn_conv/3x3`` 1024 -> 512 + ReLU; ``rpn_cls_score`` 1x1 -> 24 channels laid out [12 background | 12
foreground] with a softmax over each (bg, fg) pair; ``rpn_bbox_pred`` 1x1 -> 48 = 12 anchors x (dx, dy, dw, dh).
Proposal layer, per image: anchors in (h, w, a) order, decode, clip to the resized image, drop boxes smaller than
``16 * scale``, keep the top 6000 by foreground probability, NMS 0.7, keep the top 300.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.extract.boxes import caffe_anchors, clip_boxes, decode_boxes, large_enough, shifted_anchors
from uniter_fast.extract.config import FEAT_STRIDE, DetectorConfig
from uniter_fast.extract.nms import rpn_nms

RPN_CHANNELS = 512


class RPNHead(nn.Module):
    """MILVLG's ``StandardBUARPNHead`` names: ``conv``, ``objectness_logits`` (2A), ``anchor_deltas`` (4A)."""

    def __init__(self, in_channels: int = 1024, num_anchors: int = 12) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, RPN_CHANNELS, 3, padding=1)
        self.objectness_logits = nn.Conv2d(RPN_CHANNELS, 2 * num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(RPN_CHANNELS, 4 * num_anchors, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, 1024, H, W] -> (logits [B, 2A, H, W], deltas [B, 4A, H, W]) in x's dtype."""
        t = F.relu(self.conv(x))
        return self.objectness_logits(t), self.anchor_deltas(t)


class ProposalGenerator(nn.Module):
    """The RPN head plus the proposal layer; ``rpn_head`` keeps MILVLG's key prefix ``proposal_generator.rpn_head``."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.rpn_head = RPNHead()

    def forward(
        self, fmap: torch.Tensor, image_size: tuple[int, int], scales: Sequence[float], ops: str = "torch"
    ) -> list[torch.Tensor]:
        """fmap [B, 1024, Hf, Wf] of B images resized to the same ``image_size`` (H', W'), their resize ``scales``.

        Returns per image the proposals [n <= post_nms_top_n, 4] float32 in resized-image pixels, best first.
        """
        logits, deltas = self.rpn_head(fmap)
        return self.proposals(logits.float(), deltas.float(), image_size, scales, ops)

    def proposals(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        image_size: tuple[int, int],
        scales: Sequence[float],
        ops: str = "torch",
    ) -> list[torch.Tensor]:
        """The proposal layer on float32 head outputs logits [B, 2A, Hf, Wf], deltas [B, 4A, Hf, Wf]."""
        cfg = self.config
        b, two_a, hf, wf = logits.shape
        a = two_a // 2
        fg = torch.softmax(logits.view(b, 2, a, hf, wf), dim=1)[:, 1].permute(0, 2, 3, 1).reshape(b, -1)
        deltas = deltas.view(b, a, 4, hf, wf).permute(0, 3, 4, 1, 2).reshape(b, -1, 4)
        # made here in float32: a module buffer would follow .to(bfloat16), and bf16 cannot hold 375 or 359
        anchors = shifted_anchors(caffe_anchors().to(logits.device), hf, wf, FEAT_STRIDE)
        boxes = clip_boxes(decode_boxes(anchors[None], deltas), *image_size)
        min_size = torch.tensor(scales, dtype=torch.float32, device=boxes.device)[:, None] * cfg.rpn_min_size
        valid = large_enough(boxes, min_size)
        scores = fg.masked_fill(~valid, float("-inf"))
        top = min(cfg.rpn_pre_nms_top_n, scores.shape[1])
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top]
        boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
        num_valid = valid.sum(1).clamp(max=top)
        if ops == "torchvision":
            return self._torchvision_nms(boxes, scores.gather(1, order), num_valid)
        keep = rpn_nms(boxes, num_valid, cfg.rpn_nms_thresh, cfg.rpn_post_nms_top_n)
        return [boxes[i][keep[i]] for i in range(b)]

    def _torchvision_nms(
        self, boxes: torch.Tensor, scores: torch.Tensor, num_valid: torch.Tensor
    ) -> list[torch.Tensor]:
        """``torchvision.ops.nms`` on boxes + (0, 0, 1, 1): the +1 IoU, except that it suppresses only when
        IoU > thresh (cpu_nms: >=) and rounds (x2 + 1) - x1 instead of x2 - x1 + 1; exact ties can differ."""
        from torchvision.ops import nms

        shift = torch.tensor([0.0, 0.0, 1.0, 1.0], device=boxes.device)
        out = []
        for i, n in enumerate(num_valid.tolist()):
            keep = nms(boxes[i, :n] + shift, scores[i, :n], self.config.rpn_nms_thresh)
            out.append(boxes[i, :n][keep[: self.config.rpn_post_nms_top_n]])
        return out
