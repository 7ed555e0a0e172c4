"""The Triton IPOT kernel (interpreted on CPU, native on CUDA) against the reference, plus its AOT compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from ot_helpers import random_problem, rel_err

from uniter_fast.ot import ipot, optimal_transport_dist
from uniter_fast.ot.backends import run_reference

pytest.importorskip("triton")
from uniter_fast.kernels import ipot as kernel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")


def _poisoned_outputs(shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    plan = kernel._empty_aligned(shape, torch.float32, DEVICE).fill_(float("nan"))
    return plan, torch.full((shape[0],), float("nan"), device=DEVICE)


@pytest.mark.parametrize(
    ("shape", "dtype", "iteration", "k"),
    [
        ((3, 5, 7), torch.float32, 50, 1),
        ((2, 60, 100), torch.float32, 50, 1),
        ((3, 17, 31), torch.float32, 8, 3),
        ((2, 62, 36), torch.bfloat16, 50, 1),
        ((2, 30, 45), torch.float16, 20, 1),
        ((1, 128, 128), torch.float32, 5, 1),
    ],
)
def test_triton_matches_reference(shape: tuple[int, int, int], dtype: torch.dtype, iteration: int, k: int) -> None:
    prob = random_problem(*shape, dtype=dtype)
    cost = prob.cost.to(DEVICE)
    plan, dist = _poisoned_outputs(cost.shape)
    kernel.ipot_triton(
        cost, prob.txt_lens.to(DEVICE), prob.img_lens.to(DEVICE), 0.5, iteration, k, plan_out=plan, dist_out=dist
    )
    ref_plan, ref_dist = run_reference(prob.cost, prob.txt_pad, prob.img_pad, None, None, 0.5, iteration, k)
    plan, dist = plan.cpu(), dist.cpu()
    assert torch.isfinite(plan).all() and torch.isfinite(dist).all()
    assert rel_err(plan, ref_plan) < 1e-5
    assert rel_err(dist, ref_dist) < 1e-5
    pad = prob.txt_pad[:, :, None] | prob.img_pad[:, None, :]
    assert plan[pad].eq(0).all()


def test_triton_copies_unaligned_costs() -> None:
    prob = random_problem(2, 9, 13)  # rows of 13 floats are not 16-byte aligned
    cost = prob.cost.to(DEVICE)
    plan = ipot(cost, prob.txt_pad.to(DEVICE), prob.img_pad.to(DEVICE), iteration=20, backend="triton").cpu()
    ref = ipot(prob.cost, prob.txt_pad, prob.img_pad, iteration=20, backend="reference")
    assert plan.shape == (2, 9, 13) and rel_err(plan, ref) < 1e-5


def test_triton_large_shape_falls_back_with_warning() -> None:
    prob = random_problem(1, 3, kernel.MAX_BLOCK + 5)
    with pytest.warns(UserWarning, match="reference"):
        plan = ipot(prob.cost.to(DEVICE), prob.txt_pad.to(DEVICE), prob.img_pad.to(DEVICE), backend="triton")
    ref = ipot(prob.cost, prob.txt_pad, prob.img_pad, backend="reference")
    assert rel_err(plan.cpu(), ref) < 1e-5


def test_triton_gradient_equals_reference() -> None:
    prob = random_problem(3, 10, 12, hidden=24)
    grads = {}
    for backend, device in (("triton", DEVICE), ("reference", torch.device("cpu"))):
        txt = prob.txt_emb.to(device).requires_grad_(True)
        img = prob.img_emb.to(device).requires_grad_(True)
        dist = optimal_transport_dist(
            txt, img, prob.txt_pad.to(device), prob.img_pad.to(device), iteration=20, backend=backend
        )
        (dist * torch.tensor([1.0, -0.5, 2.0], device=device)).sum().backward()
        grads[backend] = (dist.detach().cpu(), txt.grad.cpu(), img.grad.cpu())
    for got, want in zip(grads["triton"], grads["reference"]):
        assert rel_err(got, want) < 1e-5


def test_triton_rejects_bad_outputs() -> None:
    prob = random_problem(2, 4, 8)
    with pytest.raises(ValueError, match="plan_out"):
        kernel.ipot_triton(prob.cost, prob.txt_lens, prob.img_lens, 0.5, 5, 1, plan_out=torch.empty(2, 4, 7))
    with pytest.raises(ValueError, match="dist_out"):
        kernel.ipot_triton(prob.cost, prob.txt_lens, prob.img_lens, 0.5, 5, 1, dist_out=torch.empty(3))
    with pytest.raises(TypeError, match="cost"):
        kernel.ipot_triton(prob.cost.double(), prob.txt_lens, prob.img_lens, 0.5, 5, 1)


def test_aot_specs_cover_dispatcher_configs() -> None:
    specs = {s.name: s for s in kernel.aot_specs()}
    for m, n in ((1, 1), (60, 100), (62, 36), (128, 128), (33, 65)):
        block_m, block_n = kernel.block_sizes(m, n)
        spec = specs[f"ipot_fp32_{block_m}x{block_n}"]
        assert spec.num_warps == kernel.num_warps_for(block_m, block_n)
        assert spec.constexprs == {"BLOCK_M": block_m, "BLOCK_N": block_n}


def test_aot_compile_main_config_without_spills() -> None:
    """UNITER's main tile (text ≤ 64, regions ≤ 128) compiles for Hopper and Ampere without a GPU, spill-free."""
    report = os.path.join(ROOT, "bench", "kernel_report.py")
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "report.json")
        cmd = [sys.executable, report, "--only", "ipot_fp32_64x128", "--only", "ipot_bf16_128x128", "--json", out_json]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(out_json, encoding="utf-8") as f:
            payload = json.load(f)
    rows = payload["rows"]
    assert {(r["name"], r["arch"]) for r in rows} == {
        (name, arch) for name in ("ipot_fp32_64x128", "ipot_bf16_128x128") for arch in ("sm_90a", "sm_80")
    }
    assert payload["failures"] == []
    for r in rows:
        assert r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0
