"""Right-padding of per-example tensors, as the original collates' ``pad_sequence`` / ``pad_tensors``."""

from __future__ import annotations

import torch


def pad_1d(seqs: list[torch.Tensor], value: int) -> torch.Tensor:
    """Right-pad 1-d tensors to [B, max len] with ``value`` (same dtype)."""
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


def pad_2d(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Zero-pad [n_i, D] tensors to [B, max n_i, D]."""
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=0.0)
