"""Fast path vs reference path, written once for ``bench/gpu_suite.py`` and ``pytest -m gpu`` (tests/test_gpu.py).

Every check takes a device and ``quick`` (small shapes for the CPU dry run, where Triton runs in the interpreter) and
returns :class:`Check` rows: what was compared, the relative error ‖fast − ref‖ / ‖ref‖ (float64 norms), the
tolerance and whether it passed. Inputs are fresh random draws (never zeros) with ragged lengths; kernel outputs are
poisoned with NaN before the run, so an unwritten element shows as NaN and fails.

Tolerances: fp32 paths against the fp32 reference, 1e-5 for values; gradients and whole-model comparisons 1e-4 (sums
in another order over up to 12 layers). bf16/fp16 paths are compared with the fp32 reference of the same inputs and
pass when their error is at most ``LOW_PRECISION_TOL`` or at most twice the error of the reference path run at the
same precision (the fast path may not be less accurate than the original math at that precision).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Optional

import torch
from batches import random_batch, task_batch

from uniter_fast import Model, UniterConfig, backends
from uniter_fast.backends import triton_usable
from uniter_fast.layout import pack_batch
from uniter_fast.model.attention import VARLEN_ATTENTION
from uniter_fast.ot import available_backends, cost_matrix_cosine, optimal_transport_dist
from uniter_fast.ot.backends import run_reference
from uniter_fast.pretraining.model import UniterForPretraining

FP32_TOL = 1e-5
FP32_GRAD_TOL = 1e-4
LOW_PRECISION_TOL = 1e-2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Check:
    """One comparison of a fast path with its reference."""

    check: str
    case: str
    dtype: str
    quantity: str
    error: float
    tol: float
    passed: bool
    note: str = ""


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ in float64 (inf when ``actual`` has a NaN/inf, e.g. an unwritten
    poisoned element)."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        return float("inf")
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def compare(
    check: str, case: str, dtype: str, quantity: str, actual: torch.Tensor, expected: torch.Tensor, tol: float
) -> Check:
    """A :class:`Check` row for ``actual`` against ``expected`` with tolerance ``tol``."""
    error = rel_err(actual, expected)
    return Check(check, case, dtype, quantity, error, tol, error <= tol)


def compare_low_precision(
    check: str,
    case: str,
    dtype: str,
    quantity: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    reference_same_precision: Optional[torch.Tensor],
) -> Check:
    """A bf16/fp16 row: passes if the error is ≤ LOW_PRECISION_TOL or ≤ 2 × that of the reference path at the same
    precision (``reference_same_precision``, compared with the same fp32 ``expected``)."""
    error = rel_err(actual, expected)
    tol = LOW_PRECISION_TOL
    note = ""
    if reference_same_precision is not None:
        baseline = rel_err(reference_same_precision, expected)
        tol = max(tol, 2 * baseline)
        note = f"reference path at {dtype}: {baseline:.2e}"
    return Check(check, case, dtype, quantity, error, tol, error <= tol, note)


def skipped(check: str, case: str, dtype: str, why: str) -> Check:
    """A row that says a comparison could not run here (a missing feature), which is not a failure."""
    return Check(check, case, dtype, "skipped", float("nan"), float("nan"), True, why)


# --------------------------------------------------------------------------------------------------------- OT / IPOT
def ot_problem(
    batch: int, m: int, n: int, hidden: int, device: torch.device, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Random text/region embeddings [B, m|n, hidden] fp32 with ragged suffix pads (lengths in [1, m] × [1, n], pair
    0 full), their pad masks and lengths."""
    txt_lens = torch.randint(1, m + 1, (batch,), generator=generator)
    img_lens = torch.randint(1, n + 1, (batch,), generator=generator)
    txt_lens[0], img_lens[0] = m, n
    return {
        "txt_emb": torch.randn(batch, m, hidden, generator=generator).to(device),
        "img_emb": torch.randn(batch, n, hidden, generator=generator).to(device),
        "txt_pad": (torch.arange(m)[None] >= txt_lens[:, None]).to(device),
        "img_pad": (torch.arange(n)[None] >= img_lens[:, None]).to(device),
        "txt_lens": txt_lens.to(device),
        "img_lens": img_lens.to(device),
    }


def check_ipot_kernel(device: torch.device, quick: bool) -> list[Check]:
    """The Triton IPOT kernel (native on CUDA, interpreted on CPU) against the reference loop: plan and distance,
    poisoned outputs, pads exactly zero; costs in fp32, bf16 and fp16 (read into fp32 by both paths)."""
    if not triton_usable(device):
        return [skipped("ipot_kernel", "-", "-", f"Triton cannot run on {device} here")]
    from uniter_fast.kernels import ipot as kernel

    cases = [(3, 12, 20, "fp32"), (2, 9, 13, "bf16")] if quick else []
    cases = cases or [(256, 60, 100, "fp32"), (256, 60, 100, "bf16"), (64, 128, 128, "fp32"), (96, 30, 36, "fp16")]
    cases += [(1, 1, 1, "fp32")]
    generator = torch.Generator().manual_seed(1)
    rows = []
    for batch, m, n, dtype in cases:
        prob = ot_problem(batch, m, n, 32 if quick else 768, device, generator)
        pads = prob["txt_pad"][:, :, None] | prob["img_pad"][:, None, :]
        cost = cost_matrix_cosine(prob["txt_emb"], prob["img_emb"]).masked_fill(pads, 0).to(DTYPES[dtype])
        plan = kernel._empty_aligned(cost.shape, torch.float32, device).fill_(float("nan"))
        dist = torch.full((batch,), float("nan"), device=device)
        kernel.ipot_triton(cost, prob["txt_lens"], prob["img_lens"], 0.5, 50, 1, plan_out=plan, dist_out=dist)
        ref_plan, ref_dist = run_reference(cost, prob["txt_pad"], prob["img_pad"], None, None, 0.5, 50, 1)
        case = f"B{batch} {m}x{n}"
        rows.append(compare("ipot_kernel", case, dtype, "plan", plan, ref_plan, FP32_TOL))
        rows.append(compare("ipot_kernel", case, dtype, "distance", dist, ref_dist, FP32_TOL))
        pads_zero = bool(plan[pads].eq(0).all())
        rows.append(Check("ipot_kernel", case, dtype, "plan zero at pads", 0.0 if pads_zero else 1.0, 0.0, pads_zero))
    return rows


def check_ot_backends(device: torch.device, quick: bool) -> list[Check]:
    """``optimal_transport_dist`` (the WRA distance) on every fast backend of ``device`` against ``"reference"``:
    distances and the gradients of both embeddings, fp32 and bf16 embeddings."""
    batch, m, n, hidden = (4, 12, 20, 32) if quick else (256, 60, 100, 768)
    names = [b for b in available_backends(device) if b != "reference"]
    if not names:
        return [skipped("ot_backends", "-", "-", f"no fast OT backend on {device}")]
    generator = torch.Generator().manual_seed(2)
    prob = ot_problem(batch, m, n, hidden, device, generator)
    weights = torch.randn(batch, generator=generator).to(device)

    def run(backend: str, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        txt = prob["txt_emb"].to(dtype, copy=True).requires_grad_(True)
        img = prob["img_emb"].to(dtype, copy=True).requires_grad_(True)
        dist = optimal_transport_dist(txt, img, prob["txt_pad"], prob["img_pad"], backend=backend)
        (dist * weights).sum().backward()
        return dist.detach(), txt.grad, img.grad

    expected = run("reference", torch.float32)
    rows = []
    case = f"B{batch} {m}x{n} H{hidden}"
    for backend in names:
        for dtype in ("fp32", "bf16"):
            got = run(backend, DTYPES[dtype])
            ref_low = run("reference", DTYPES[dtype]) if dtype != "fp32" else (None, None, None)
            for quantity, a, b, low in zip(("distance", "grad txt", "grad img"), got, expected, ref_low):
                name = f"{backend}: {quantity}"
                if dtype == "fp32":
                    tol = FP32_TOL if quantity == "distance" else FP32_GRAD_TOL
                    rows.append(compare("ot_backends", case, dtype, name, a, b, tol))
                else:
                    rows.append(compare_low_precision("ot_backends", case, dtype, name, a, b, low))
    return rows


# ------------------------------------------------------------------------------------------------------ fused losses
LOSS_CLASSES = {"mlm": 28996, "mrfr": 2048, "mrc": 1601, "mrckl": 1601}


def loss_inputs(task: str, rows: int, hidden: int, device: torch.device, generator: torch.Generator) -> list:
    """fp32 hidden [M,H], weight ([C,H], [H,C] for MRFR), bias [C] and the task's target (labels / features / soft
    labels) as the pretraining heads pass them."""
    classes = LOSS_CLASSES[task]
    shape = (hidden, classes) if task == "mrfr" else (classes, hidden)
    leaves = [
        torch.randn(rows, hidden, generator=generator),
        torch.randn(shape, generator=generator) * hidden**-0.5,
        torch.randn(classes, generator=generator) * 0.1,
    ]
    if task == "mlm":
        target = torch.randint(0, classes, (rows,), generator=generator)
    elif task == "mrfr":
        target = torch.randn(rows, classes, generator=generator).relu()
    else:
        target = (3 * torch.randn(rows, classes, generator=generator)).softmax(-1)
    return [t.to(device) for t in (*leaves, target)]


def check_losses(device: torch.device, quick: bool) -> list[Check]:
    """The fused losses (Triton row kernels; the chunked path on CPU too) against the reference: loss and the
    gradients of hidden, weight and bias, fp32 and bf16, ragged row counts (not multiples of any tile)."""
    import uniter_fast.losses as losses

    functions = {"mlm": losses.mlm_loss, "mrfr": losses.mrfr_loss, "mrc": losses.mrc_loss, "mrckl": losses.mrc_kl_loss}
    names = ["triton"] if triton_usable(device) else []
    if device.type == "cpu":
        names.append("chunked")
    if not names:
        return [skipped("losses", "-", "-", "Triton is not installed")]
    row_counts, hidden = ([5], 16) if quick else ([1037, 4099], 768)
    generator = torch.Generator().manual_seed(3)
    rows = []
    for task, fn in functions.items():
        for count in row_counts:
            inputs = loss_inputs(task, count, hidden, device, generator)

            def run(backend: str, dtype: torch.dtype, fn: Callable = fn, inputs: list = inputs) -> list[torch.Tensor]:
                leaves = [t.to(dtype, copy=True).requires_grad_(True) for t in inputs[:3]]
                loss = fn(*leaves, inputs[3], backend=backend)
                loss.backward()
                return [loss.detach()] + [t.grad for t in leaves]

            expected = run("reference", torch.float32)
            low = {"bf16": run("reference", torch.bfloat16)}
            case = f"{task} M{count} H{hidden} C{LOSS_CLASSES[task]}"
            for backend in names:
                for dtype in ("fp32", "bf16"):
                    got = run(backend, DTYPES[dtype])
                    for i, quantity in enumerate(("loss", "grad hidden", "grad weight", "grad bias")):
                        name = f"{backend}: {quantity}"
                        if dtype == "fp32":
                            tol = FP32_TOL if i == 0 else FP32_GRAD_TOL
                            rows.append(compare("losses", case, dtype, name, got[i], expected[i], tol))
                        else:
                            rows.append(
                                compare_low_precision("losses", case, dtype, name, got[i], expected[i], low[dtype][i])
                            )
    return rows


# ---------------------------------------------------------------------------------------------------- packed encoder
def perturbed(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """``model`` with every parameter nudged by noise, so LayerNorm weights (1) and biases (0) at their init cannot hide
    mistakes in those paths."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator).to(p.device, p.dtype))
    return model


HALF_ONLY = ("sdpa_nested", "torch_varlen", "flash_torch", "flash_attn")


def varlen_backends(device: torch.device, dtype: torch.dtype) -> tuple[list[str], list[str]]:
    """(backends to compare on ``device`` at ``dtype``, reasons for those left out)."""
    names, missing = [], []
    for name in VARLEN_ATTENTION:
        if "cuda" in backends.component("packed_attention").needs.get(name, ()) and device.type != "cuda":
            continue
        if device.type == "cuda" and dtype == torch.float32 and name in HALF_ONLY:
            continue  # half-precision kernels only (the selector never picks them for fp32)
        why = backends.unavailable_reason("packed_attention", name, device)
        if why is not None:
            missing.append(f"{name}: {why}")
            continue
        names.append(name)
    return names, missing


def check_encoder(device: torch.device, quick: bool) -> list[Check]:
    """The packed encoder under every varlen backend the machine has against the eager padded encoder (the original
    math), and the fused encoder layer where Triton runs: outputs on the valid tokens and all parameter gradients, fp32
    and bf16 weights, dropout off."""
    generator = torch.Generator().manual_seed(4)
    if quick:
        config = UniterConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        size, txt_range, img_range = 5, (3, 12), (2, 15)
    else:
        config = UniterConfig.base(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        size, txt_range, img_range = 32, (10, 60), (10, 100)
    reference = perturbed(Model(config), generator).to(device).train()
    reference.check_values = False
    reference.set_attention_backend("reference")
    batch = random_batch(size, config.vocab_size, generator, device, txt_range, img_range)
    packed = pack_batch(batch)
    valid = batch["attn_masks"].bool()
    upstream = torch.randn(int(valid.sum()), config.hidden_size, generator=generator).to(device)

    def padded_run(model: Model) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = model.forward_batch(cast_features(batch, model))[valid]
        (out.float() * upstream).sum().backward()
        return out.detach().float(), flat_grads(model)

    def packed_run(model: Model, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.set_packed_attention_backend(backend)
        out = model.forward_packed(cast_features(packed, model))
        (out.float() * upstream).sum().backward()
        return out.detach().float(), flat_grads(model)

    def fused_run(model: Model) -> tuple[torch.Tensor, torch.Tensor]:
        model.set_encoder_layer_backend("triton")
        try:
            return packed_run(model, "auto")
        finally:
            model.set_encoder_layer_backend("auto")

    expected = padded_run(reference)
    rows: list[Check] = []
    case = f"{'tiny' if quick else 'base'} B{size}"
    for dtype_name in ("fp32", "bf16"):
        dtype = DTYPES[dtype_name]
        model = copy.deepcopy(reference).to(dtype)
        baseline = padded_run(model) if dtype != torch.float32 else None
        names, missing = varlen_backends(device, dtype)
        rows += [skipped("encoder", case, dtype_name, why) for why in missing]
        fused = ["fused layer"] if triton_usable(device) else []  # Triton (interpreted on CPU), auto attention
        for label in names + fused:
            got = fused_run(model) if label == "fused layer" else packed_run(model, label)
            for i, quantity in enumerate(("output", "param grads")):
                name = f"{label}: {quantity}"
                if baseline is None:
                    tol = FP32_TOL if i == 0 else FP32_GRAD_TOL
                    rows.append(compare("encoder", case, dtype_name, name, got[i], expected[i], tol))
                else:
                    rows.append(
                        compare_low_precision("encoder", case, dtype_name, name, got[i], expected[i], baseline[i])
                    )
    return rows


def check_attention_dropout(device: torch.device, quick: bool) -> list[Check]:
    """Attention dropout on every varlen backend that has it (fp32 on CPU, bf16 on CUDA), against the eager math.

    With one-hot values (v[t, h] = e_position, head dim ≥ the longest sequence) the forward output *is* the dropped-
    out attention matrix A of each sequence, so the backward can be checked exactly against that same draw:
    grad_v must equal Aᵀ·grad_out (the backward regenerated the forward's mask). Also: the mean of many draws
    approaches the dropout-free output (no worse than twice the eager path's deviation for as many draws), and two
    draws differ.
    """
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    lengths, heads, dim, draws = ([9, 16, 3, 5], 2, 16, 50) if quick else ([37, 64, 5, 20], 2, 64, 400)
    p = 0.1
    generator = torch.Generator().manual_seed(6)
    total = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    positions = torch.cat([torch.arange(n) for n in lengths])
    one_hot = torch.zeros(total, heads, dim)
    one_hot[torch.arange(total), :, positions] = 1.0
    q, k = (torch.randn(total, heads, dim, generator=generator).to(device, dtype) for _ in range(2))
    v = one_hot.to(device, dtype)
    upstream = torch.randn(total, heads, dim, generator=generator).to(device, dtype)
    names, _ = varlen_backends(device, dtype)
    names = [n for n in names if n != "torch_varlen"]  # no dropout there (it refuses)
    from uniter_fast.model.attention import VarlenBatch

    def batch_for(name: str) -> VarlenBatch:
        return VarlenBatch(cu.to(device), max(lengths), name)

    eager = VARLEN_ATTENTION["reference"]
    clean = eager(q.float(), k.float(), v.float(), batch_for("reference"), 0.0)
    mean_eager = torch.stack([eager(q, k, v, batch_for("reference"), p).float() for _ in range(draws)])
    eager_deviation = rel_err(mean_eager.mean(0), clean)
    rows = []
    case = f"lengths {lengths} p={p}"
    for name in names:
        fn, batch = VARLEN_ATTENTION[name], batch_for(name)
        v_leaf = v.clone().requires_grad_(True)
        out = fn(q, k, v_leaf, batch, p)
        out.backward(upstream)
        grad_expected = torch.zeros(total, heads, dim, device=device)
        for start, n in zip(cu[:-1].tolist(), lengths):
            attn = out[start : start + n, :, :n].float().transpose(0, 1)  # [heads, n(query), n(key)]
            grad = upstream[start : start + n].float().transpose(0, 1)  # [heads, n, dim]
            grad_expected[start : start + n] = (attn.transpose(1, 2) @ grad).transpose(0, 1)
        rows.append(
            compare(
                "attention_dropout",
                case,
                dtype_name,
                f"{name}: grad v vs this draw",
                v_leaf.grad,
                grad_expected,
                FP32_GRAD_TOL if dtype == torch.float32 else 3 * LOW_PRECISION_TOL,  # a wrong mask: ~sqrt(2p) = 45%
            )
        )
        mean = torch.stack([fn(q, k, v, batch, p).float() for _ in range(draws)]).mean(0)
        deviation = rel_err(mean, clean)
        tol = 2 * eager_deviation + (1e-3 if dtype == torch.float32 else 1e-2)
        note = f"eager over {draws} draws: {eager_deviation:.2e}"
        rows.append(
            Check(
                "attention_dropout", case, dtype_name, f"{name}: mean of draws", deviation, tol, deviation <= tol, note
            )
        )
        differ = not torch.equal(fn(q, k, v, batch, p), fn(q, k, v, batch, p))
        rows.append(
            Check("attention_dropout", case, dtype_name, f"{name}: draws differ", 0.0 if differ else 1.0, 0.0, differ)
        )
    return rows


def cast_features(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """``batch`` with its float features in the model's parameter dtype (as a bf16 data pipeline delivers them)."""
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def flat_grads(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter's gradient flattened into one fp32 vector (zeros for parameters without one)."""
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).float().flatten() for p in model.parameters()]
    )


# ------------------------------------------------------------------------------------------------- pretraining steps
def check_steps(device: torch.device, quick: bool) -> list[Check]:
    """One training step (loss and every parameter gradient) of each pretraining task on the fast path (packed encoder,
    fused losses, fast IPOT) against the reference path (padded eager encoder, reference losses and IPOT), in fp32
    and under bf16 autocast, dropout off so both paths compute the same function."""
    generator = torch.Generator().manual_seed(5)
    if quick:
        config = UniterConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        size, txt_range, img_range = 4, (4, 12), (3, 15)
    else:
        config = UniterConfig.base(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        size, txt_range, img_range = 16, (10, 60), (10, 100)
    config.attention_backend = "reference"
    model = perturbed(UniterForPretraining(config), generator).to(device).train()
    model.uniter.check_values = False
    rows = []
    for i, task in enumerate(("mlm", "mrfr", "mrc", "mrckl", "itm")):
        batch = task_batch(task, size, config.vocab_size, 100 + i, device, txt_range, img_range)

        def run(fast: bool, autocast: bool, task: str = task, batch: dict = batch) -> tuple[torch.Tensor, ...]:
            model.fast = fast
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(batch, task)["loss"]
            loss.backward()
            return loss.detach().float(), flat_grads(model)

        expected = run(False, False)
        case = f"{task} {'tiny' if quick else 'base'} B{size}"
        got = run(True, False)
        rows.append(compare("steps", case, "fp32", "loss", got[0], expected[0], FP32_GRAD_TOL))
        rows.append(compare("steps", case, "fp32", "param grads", got[1], expected[1], FP32_GRAD_TOL))
        baseline = run(False, True)
        got = run(True, True)
        for j, quantity in enumerate(("loss", "param grads")):
            rows.append(
                compare_low_precision("steps", case, "bf16 autocast", quantity, got[j], expected[j], baseline[j])
            )
    return rows


CHECKS: dict[str, Callable[[torch.device, bool], list[Check]]] = {
    "ipot_kernel": check_ipot_kernel,
    "ot_backends": check_ot_backends,
    "losses": check_losses,
    "encoder": check_encoder,
    "attention_dropout": check_attention_dropout,
    "steps": check_steps,
}
