"""The reference IPOT and the public API: algorithm oracles (fp64, POT), marginals, padding, gradients, bad inputs."""

from __future__ import annotations

import numpy as np
import ot as pot
import pytest
import torch
from ot_helpers import ipot_numpy, random_problem, rel_err

from uniter_fast.ot import MIN_BETA, cost_matrix_cosine, ipot, optimal_transport_dist


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 13), (5, 60, 100), (2, 33, 130)])
@pytest.mark.parametrize("k", [1, 3])
def test_reference_matches_fp64_oracle(shape: tuple[int, int, int], k: int) -> None:
    prob = random_problem(*shape)
    plan = ipot(prob.cost, prob.txt_pad, prob.img_pad, beta=0.5, iteration=30, k=k, backend="reference")
    assert plan.dtype == torch.float32 and plan.shape == prob.cost.shape
    for b in range(shape[0]):
        m, n = int(prob.txt_lens[b]), int(prob.img_lens[b])
        expected = ipot_numpy(prob.cost[b, :m, :n].double().numpy(), 0.5, 30, k)
        assert rel_err(plan[b, :m, :n], torch.from_numpy(expected)) < 1e-5
        assert plan[b, m:].eq(0).all() and plan[b, :, n:].eq(0).all()


def test_text_marginal_exact_and_image_marginal_converges() -> None:
    prob = random_problem(6, 40, 70)
    errors = []
    for iteration in (10, 50, 200):
        plan = ipot(prob.cost, prob.txt_pad, prob.img_pad, iteration=iteration, backend="reference")
        rows = plan.sum(dim=2)
        expected_rows = (~prob.txt_pad).float() / prob.txt_lens[:, None].float()
        assert rel_err(rows, expected_rows) < 1e-6
        cols = plan.sum(dim=1)
        expected_cols = (~prob.img_pad).float() / prob.img_lens[:, None].float()
        errors.append(float((cols - expected_cols).abs().sum(dim=1).max()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] < 5e-3


def test_distance_approaches_exact_ot() -> None:
    prob = random_problem(8, 20, 30)
    for iteration, tol in ((50, 1e-2), (1000, 2e-4)):
        dist = optimal_transport_dist(
            prob.txt_emb, prob.img_emb, prob.txt_pad, prob.img_pad, iteration=iteration, backend="reference"
        )
        for b in range(8):
            m, n = int(prob.txt_lens[b]), int(prob.img_lens[b])
            exact = pot.emd2(np.full(m, 1 / m), np.full(n, 1 / n), prob.cost[b, :m, :n].double().numpy())
            rel = (float(dist[b]) - exact) / exact
            assert -1e-4 < rel < tol, (iteration, b, rel)


def test_many_inner_sweeps_match_annealed_sinkhorn() -> None:
    """With k large, t IPOT steps are exactly entropic OT at eps = beta / t: each step multiplies the kernel by
    exp(-C / beta), so after t steps it is exp(-t C / beta)."""
    prob = random_problem(3, 12, 17)
    plan = ipot(prob.cost, prob.txt_pad, prob.img_pad, beta=0.5, iteration=10, k=200, backend="reference")
    for b in range(3):
        m, n = int(prob.txt_lens[b]), int(prob.img_lens[b])
        cost = prob.cost[b, :m, :n].double().numpy()
        expected = pot.sinkhorn(
            np.full(m, 1 / m),
            np.full(n, 1 / n),
            cost,
            reg=0.05,
            method="sinkhorn_log",
            stopThr=1e-12,
            numItermax=100000,
        )
        assert np.abs(plan[b, :m, :n].double().numpy() - expected).sum() < 1e-5


def test_padding_invariance() -> None:
    prob = random_problem(4, 25, 40)
    batch_plan = ipot(prob.cost, prob.txt_pad, prob.img_pad, backend="reference")
    for b in range(4):
        m, n = int(prob.txt_lens[b]), int(prob.img_lens[b])
        alone = ipot(
            prob.cost[b : b + 1, :m, :n],
            prob.txt_pad[b : b + 1, :m],
            prob.img_pad[b : b + 1, :n],
            backend="reference",
        )
        assert rel_err(batch_plan[b, :m, :n], alone[0]) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_is_plan_through_cosine_cost(dtype: torch.dtype) -> None:
    prob = random_problem(5, 9, 14, hidden=8, dtype=dtype)
    txt = prob.txt_emb.clone().requires_grad_(True)
    img = prob.img_emb.clone().requires_grad_(True)
    dist = optimal_transport_dist(txt, img, prob.txt_pad, prob.img_pad, backend="reference")
    assert dist.dtype == torch.float32 and dist.shape == (5,)
    weights = torch.rand(5)
    (dist * weights).sum().backward()

    plan = ipot(prob.cost.float(), prob.txt_pad, prob.img_pad, backend="reference").double()
    txt64 = prob.txt_emb.double().requires_grad_(True)
    img64 = prob.img_emb.double().requires_grad_(True)
    joint_pad = prob.txt_pad[:, :, None] | prob.img_pad[:, None, :]
    cost64 = cost_matrix_cosine(txt64, img64).masked_fill(joint_pad, 0)
    ((cost64 * plan).sum(dim=(1, 2)) * weights.double()).sum().backward()
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # the gradient is returned in the embeddings' dtype
    assert rel_err(txt.grad, txt64.grad) < tol
    assert rel_err(img.grad, img64.grad) < tol
    assert txt.grad.dtype == dtype
    assert txt.grad[prob.txt_pad].eq(0).all() and img.grad[prob.img_pad].eq(0).all()


def test_cosine_cost_gradcheck_fp64() -> None:
    txt = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    img = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(cost_matrix_cosine, (txt, img))


def test_arbitrary_pads_use_reference_with_warning() -> None:
    prob = random_problem(3, 8, 10)
    txt_pad = prob.txt_pad.clone()
    txt_pad[0, 0] = True  # a pad before valid tokens: not a suffix
    with pytest.warns(UserWarning, match="suffix"):
        plan = ipot(prob.cost, txt_pad, prob.img_pad, backend="auto")
    assert plan[0, 0].eq(0).all() and torch.isfinite(plan).all()
    assert rel_err(plan[0].sum(dim=1)[1:], torch.full((7,), 1 / 7)) < 1e-6


def _bad(**overrides):
    prob = random_problem(2, 5, 6)
    args = dict(txt_emb=prob.txt_emb, img_emb=prob.img_emb, txt_pad=prob.txt_pad, img_pad=prob.img_pad)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"beta": MIN_BETA / 2}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": "0.5"}, TypeError, "beta"),
        ({"iteration": 0}, ValueError, "iteration"),
        ({"k": 1.0}, TypeError, "k must be an int"),
        ({"backend": "cuda"}, ValueError, "backend"),
        ({"txt_emb": torch.randn(2, 5)}, ValueError, "txt_emb"),
        ({"txt_emb": torch.randint(0, 3, (2, 5, 16))}, TypeError, "txt_emb"),
        ({"img_emb": torch.randn(2, 6, 8)}, ValueError, "img_emb"),
        ({"img_emb": torch.randn(3, 6, 16)}, ValueError, "img_emb"),
        ({"txt_pad": torch.zeros(2, 5)}, TypeError, "txt_pad"),
        ({"img_pad": torch.zeros(2, 7, dtype=torch.bool)}, ValueError, "img_pad"),
        ({"img_pad": torch.ones(2, 6, dtype=torch.bool)}, ValueError, "at least one"),
    ],
)
def test_bad_inputs_raise(overrides: dict, error: type, match: str) -> None:
    args = _bad(**overrides)
    with pytest.raises(error, match=match):
        optimal_transport_dist(**args)


def test_fast_backend_rejects_non_suffix_pads() -> None:
    prob = random_problem(2, 5, 6)
    img_pad = prob.img_pad.clone()
    img_pad[1, 0] = True
    img_pad[1, -1] = False
    with pytest.raises(ValueError, match="end of each row"):
        ipot(prob.cost, prob.txt_pad, img_pad, backend="cpp")
