"""Attention cores behind the encoder's backend switch, for the padded layout [B, heads, L, head_dim].

``eager`` is the reference: the original UNITER/BERT math (scores / sqrt(d) + additive mask, softmax, dropout,
weighted sum). ``sdpa`` gives the same function through ``torch.nn.functional.scaled_dot_product_attention``, which
picks a fused kernel where one exists. Both take the additive mask of the original code, shaped [B, 1, 1, L]
(0 for valid keys, -10000 for padded ones), so they agree to rounding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """Reference attention. query/key/value: [B, heads, L, d]; additive_mask: [B, 1, 1, L]. Returns [B, heads, L, d]."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    probs = torch.softmax(scores + additive_mask, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, value)


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """PyTorch SDPA with the same additive mask. Shapes as :func:`eager_attention`."""
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=additive_mask.to(query.dtype), dropout_p=dropout_p
    )


PADDED_ATTENTION: dict[str, Callable[..., torch.Tensor]] = {"eager": eager_attention, "sdpa": sdpa_attention}


def padded_attention(name: str) -> Callable[..., torch.Tensor]:
    """The attention core called ``name`` (one of ``PADDED_ATTENTION``)."""
    if name not in PADDED_ATTENTION:
        raise ValueError(f"attention backend must be one of {sorted(PADDED_ATTENTION)}, got {name!r}")
    return PADDED_ATTENTION[name]
