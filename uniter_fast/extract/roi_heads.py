"""The RoI head: 14x14 RoI pooling on res4, the dilated res5, ``pool5_flat``, the class and attribute heads.

More than 90% of the detector's FLOPs are here (res5 on 300 RoIs of 14x14), and nothing in it depends on the image,
so :meth:`RoIHeads.forward` runs res5 on the RoIs of all images of a batch together, in chunks of ``chunk`` RoIs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.extract.backbone import make_res5
from uniter_fast.extract.config import FEAT_STRIDE, IMG_FEAT_DIM, NUM_ATTRIBUTES, NUM_CLASSES, DetectorConfig
from uniter_fast.extract.roi_pool import roi_pool

CLS_EMBED_DIM = 256
ATTR_HIDDEN = 512


class BoxPredictor(nn.Module):
    """``cls_score`` (1601 classes, background first) and the attribute head of MILVLG's
    ``BUACaffeFastRCNNOutputLayers``: argmax class -> ``cls_embed`` (256) -> concat with the feature (2304) ->
    ``attr_linear1`` (512) + ReLU -> ``attr_linear2`` (401) -> softmax. (``bbox_pred`` is not used: UNITER keeps the
    RPN RoIs, not regressed boxes; the loader checks and skips its weights.)"""

    def __init__(self, attributes: bool) -> None:
        super().__init__()
        self.cls_score = nn.Linear(IMG_FEAT_DIM, NUM_CLASSES)
        self.attributes = attributes
        if attributes:
            self.cls_embed = nn.Embedding(NUM_CLASSES, CLS_EMBED_DIM)
            self.attr_linear1 = nn.Linear(IMG_FEAT_DIM + CLS_EMBED_DIM, ATTR_HIDDEN)
            self.attr_linear2 = nn.Linear(ATTR_HIDDEN, NUM_ATTRIBUTES)

    def forward(self, pooled: torch.Tensor, attributes: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """pooled [R, 2048] -> (cls_prob [R, 1601] fp32, attr_prob [R, 401] fp32 or None)."""
        logits = self.cls_score(pooled).float()
        cls_prob = torch.softmax(logits, dim=-1)
        if not (attributes and self.attributes):
            return cls_prob, None
        embed = self.cls_embed(logits.argmax(dim=-1))
        hidden = F.relu(self.attr_linear1(torch.cat([pooled, embed.to(pooled.dtype)], dim=-1)))
        return cls_prob, torch.softmax(self.attr_linear2(hidden).float(), dim=-1)


class RoIHeads(nn.Module):
    """``roi_heads.res5`` + ``roi_heads.box_predictor`` (MILVLG key prefixes)."""

    def __init__(self, config: DetectorConfig) -> None:
        super().__init__()
        self.config = config
        self.res5 = make_res5(config.blocks[3])
        self.box_predictor = BoxPredictor(config.attributes)

    def pool(self, fmaps: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor], ops: str = "torch") -> torch.Tensor:
        """RoI-pool each image's boxes [R_i, 4] (resized pixels) on its map [1024, Hf, Wf]: [sum R_i, 1024, 14, 14]."""
        size = self.config.roi_pool_size
        return torch.cat([roi_pool(f, b, size, 1.0 / FEAT_STRIDE, ops) for f, b in zip(fmaps, boxes)])

    def forward(
        self,
        fmaps: Sequence[torch.Tensor],
        boxes: Sequence[torch.Tensor],
        ops: str = "torch",
        chunk: int = 256,
        attributes: bool = False,
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """All images' RoIs through res5 together.

        Returns (features = ``pool5_flat`` [sum R_i, 2048] fp32, cls_prob [sum R_i, 1601] fp32, attr_prob or None).
        """
        features, probs, attrs = [], [], []
        pooled_all = self.pool(fmaps, boxes, ops)
        for start in range(0, pooled_all.shape[0], chunk):
            pooled = pooled_all[start : start + chunk].contiguous(memory_format=memory_format)
            feat = self.res5(pooled).mean(dim=(2, 3))
            cls_prob, attr_prob = self.box_predictor(feat, attributes)
            features.append(feat.float())
            probs.append(cls_prob)
            attrs.append(attr_prob)
        if not features:
            empty = pooled_all.new_zeros(0, IMG_FEAT_DIM).float()
            return empty, empty.new_zeros(0, NUM_CLASSES), empty.new_zeros(0, NUM_ATTRIBUTES) if attributes else None
        attr = torch.cat(attrs) if attrs[0] is not None else None
        return torch.cat(features), torch.cat(probs), attr
