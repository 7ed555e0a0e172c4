"""The C++ IPOT kernel (uniter_fast._C) against the reference: plans, distances, pads, gradients, bad buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ot_helpers import random_problem, rel_err

from uniter_fast.ot import available_backends, ipot, optimal_transport_dist
from uniter_fast.ot.backends import run_reference

_C = pytest.importorskip("uniter_fast._C", reason="the C++ extension is not built (UNITER_FAST_NO_EXT=1)")


def _run_poisoned(cost: torch.Tensor, prob, beta: float, iteration: int, k: int, threads: int = 0):
    """Call the kernel on NaN-filled outputs; returns (plan, dist)."""
    plan = torch.full(cost.shape, float("nan"))
    dist = torch.full((cost.shape[0],), float("nan"))
    _C.ipot_forward(
        cost.float().contiguous().numpy(),
        prob.txt_lens.numpy(),
        prob.img_lens.numpy(),
        beta,
        iteration,
        k,
        plan.numpy(),
        dist.numpy(),
        threads,
    )
    return plan, dist


def test_cpp_is_the_cpu_default() -> None:
    assert available_backends(torch.device("cpu"))[0] == "cpp"


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 13), (37, 60, 100), (4, 33, 130), (2, 128, 128)])
@pytest.mark.parametrize(("iteration", "k"), [(1, 1), (50, 1), (10, 3)])
def test_cpp_matches_reference(shape: tuple[int, int, int], iteration: int, k: int) -> None:
    prob = random_problem(*shape)
    plan, dist = _run_poisoned(prob.cost, prob, 0.5, iteration, k)
    ref_plan, ref_dist = run_reference(prob.cost, prob.txt_pad, prob.img_pad, None, None, 0.5, iteration, k)
    assert torch.isfinite(plan).all() and torch.isfinite(dist).all()
    assert rel_err(plan, ref_plan) < 1e-5
    assert rel_err(dist, ref_dist) < 1e-5
    pad = prob.txt_pad[:, :, None] | prob.img_pad[:, None, :]
    assert plan[pad].eq(0).all()


@pytest.mark.parametrize("beta", [0.05, 0.1, 2.0])
def test_cpp_other_betas(beta: float) -> None:
    prob = random_problem(5, 20, 30)
    plan, dist = _run_poisoned(prob.cost, prob, beta, 50, 1)
    ref_plan, ref_dist = run_reference(prob.cost, prob.txt_pad, prob.img_pad, None, None, beta, 50, 1)
    assert rel_err(plan, ref_plan) < 1e-5 and rel_err(dist, ref_dist) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_half_precision_costs(dtype: torch.dtype) -> None:
    prob = random_problem(6, 30, 36, dtype=dtype)
    plan = ipot(prob.cost, prob.txt_pad, prob.img_pad, backend="cpp")
    ref = ipot(prob.cost, prob.txt_pad, prob.img_pad, backend="reference")
    assert plan.dtype == torch.float32 and rel_err(plan, ref) < 1e-5
    fp32_ref = ipot(prob.cost.float(), prob.txt_pad, prob.img_pad, backend="reference")
    assert rel_err(plan, fp32_ref) < 1e-2


def test_cpp_thread_count_does_not_change_results() -> None:
    prob = random_problem(9, 25, 40)
    one = _run_poisoned(prob.cost, prob, 0.5, 20, 1, threads=1)
    two = _run_poisoned(prob.cost, prob, 0.5, 20, 1, threads=2)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_cpp_cost_with_large_values_stays_finite() -> None:
    prob = random_problem(3, 10, 12)
    cost = prob.cost * 3.0  # costs up to 6: kernel entries down to exp(-12)
    plan, dist = _run_poisoned(cost, prob, 0.5, 50, 1)
    ref_plan, ref_dist = run_reference(cost, prob.txt_pad, prob.img_pad, None, None, 0.5, 50, 1)
    assert torch.isfinite(plan).all() and rel_err(plan, ref_plan) < 1e-5 and rel_err(dist, ref_dist) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_gradient_equals_reference(dtype: torch.dtype) -> None:
    prob = random_problem(7, 12, 20, hidden=32, dtype=dtype)
    grads = {}
    for backend in ("cpp", "reference"):
        txt = prob.txt_emb.clone().requires_grad_(True)
        img = prob.img_emb.clone().requires_grad_(True)
        dist = optimal_transport_dist(txt, img, prob.txt_pad, prob.img_pad, backend=backend)
        (dist * torch.linspace(-1, 1, 7)).sum().backward()
        grads[backend] = (dist.detach(), txt.grad, img.grad)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for got, want in zip(grads["cpp"], grads["reference"]):
        assert rel_err(got, want) < tol


def _call(**overrides):
    cost = np.random.rand(2, 3, 4).astype(np.float32)
    args = dict(
        cost=cost,
        txt_lens=np.array([3, 1], dtype=np.int64),
        img_lens=np.array([4, 2], dtype=np.int64),
        beta=0.5,
        iteration=5,
        k=1,
        plan=np.empty((2, 3, 4), dtype=np.float32),
        dist=np.empty(2, dtype=np.float32),
    )
    args.update(overrides)
    _C.ipot_forward(*args.values())


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"txt_lens": np.array([4, 1], dtype=np.int64)}, ValueError, r"txt_lens\[0\] must be in \[1, 3\], got 4"),
        ({"img_lens": np.array([0, 1], dtype=np.int64)}, ValueError, r"img_lens\[0\]"),
        ({"img_lens": np.array([1], dtype=np.int64)}, ValueError, "img_lens must have shape"),
        ({"plan": np.empty((2, 3, 5), dtype=np.float32)}, ValueError, "plan must have"),
        ({"dist": np.empty(3, dtype=np.float32)}, ValueError, "dist must have"),
        ({"cost": np.random.rand(2, 3, 4)}, TypeError, "incompatible"),
        ({"plan": np.empty((2, 3, 4), dtype=np.float64)}, TypeError, "incompatible"),
        ({"cost": np.random.rand(2, 4, 3).astype(np.float32).transpose(0, 2, 1)}, TypeError, "incompatible"),
        ({"beta": 0.0}, ValueError, "beta"),
        ({"k": 0}, ValueError, "k"),
    ],
)
def test_cpp_rejects_bad_buffers(overrides: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _call(**overrides)
