"""The fused WRA distance (C++ and Triton backends) against the reference path and the original's maths: values and
gradients, ragged lengths, shapes from 1×1 to beyond the Triton tile, fp32/bf16/fp16, poisoned outputs, strided
inputs, the lengths API, the model's ``ot_distance``, and the AOT compile of the Triton kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from ot_helpers import random_problem, rel_err

import uniter_fast.ot.api as ot_api
from uniter_fast.ot import ipot, optimal_transport_dist
from uniter_fast.ot.reference import original_optimal_transport_dist
from uniter_fast.ot.wra import COSINE_EPS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = ["cpp", "triton"]
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _device(backend: str) -> torch.device:
    return TRITON_DEVICE if backend == "triton" else CPU


def _skip_unavailable(backend: str) -> None:
    if backend == "cpp":
        pytest.importorskip("uniter_fast._C", reason="the C++ extension is not built (UNITER_FAST_NO_EXT=1)")
    else:
        pytest.importorskip("triton")


def _dist_and_grads(prob, backend: str, weights: torch.Tensor, with_lengths: bool, **kwargs):
    """(dist, grad_txt, grad_img) of Σ weights · dist on the backend's device, returned on the CPU."""
    device = _device(backend) if backend != "reference" else CPU
    txt = prob.txt_emb.to(device).detach().requires_grad_(True)
    img = prob.img_emb.to(device).detach().requires_grad_(True)
    lengths = {"txt_lens": prob.txt_lens, "img_lens": prob.img_lens} if with_lengths else {}
    dist = optimal_transport_dist(
        txt, img, prob.txt_pad.to(device), prob.img_pad.to(device), backend=backend, **lengths, **kwargs
    )
    (dist * weights.to(device)).sum().backward()
    return dist.detach().cpu(), txt.grad.cpu(), img.grad.cpu()


def _check_against_reference(prob, backend: str, dtype: torch.dtype, **kwargs) -> None:
    weights = torch.linspace(-1.0, 2.0, prob.txt_emb.shape[0])
    got = _dist_and_grads(prob, backend, weights, with_lengths=True, **kwargs)
    want = _dist_and_grads(prob, "reference", weights, with_lengths=False, **kwargs)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype and got[2].dtype == dtype
    assert torch.isfinite(got[1].float()).all() and torch.isfinite(got[2].float()).all()
    assert rel_err(got[0], want[0]) < 1e-5  # the distance is fp32 maths on the same (bf16-valued) inputs
    assert rel_err(got[1], want[1]) < TOL[dtype]
    assert rel_err(got[2], want[2]) < TOL[dtype]
    assert got[1][prob.txt_pad].eq(0).all() and got[2][prob.img_pad].eq(0).all()


CPP_SHAPES = [(1, 1, 1, 8), (3, 7, 13, 37), (4, 60, 100, 768), (2, 33, 130, 16), (3, 140, 9, 24)]
TRITON_SHAPES = [(2, 1, 1, 8), (3, 7, 13, 37), (2, 60, 100, 96), (1, 128, 33, 16)]


@pytest.mark.parametrize("shape", CPP_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_matches_reference(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    _skip_unavailable("cpp")
    b, m, n, d = shape
    _check_against_reference(random_problem(b, m, n, hidden=d, dtype=dtype), "cpp", dtype)


@pytest.mark.parametrize("shape", TRITON_SHAPES)
def test_triton_matches_reference(shape: tuple[int, int, int, int]) -> None:
    _skip_unavailable("triton")
    b, m, n, d = shape
    _check_against_reference(random_problem(b, m, n, hidden=d), "triton", torch.float32, iteration=20)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_embeddings(backend: str, dtype: torch.dtype) -> None:
    _skip_unavailable(backend)
    _check_against_reference(random_problem(2, 20, 30, hidden=40, dtype=dtype), backend, dtype, iteration=20)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(("iteration", "k", "beta"), [(1, 1, 0.5), (8, 3, 0.5), (30, 1, 0.05), (30, 1, 2.0)])
def test_other_ipot_settings(backend: str, iteration: int, k: int, beta: float) -> None:
    _skip_unavailable(backend)
    prob = random_problem(2, 9, 14, hidden=20)
    _check_against_reference(prob, backend, torch.float32, iteration=iteration, k=k, beta=beta)


@pytest.mark.parametrize("backend", FUSED)
def test_equals_the_original_formula(backend: str) -> None:
    """Against the original model/ot.py maths (F.normalize copies, trace(C @ T)), values and gradients."""
    _skip_unavailable(backend)
    prob = random_problem(3, 12, 21, hidden=64)
    weights = torch.tensor([0.5, -1.0, 2.0])
    got = _dist_and_grads(prob, backend, weights, with_lengths=False)
    txt = prob.txt_emb.clone().requires_grad_(True)
    img = prob.img_emb.clone().requires_grad_(True)
    dist = original_optimal_transport_dist(txt, img, prob.txt_pad, prob.img_pad)
    (dist * weights).sum().backward()
    for actual, expected in zip(got, (dist.detach(), txt.grad, img.grad)):
        assert rel_err(actual, expected) < 1e-5


def test_gradient_against_fp64_autograd() -> None:
    """The C++ backward against fp64 autograd of F.normalize + matmul with the same plan held fixed, including rows
    whose norm is below eps (where F.normalize divides by eps and its gradient has no projection term)."""
    _skip_unavailable("cpp")
    prob = random_problem(3, 8, 11, hidden=12)
    prob.txt_emb[0, 1] *= 1e-7  # |x| < eps
    prob.img_emb[1, 0] = 0.0  # |y| = 0
    weights = torch.tensor([1.0, -2.0, 0.5])
    got = _dist_and_grads(prob, "cpp", weights, with_lengths=True)
    plan = ot_api.ipot(
        ot_api.cost_matrix_cosine(prob.txt_emb, prob.img_emb).masked_fill(
            prob.txt_pad[:, :, None] | prob.img_pad[:, None, :], 0
        ),
        prob.txt_pad,
        prob.img_pad,
        backend="reference",
    ).double()
    txt64 = prob.txt_emb.double().requires_grad_(True)
    img64 = prob.img_emb.double().requires_grad_(True)
    joint_pad = prob.txt_pad[:, :, None] | prob.img_pad[:, None, :]
    cost = ot_api.cost_matrix_cosine(txt64, img64, eps=COSINE_EPS).masked_fill(joint_pad, 0)
    ((cost * plan).sum(dim=(1, 2)) * weights.double()).sum().backward()
    assert rel_err(got[1], txt64.grad) < 1e-5 and rel_err(got[2], img64.grad) < 1e-5
    assert got[1][0, 1].abs().max() > 0  # the small row still gets its (1/eps-scaled) gradient


@pytest.mark.parametrize("backend", FUSED)
def test_strided_and_mixed_dtype_inputs(backend: str) -> None:
    """Slices of a joint sequence (as the model passes them) give the same result as contiguous copies."""
    _skip_unavailable(backend)
    device = _device(backend)
    prob = random_problem(2, 6, 9, hidden=16)
    joint = torch.cat([prob.txt_emb, prob.img_emb], dim=1).to(device)
    txt, img = joint[:, :6], joint[:, 6:]
    pads = (prob.txt_pad.to(device), prob.img_pad.to(device))
    strided = optimal_transport_dist(txt, img, *pads, iteration=10, backend=backend)
    copied = optimal_transport_dist(txt.contiguous(), img.contiguous(), *pads, iteration=10, backend=backend)
    assert torch.equal(strided, copied)
    mixed = optimal_transport_dist(txt, img.to(torch.bfloat16), *pads, iteration=10, backend=backend)
    ref = optimal_transport_dist(txt, img.to(torch.bfloat16), *pads, iteration=10, backend="reference")
    assert rel_err(mixed.cpu(), ref.cpu()) < 1e-5


@pytest.mark.parametrize("backend", FUSED)
def test_gradient_to_one_input_only(backend: str) -> None:
    _skip_unavailable(backend)
    device = _device(backend)
    prob = random_problem(2, 5, 7, hidden=8)
    img = prob.img_emb.to(device).detach().requires_grad_(True)
    dist = optimal_transport_dist(
        prob.txt_emb.to(device), img, prob.txt_pad.to(device), prob.img_pad.to(device), iteration=10, backend=backend
    )
    dist.sum().backward()
    ref = _dist_and_grads(prob, "reference", torch.ones(2), with_lengths=False, iteration=10)
    assert rel_err(img.grad.cpu(), ref[2]) < 1e-5


def test_no_grad_forward_equals_grad_forward() -> None:
    _skip_unavailable("cpp")
    prob = random_problem(4, 10, 20, hidden=32)
    with torch.no_grad():
        plain = optimal_transport_dist(prob.txt_emb, prob.img_emb, prob.txt_pad, prob.img_pad, backend="cpp")
    tracked = optimal_transport_dist(
        prob.txt_emb.requires_grad_(True), prob.img_emb, prob.txt_pad, prob.img_pad, backend="cpp"
    )
    assert torch.equal(plain, tracked.detach())


def test_cpp_thread_count_does_not_change_results() -> None:
    _skip_unavailable("cpp")
    prob = random_problem(7, 15, 25, hidden=24)
    results = []
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            results.append(
                _dist_and_grads(prob, "cpp", torch.randn(7, generator=torch.Generator().manual_seed(1)), True)
            )
        finally:
            torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


# ------------------------------------------------------------------------------------------ poisoned outputs


def _numpy(x: torch.Tensor):
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_writes_every_output_element(dtype: torch.dtype) -> None:
    """NaN-filled outputs: every plan/stat/gradient element is written, zero at pads, and equal to the API's."""
    _C = pytest.importorskip("uniter_fast._C")
    prob = random_problem(5, 11, 19, hidden=29, dtype=dtype)
    b, m, n, d = 5, 11, 19, 29
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    nan = float("nan")
    dist, plan = torch.full((b,), nan), torch.full((b, m, n), nan)
    txt_stats, img_stats = torch.full((b, m, 2), nan), torch.full((b, n, 2), nan)
    args = (_numpy(prob.txt_emb), _numpy(prob.img_emb), name, prob.txt_lens.numpy(), prob.img_lens.numpy())
    _C.wra_forward(*args, 0.5, 50, 1, COSINE_EPS, dist.numpy(), plan.numpy(), txt_stats.numpy(), img_stats.numpy(), 0)
    grad_txt, grad_img = torch.full((b, m, d), nan, dtype=dtype), torch.full((b, n, d), nan, dtype=dtype)
    weights = torch.randn(b)
    saved = (plan.numpy(), txt_stats.numpy(), img_stats.numpy())
    _C.wra_backward(*args, *saved, weights.numpy(), _numpy(grad_txt), _numpy(grad_img), 0)
    for t in (dist, plan, txt_stats, img_stats, grad_txt, grad_img):
        assert torch.isfinite(t.float()).all()
    joint_pad = prob.txt_pad[:, :, None] | prob.img_pad[:, None, :]
    assert plan[joint_pad].eq(0).all() and txt_stats[prob.txt_pad].eq(0).all() and img_stats[prob.img_pad].eq(0).all()
    assert grad_txt[prob.txt_pad].eq(0).all() and grad_img[prob.img_pad].eq(0).all()
    api = _dist_and_grads(prob, "cpp", weights, with_lengths=True)
    assert torch.equal(api[0], dist) and torch.equal(api[1], grad_txt) and torch.equal(api[2], grad_img)


def test_triton_writes_every_output_element() -> None:
    _skip_unavailable("triton")
    from uniter_fast.kernels import ipot
    from uniter_fast.kernels import wra as kernel

    prob = random_problem(2, 7, 10, hidden=40)
    b, m, n, d = 2, 7, 10, 40
    dev = TRITON_DEVICE
    txt, img = prob.txt_emb.to(dev), prob.img_emb.to(dev)
    lens = (prob.txt_lens.to(dev), prob.img_lens.to(dev))
    nan = float("nan")
    plan = ipot._empty_aligned((b, m, n), torch.float32, dev).fill_(nan)
    out = (
        torch.full((b,), nan, device=dev),
        plan,
        torch.full((b, m, 2), nan, device=dev),
        torch.full((b, n, 2), nan, device=dev),
    )
    _, saved = kernel.wra_forward_triton(txt, img, *lens, 0.5, 20, 1, COSINE_EPS, True, out=out)
    grads = (torch.full((b, m, d), nan, device=dev), torch.full((b, n, d), nan, device=dev))
    weights = torch.tensor([0.7, -1.3], device=dev)
    kernel.wra_backward_triton(txt, img, *lens, saved, weights, out=grads)
    dist, plan, txt_stats, img_stats = (t.cpu() for t in out)
    grad_txt, grad_img = (t.cpu() for t in grads)
    for t in (dist, plan, txt_stats, img_stats, grad_txt, grad_img):
        assert torch.isfinite(t).all()
    joint_pad = prob.txt_pad[:, :, None] | prob.img_pad[:, None, :]
    assert plan[joint_pad].eq(0).all() and txt_stats[prob.txt_pad].eq(0).all() and img_stats[prob.img_pad].eq(0).all()
    assert grad_txt[prob.txt_pad].eq(0).all() and grad_img[prob.img_pad].eq(0).all()
    ref = _dist_and_grads(prob, "reference", weights.cpu(), with_lengths=False, iteration=20)
    assert rel_err(dist, ref[0]) < 1e-5 and rel_err(grad_txt, ref[1]) < 1e-5 and rel_err(grad_img, ref[2]) < 1e-5


def test_triton_large_shape_falls_back_with_warning() -> None:
    _skip_unavailable("triton")
    from uniter_fast.kernels.wra import MAX_BLOCK

    prob = random_problem(1, 3, MAX_BLOCK + 2, hidden=8)
    weights = torch.ones(1)
    with pytest.warns(UserWarning, match="reference"):
        got = _dist_and_grads(prob, "triton", weights, with_lengths=True)
    want = _dist_and_grads(prob, "reference", weights, with_lengths=False)
    for actual, expected in zip(got, want):
        assert rel_err(actual, expected) < 1e-6


# ------------------------------------------------------------------------------------------ lengths API


def test_given_lengths_skip_the_pad_derivation(monkeypatch: pytest.MonkeyPatch) -> None:
    """With txt_lens/img_lens nothing is derived from the pads (on CUDA that derivation is a device sync)."""
    _skip_unavailable("cpp")
    prob = random_problem(3, 8, 12, hidden=16)
    expected = optimal_transport_dist(prob.txt_emb, prob.img_emb, prob.txt_pad, prob.img_pad, backend="cpp")

    def forbidden(*args, **kwargs):
        raise AssertionError("derived lengths from the pads")

    monkeypatch.setattr(ot_api, "suffix_lengths", forbidden)
    monkeypatch.setattr(ot_api, "check_pads", forbidden)
    got = optimal_transport_dist(
        prob.txt_emb,
        prob.img_emb,
        prob.txt_pad,
        prob.img_pad,
        backend="cpp",
        txt_lens=prob.txt_lens,
        img_lens=prob.img_lens.to(torch.int32),
    )
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_ipot_accepts_lengths(backend: str) -> None:
    _skip_unavailable("triton" if backend == "triton" else "cpp")
    device = _device(backend)
    prob = random_problem(3, 9, 14)
    pads = (prob.txt_pad.to(device), prob.img_pad.to(device))
    cost = prob.cost.to(device)
    derived = ipot(cost, *pads, iteration=10, backend=backend)
    given = ipot(cost, *pads, iteration=10, backend=backend, txt_lens=prob.txt_lens, img_lens=prob.img_lens)
    assert torch.equal(derived, given)


def _lengths_call(**overrides):
    prob = random_problem(2, 5, 6, hidden=8)
    args = dict(
        txt_emb=prob.txt_emb,
        img_emb=prob.img_emb,
        txt_pad=prob.txt_pad,
        img_pad=prob.img_pad,
        txt_lens=prob.txt_lens,
        img_lens=prob.img_lens,
    )
    args.update({k: (v(prob) if callable(v) else v) for k, v in overrides.items()})
    return optimal_transport_dist(**args)


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"img_lens": None}, ValueError, "together"),
        ({"txt_lens": lambda p: p.txt_lens.float()}, TypeError, "txt_lens must be int64"),
        ({"txt_lens": lambda p: p.txt_lens.tolist()}, TypeError, "txt_lens must be a torch.Tensor"),
        ({"img_lens": torch.tensor([3, 2, 1])}, ValueError, r"img_lens must have shape \(2,\)"),
        ({"txt_lens": torch.tensor([5, 0])}, ValueError, r"txt_lens\[1\] must be in \[1, 5\], got 0"),
        ({"img_lens": torch.tensor([6, 7])}, ValueError, r"img_lens\[1\] must be in \[1, 6\], got 7"),
        ({"txt_lens": lambda p: (p.txt_lens % 5) + 1}, ValueError, "txt_pad must be True exactly"),
    ],
)
def test_bad_lengths_raise(overrides: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        _lengths_call(**overrides)


def test_device_lengths_checked_only_on_request() -> None:
    """check_length_args reads accelerator-resident values only with check_values=True (here exercised on the CPU
    pads, which are always checked, and via the flag)."""
    from uniter_fast.ot.checks import check_length_args

    prob = random_problem(2, 5, 6)
    wrong = prob.txt_lens.clone()
    wrong[0] = 1 if int(wrong[0]) != 1 else 2
    with pytest.raises(ValueError, match="txt_pad must be True exactly"):
        check_length_args(wrong, prob.img_lens, prob.txt_pad, prob.img_pad, check_values=True)
    check_length_args(prob.txt_lens, prob.img_lens, prob.txt_pad, prob.img_pad, check_values=True)


def test_cpp_rejects_bad_buffers() -> None:
    _C = pytest.importorskip("uniter_fast._C")
    x = np.random.rand(2, 3, 8).astype(np.float32)
    y = np.random.rand(2, 4, 8).astype(np.float32)
    lens = (np.array([3, 1], dtype=np.int64), np.array([4, 2], dtype=np.int64))
    dist = np.empty(2, dtype=np.float32)
    base = (0.5, 5, 1, COSINE_EPS)
    with pytest.raises(ValueError, match="txt_emb must hold bf16"):
        _C.wra_forward(x, y, "bf16", *lens, *base, dist, None, None, None)
    with pytest.raises(ValueError, match="dtype must be"):
        _C.wra_forward(x.astype(np.int16), y.astype(np.int16), "int16", *lens, *base, dist, None, None, None)
    with pytest.raises(ValueError, match="img_emb must have shape"):
        _C.wra_forward(x, y[:, :, :4], "fp32", *lens, *base, dist, None, None, None)
    with pytest.raises(ValueError, match="unit stride"):
        _C.wra_forward(x, np.asfortranarray(y), "fp32", *lens, *base, dist, None, None, None)
    with pytest.raises(ValueError, match=r"img_lens\[0\] must be in \[1, 4\], got 5"):
        _C.wra_forward(x, y, "fp32", lens[0], np.array([5, 2], dtype=np.int64), *base, dist, None, None, None)
    with pytest.raises(ValueError, match="together"):
        _C.wra_forward(x, y, "fp32", *lens, *base, dist, np.empty((2, 3, 4), np.float32), None, None)
    with pytest.raises(ValueError, match=r"plan must have shape \(2, 3, 4\)"):
        _C.wra_forward(x, y, "fp32", *lens, *base, dist, np.empty((2, 4, 3), np.float32), None, None)
    with pytest.raises(TypeError, match="float32"):
        _C.wra_forward(x, y, "fp32", *lens, *base, dist, np.empty((2, 3, 4)), None, None)
    with pytest.raises(ValueError, match="eps"):
        _C.wra_forward(x, y, "fp32", *lens, 0.5, 5, 1, 0.0, dist, None, None, None)
    saved = (np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 2), np.float32), np.zeros((2, 4, 2), np.float32))
    grads = (np.empty_like(x), np.empty_like(y))
    with pytest.raises(ValueError, match="grad_img must have shape"):
        _C.wra_backward(x, y, "fp32", *lens, *saved, dist, grads[0], grads[1][:, :3])
    with pytest.raises(ValueError, match="grad_txt must be C-contiguous"):
        _C.wra_backward(x, y, "fp32", *lens, *saved, dist, np.empty((2, 8, 3), np.float32).transpose(0, 2, 1), grads[1])
    with pytest.raises(ValueError, match=r"img_stats must have shape \(2, 4, 2\)"):
        _C.wra_backward(x, y, "fp32", *lens, *saved[:2], saved[1], dist, *grads)


# ------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("fast", [False, True])
def test_model_ot_distance_uses_collate_lengths(fast: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """UniterForPretraining.ot_distance passes ot_inputs' txt_lens/img_lens on (no pad-derived lengths) and gives the
    same distance as without them."""
    from tests.pretrain_batches import task_batch
    from uniter_fast.config import UniterConfig
    from uniter_fast.pretraining.model import UniterForPretraining

    config = UniterConfig.tiny(attention_backend="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = UniterForPretraining(config, fast=fast).eval()
    batch = task_batch("itm", [6, 3, 9], [5, 8, 2], config.vocab_size, seed=3)
    seq = model.uniter(
        batch["input_ids"],
        batch["position_ids"],
        batch["img_feat"],
        batch["img_pos_feat"],
        batch["attn_masks"],
        batch["gather_index"],
        output_all_encoded_layers=False,
    )
    without = model.ot_distance(batch, seq)
    batch["ot_inputs"]["txt_lens"] = batch["txt_lens"].clone()
    batch["ot_inputs"]["img_lens"] = batch["num_bbs"].clone()
    monkeypatch.setattr(ot_api, "suffix_lengths", lambda *a: (_ for _ in ()).throw(AssertionError("derived")))
    with_lengths = model.ot_distance(batch, seq)
    assert torch.equal(with_lengths, without)


# ------------------------------------------------------------------------------------------ AOT


def test_aot_specs_cover_dispatcher_configs() -> None:
    pytest.importorskip("triton")
    from uniter_fast.kernels import wra

    specs = {s.name: s for s in wra.aot_specs()}
    for m, n in ((1, 1), (60, 100), (62, 36), (128, 128), (33, 65)):
        forward, backward, options = wra._configs(m, n)
        tile = f"{forward['BLOCK_M']}x{forward['BLOCK_N']}"
        for dtype in ("fp32", "bf16", "fp16"):
            for kind, constexprs in (("fwd", forward), ("bwd", backward)):
                spec = specs[f"wra_{kind}_{dtype}_{tile}"]
                assert spec.constexprs == constexprs
                assert (spec.num_warps, spec.num_stages, spec.maxnreg) == (
                    options["num_warps"],
                    options["num_stages"],
                    options["maxnreg"],
                )


def test_aot_compile_main_configs_without_spills() -> None:
    """UNITER's main tile (text ≤ 64, regions ≤ 128), forward and backward, compiles for Hopper and Ampere without a
    GPU and without spills."""
    pytest.importorskip("triton")
    names = ("wra_fwd_fp32_64x128", "wra_bwd_bf16_64x128")
    report = os.path.join(ROOT, "bench", "kernel_report.py")
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "report.json")
        cmd = [sys.executable, report, *(f"--only={name}" for name in names), "--json", out_json]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        with open(out_json, encoding="utf-8") as f:
            payload = json.load(f)
    rows = payload["rows"]
    assert {(r["name"], r["arch"]) for r in rows} == {(n, a) for n in names for a in ("sm_90a", "sm_80")}
    assert payload["failures"] == []
    for r in rows:
        assert r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0
