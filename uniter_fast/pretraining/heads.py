"""Pretraining heads of UNITER with the original module and parameter names (``model/pretrain.py``).

``cls.predictions.*`` (MLM, decoder tied to the word embeddings), ``feat_regress.*`` (MRFR, weight tied to
``img_linear.weight`` and used transposed), ``region_classifier.*`` (MRC / MRC-kl) and ``itm_output`` (ITM). Each
head exposes the "small transform" (Linear + GELU + LayerNorm) separately from its final projection, so the loss
functions of ``uniter_fast.losses`` can fuse the projection with the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from uniter_fast.config import IMG_LABEL_DIM, UniterConfig
from uniter_fast.model.activations import Gelu


class BertPredictionHeadTransform(nn.Module):
    """dense (H->H) -> GELU -> LayerNorm, as in pytorch_pretrained_bert."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = Gelu(config.gelu)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[M, H] -> [M, H], same dtype."""
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """transform, then ``decoder`` (weight tied to the word embeddings, no bias of its own) plus ``bias`` [V]."""

    def __init__(self, config: UniterConfig, embedding_weight: nn.Parameter) -> None:
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(embedding_weight.size(1), embedding_weight.size(0), bias=False)
        self.decoder.weight = embedding_weight
        self.bias = nn.Parameter(torch.zeros(embedding_weight.size(0)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[M, H] -> vocabulary logits [M, V]."""
        return self.decoder(self.transform(hidden_states)) + self.bias


class BertOnlyMLMHead(nn.Module):
    """The MLM head of BERT/UNITER; its parameters live under ``cls.predictions.*``."""

    def __init__(self, config: UniterConfig, embedding_weight: nn.Parameter) -> None:
        super().__init__()
        self.predictions = BertLMPredictionHead(config, embedding_weight)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """[M, H] -> [M, V] logits."""
        return self.predictions(sequence_output)


def small_transform(config: UniterConfig) -> list[nn.Module]:
    """Linear(H, H), GELU, LayerNorm(H): the ``net.0``/``net.1``/``net.2`` layers of the region heads."""
    return [
        nn.Linear(config.hidden_size, config.hidden_size),
        Gelu(config.gelu),
        nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps),
    ]


class RegionFeatureRegression(nn.Module):
    """MRFR head: ``net`` (Linear, GELU, LN), then ``x @ weight + bias`` with ``weight`` = ``img_linear.weight``
    [H, 2048] (shared Parameter) and its own ``bias`` [2048]."""

    def __init__(self, config: UniterConfig, img_linear_weight: nn.Parameter) -> None:
        super().__init__()
        self.net = nn.Sequential(*small_transform(config))
        self.weight = img_linear_weight
        self.bias = nn.Parameter(torch.zeros(img_linear_weight.size(1)))

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """[M, H] -> regressed features [M, 2048]."""
        return torch.nn.functional.linear(self.net(input_), self.weight.t(), self.bias)


class RegionClassification(nn.Module):
    """MRC head: ``net`` = Linear, GELU, LN, Linear(H, 1601)."""

    def __init__(self, config: UniterConfig, label_dim: int = IMG_LABEL_DIM) -> None:
        super().__init__()
        self.net = nn.Sequential(*small_transform(config), nn.Linear(config.hidden_size, label_dim))

    def transform(self, input_: torch.Tensor) -> torch.Tensor:
        """The first three layers (Linear, GELU, LN): [M, H] -> [M, H]."""
        return self.net[2](self.net[1](self.net[0](input_)))

    @property
    def output(self) -> nn.Linear:
        """The final Linear(H, 1601) (``net.3``)."""
        return self.net[3]

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        """[M, H] -> class logits [M, 1601]."""
        return self.net(input_)
