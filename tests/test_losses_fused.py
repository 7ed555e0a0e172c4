"""Fused loss backends (chunked PyTorch, Triton under TRITON_INTERPRET on CPU) against the original heads."""

from __future__ import annotations

import pytest
import torch
from losses_helpers import (
    TOLERANCE,
    loss_and_grads,
    make_case,
    original_head_loss,
    poison_empty,
    rel_error,
    run_loss,
)

# (task, ragged lengths, masked rows, H, classes): odd sizes, including the real class counts.
SHAPES = [
    ("mlm", [7, 3, 5], 5, 48, 28996),
    ("mlm", [9, 12, 4, 6], 23, 32, 301),
    ("mrfr", [11, 5, 8], 13, 40, 2048),
    ("mrfr", [6, 9], 9, 24, 77),
    ("mrc", [20, 13, 7], 37, 48, 1601),
    ("mrc", [5, 4], 3, 16, 130),
    ("mrckl", [20, 13, 7], 37, 48, 1601),
    ("mrckl", [8, 3, 10], 17, 24, 257),
]


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("task,lengths,masked,hidden,classes", SHAPES)
def test_matches_original_heads(monkeypatch, backend, dtype, task, lengths, masked, hidden, classes) -> None:
    case = make_case(task, lengths, masked, hidden, classes, dtype)
    want = loss_and_grads(original_head_loss(task, case), case.leaves())
    poison_empty(monkeypatch)
    got = loss_and_grads(run_loss(task, case, backend), case.leaves())
    for name, g, w in zip(["loss", "d_seq_out", "d_weight", "d_bias"], got, want):
        assert rel_error(g, w) < TOLERANCE[dtype], f"{name}: rel error {rel_error(g, w):.2e}"


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl"])
def test_reference_backend_is_the_original(task) -> None:
    case = make_case(task, [6, 9, 4], 8, 24, 211, torch.float32)
    got = loss_and_grads(run_loss(task, case, "reference"), case.leaves())
    want = loss_and_grads(original_head_loss(task, case), case.leaves())
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-6


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl"])
def test_upstream_gradient_scales(backend, task) -> None:
    case = make_case(task, [7, 5], 6, 16, 97, torch.float32)
    upstream = torch.rand(()) * 3 + 0.5
    got = loss_and_grads(run_loss(task, case, backend) * upstream, case.leaves())
    want = loss_and_grads(original_head_loss(task, case) * upstream, case.leaves())
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-5


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunk_sizes_agree(chunk) -> None:
    from uniter_fast.losses.chunked import ROW_OPS
    from uniter_fast.losses.fused_linear import fused_linear_loss

    case = make_case("mrckl", [9, 7, 11], 19, 24, 333, torch.float32)
    hidden = case.seq_out[case.mask]
    got = loss_and_grads(
        fused_linear_loss(hidden, case.weight, case.bias, case.target, ROW_OPS["kl"], chunk=chunk), case.leaves()
    )
    want = loss_and_grads(original_head_loss("mrckl", case), case.leaves())
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-5


def test_frozen_weight_gets_no_gradient_work() -> None:
    case = make_case("mlm", [5, 8], 7, 16, 50, torch.float32)
    case.weight.requires_grad_(False)
    loss = run_loss("mlm", case, "chunked")
    got = torch.autograd.grad(loss, [case.seq_out, case.bias])
    want = torch.autograd.grad(original_head_loss("mlm", case), [case.seq_out, case.bias])
    for g, w in zip(got, want):
        assert rel_error(g, w) < 1e-5


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl"])
def test_autocast_runs_the_projection_in_bfloat16(task) -> None:
    case = make_case(task, [8, 5, 9], 11, 32, 389, torch.float32)
    want = loss_and_grads(original_head_loss(task, case), case.leaves())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = run_loss(task, case, "chunked")
    got = loss_and_grads(loss, case.leaves())
    assert all(g.dtype == torch.float32 for g in got)
    errors = [rel_error(g, w) for g, w in zip(got, want)]
    assert max(errors) < 1e-2
    assert max(errors) > 1e-5  # the GEMMs really ran in bfloat16


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_no_grad_computes_the_loss_without_gradient_work(monkeypatch, backend) -> None:
    import uniter_fast.losses.fused_linear as fused_linear

    case = make_case("mrckl", [7, 9], 10, 16, 123, torch.float32)
    want = original_head_loss("mrckl", case).detach()

    def forbidden(*args, **kwargs):
        raise AssertionError("gradient accumulated under no_grad")

    monkeypatch.setattr(fused_linear, "_accumulate", forbidden)
    with torch.no_grad():
        loss = run_loss("mrckl", case, backend)
    assert not loss.requires_grad
    assert rel_error(loss, want) < 1e-5


@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl"])
def test_float16_with_loss_scaling(monkeypatch, backend, task) -> None:
    # float16 training scales the loss (AMP); without it the MRC-kl gradients (~1/(M·C²)) are subnormal in float16.
    case = make_case(task, [9, 4, 7], 12, 32, 1601, torch.float16)
    want = loss_and_grads(original_head_loss(task, case) * 1024, case.leaves())
    poison_empty(monkeypatch)
    got = loss_and_grads(run_loss(task, case, backend) * 1024, case.leaves())
    for g, w in zip(got, want):
        assert rel_error(g, w) < 5e-3
