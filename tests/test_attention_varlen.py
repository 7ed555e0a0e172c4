"""Varlen (packed) attention backends against a float64 per-sequence reference (the choice among them:
tests/test_backends.py)."""

from __future__ import annotations

import math

import pytest
import torch

from uniter_fast.model.attention import VARLEN_ATTENTION, VarlenBatch

CPU_BACKENDS = ["reference", "sdpa_loop", "sdpa_padded", "sdpa_nested"]


def make_batch(lengths: list[int], backend: str) -> VarlenBatch:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return VarlenBatch(cu, max(lengths), backend)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """Per-sequence softmax(q k^T / sqrt(d)) v in float64, no padding anywhere."""
    outs, start = [], 0
    for length in lengths:
        qi, ki, vi = (t[start : start + length].double().transpose(0, 1) for t in (q, k, v))
        probs = torch.softmax(qi @ ki.transpose(-1, -2) / math.sqrt(q.size(-1)), dim=-1)
        outs.append((probs @ vi).transpose(0, 1))
        start += length
    return torch.cat(outs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SHAPES = [
    ([7], 2, 16),  # single sequence
    ([3, 17, 1, 9], 4, 8),  # ragged, a length-1 sequence
    ([160, 23, 160], 2, 64),  # maximal UNITER rows (60 text + 100 regions)
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lengths,heads,dim", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_backend_matches_reference(
    backend: str, lengths: list[int], heads: int, dim: int, dtype: torch.dtype, tol: float
) -> None:
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, dim, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(total, heads, dim, dtype=dtype)
    out = VARLEN_ATTENTION[backend](q, k, v, make_batch(lengths, backend), 0.0)
    assert out.shape == (total, heads, dim) and out.dtype == dtype
    out.backward(grad_out)

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    expected = reference(q64, k64, v64, lengths)
    expected.backward(grad_out.double())
    assert torch.isfinite(out).all()
    assert rel_err(out, expected) < tol
    for got, want in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        assert rel_err(got, want) < 2 * tol


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padding_never_leaks(backend: str) -> None:
    """Each sequence's output equals that sequence run alone: no key of another sequence or of padding is seen."""
    lengths = [5, 31, 12]
    q, k, v = (torch.randn(sum(lengths), 3, 16) for _ in range(3))
    together = VARLEN_ATTENTION[backend](q, k, v, make_batch(lengths, backend), 0.0)
    start = 0
    for length in lengths:
        part = slice(start, start + length)
        alone = VARLEN_ATTENTION[backend](q[part], k[part], v[part], make_batch([length], backend), 0.0)
        torch.testing.assert_close(together[part], alone, rtol=1e-5, atol=1e-6)
        start += length


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dropout_is_applied(backend: str) -> None:
    """With dropout_p > 0 the result is random, and its expectation is the dropout-free attention."""
    lengths = [6, 11]
    q, k, v = (torch.randn(sum(lengths), 2, 8) for _ in range(3))
    batch = make_batch(lengths, backend)
    clean = VARLEN_ATTENTION[backend](q, k, v, batch, 0.0)
    draws = torch.stack([VARLEN_ATTENTION[backend](q, k, v, batch, 0.3) for _ in range(400)])
    assert not torch.allclose(draws[0], clean, atol=1e-3)
    assert not torch.allclose(draws[0], draws[1], atol=1e-3)
    assert rel_err(draws.mean(0), clean) < 0.1


def test_torch_varlen_refuses_dropout() -> None:
    q = torch.randn(4, 2, 8)
    with pytest.raises(ValueError, match="dropout_p must be 0"):
        VARLEN_ATTENTION["torch_varlen"](q, q, q, make_batch([4], "torch_varlen"), 0.1)


def test_varlen_batch_validates() -> None:
    with pytest.raises(ValueError, match="int32"):
        VarlenBatch(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="B >= 1"):
        VarlenBatch(torch.tensor([0], dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="one of"):
        VarlenBatch(torch.tensor([0, 3], dtype=torch.int32), 3, "nope")


def test_padded_view_round_trip() -> None:
    batch = make_batch([2, 5, 1], "reference")
    x = torch.randn(8, 3, 4)
    padded = batch.to_padded(x)
    assert padded.shape == (3, 5, 3, 4)
    torch.testing.assert_close(padded[1], x[2:7])
    assert (padded[2, 1:] == 0).all() and (padded[0, 2:] == 0).all()
    torch.testing.assert_close(batch.to_packed(padded), x)
    torch.testing.assert_close(batch.to_packed(padded.transpose(1, 2).contiguous().transpose(1, 2)), x)
    assert batch.key_mask.shape == (3, 1, 1, 5)
    assert batch.key_mask[:, 0, 0].sum(1).tolist() == [2, 5, 1]
