"""Shared inputs and oracles for the OT tests: ragged random problems and an fp64 NumPy IPOT."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from uniter_fast.ot import cost_matrix_cosine


@dataclass
class Problem:
    """A ragged batch: embeddings, their cosine cost [B, M, N] (pads zeroed), suffix pads and lengths."""

    txt_emb: torch.Tensor
    img_emb: torch.Tensor
    cost: torch.Tensor
    txt_pad: torch.Tensor
    img_pad: torch.Tensor
    txt_lens: torch.Tensor
    img_lens: torch.Tensor


def random_problem(batch: int, m: int, n: int, hidden: int = 16, dtype: torch.dtype = torch.float32) -> Problem:
    """Fresh random embeddings with ragged lengths in [1, m] × [1, n]; pair 0 uses the full m × n."""
    txt_lens = torch.randint(1, m + 1, (batch,))
    img_lens = torch.randint(1, n + 1, (batch,))
    txt_lens[0], img_lens[0] = m, n
    txt_pad = torch.arange(m)[None] >= txt_lens[:, None]
    img_pad = torch.arange(n)[None] >= img_lens[:, None]
    txt_emb = torch.randn(batch, m, hidden).to(dtype)
    img_emb = torch.randn(batch, n, hidden).to(dtype)
    cost = cost_matrix_cosine(txt_emb.float(), img_emb.float())
    cost = cost.masked_fill(txt_pad[:, :, None] | img_pad[:, None, :], 0).to(dtype)
    return Problem(txt_emb, img_emb, cost, txt_pad, img_pad, txt_lens, img_lens)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected| (in float64)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def ipot_numpy(cost: np.ndarray, beta: float, iteration: int, k: int) -> np.ndarray:
    """fp64 IPOT on one pair's valid [m, n] cost block (paper's Algorithm 1 with UNITER's init and order)."""
    m, n = cost.shape
    kernel = np.exp(-cost / beta)
    plan = np.ones((m, n))
    sigma = np.full(m, 1.0 / m)
    delta = np.zeros(n)
    for _ in range(iteration):
        q = kernel * plan
        for _ in range(k):
            delta = 1.0 / (n * (q.T @ sigma))
            sigma = 1.0 / (m * (q @ delta))
        plan = sigma[:, None] * q * delta[None, :]
    return plan
