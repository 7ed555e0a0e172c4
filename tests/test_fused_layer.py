"""The fused encoder layer (``encoder_layer_backend="triton"``; kernels interpreted on CPU) against the eager layer."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import torch
from losses_helpers import poison_empty
from model_batches import padded_batch
from torch.utils._python_dispatch import TorchDispatchMode

from uniter_fast import Model, UniterConfig
from uniter_fast.layout import pack_batch

pytest.importorskip("triton")
from uniter_fast.model import fused_layer as fl  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def leaf(*shape: int, dtype: torch.dtype = torch.float32, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    return (torch.randn(*shape, device=DEVICE) * scale + shift).to(dtype).requires_grad_()


def values_and_grads(out: torch.Tensor, leaves: list[torch.Tensor], upstream: torch.Tensor) -> list[torch.Tensor]:
    return [out, *torch.autograd.grad(out, leaves, upstream)]


def check_close(got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        assert rel_err(g, w) < tolerance, f"output {i}: rel error {rel_err(g, w):.2e}"


# ----------------------------------------------------------------------------------------------------- bias + GELU
@DTYPES
@pytest.mark.parametrize("rows,cols", [(37, 768), (13, 3072), (5, 4096), (29, 100)])
def test_bias_gelu_matches_reference(dtype: torch.dtype, rows: int, cols: int, monkeypatch) -> None:
    x, bias = leaf(rows, cols, dtype=dtype), leaf(cols, dtype=dtype)
    upstream = torch.randn(rows, cols, device=DEVICE).to(dtype)
    poison_empty(monkeypatch)  # every output buffer the kernels get starts as NaN: an unwritten element fails
    got = values_and_grads(fl.bias_gelu(x, bias), [x, bias], upstream)
    want = values_and_grads(fl.bias_gelu_reference(x, bias), [x, bias], upstream)
    check_close(got, want, TOLERANCE[dtype])


def test_bias_gelu_half_input_float_bias() -> None:
    """Under autocast the matmul output is bf16 and the bias float32: the bias gradient stays float32."""
    x, bias = leaf(17, 384, dtype=torch.bfloat16), leaf(384)
    upstream = torch.randn(17, 384, device=DEVICE).bfloat16()
    got = values_and_grads(fl.bias_gelu(x, bias), [x, bias], upstream)
    want = values_and_grads(fl.bias_gelu_reference(x.float(), bias).bfloat16(), [x, bias], upstream)
    check_close(got, want, 1e-2)


# ------------------------------------------------------------------------------ bias + dropout + residual + LayerNorm
def ln_case(rows: int, cols: int, dtype: torch.dtype, residual_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """x, bias, residual, LayerNorm weight and bias (weight near 1, none of them zero)."""
    param = residual_dtype or dtype
    return [
        leaf(rows, cols, dtype=dtype),
        leaf(cols, dtype=param, scale=0.1),
        leaf(rows, cols, dtype=param),
        leaf(cols, dtype=param, scale=0.1, shift=1.0),
        leaf(cols, dtype=param, scale=0.1),
    ]


@DTYPES
@pytest.mark.parametrize("p", [0.0, 0.1], ids=["p0", "p0.1"])
@pytest.mark.parametrize("rows,cols", [(37, 768), (11, 1024), (23, 96), (1, 768)])
def test_bias_dropout_add_layer_norm_matches_reference(
    dtype: torch.dtype, p: float, rows: int, cols: int, monkeypatch
) -> None:
    leaves = ln_case(rows, cols, dtype)
    seed = fl.draw_seed(DEVICE)
    keep = fl.dropout_keep(seed, torch.Size((rows, cols)), p) if p > 0 else None
    upstream = torch.randn(rows, cols, device=DEVICE).to(dtype)
    poison_empty(monkeypatch)  # every output buffer the kernels get starts as NaN: an unwritten element fails
    got = values_and_grads(fl.bias_dropout_add_layer_norm(*leaves, 1e-12, p, seed), leaves, upstream)
    want = values_and_grads(fl.bias_dropout_add_layer_norm_reference(*leaves, 1e-12, keep, p), leaves, upstream)
    check_close(got, want, TOLERANCE[dtype])


class CountSums(TorchDispatchMode):
    """Counts the ``aten.sum`` calls (the fused Functions' bias / LayerNorm weight gradients are row sums)."""

    def __init__(self) -> None:
        super().__init__()
        self.sums = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.sums += func.overloadpacket is torch.ops.aten.sum
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["bias_gelu", "layer_norm"])
def test_input_only_backward_skips_the_weight_gradients(kind: str) -> None:
    """A backward that names its inputs (``autograd.backward(..., inputs=[x])``, adversarial training's input-only
    backward) computes the same x gradient as the full backward and none of the bias / LayerNorm weight gradients."""
    if kind == "bias_gelu":
        leaves = [leaf(13, 96), leaf(96)]
        fn = fl.bias_gelu
    else:
        leaves = ln_case(13, 96, torch.float32)
        fn = functools.partial(fl.bias_dropout_add_layer_norm, eps=1e-12)
    x = leaves[0]
    upstream = torch.randn(13, 96, device=DEVICE)
    full, only_x = CountSums(), CountSums()
    with full:
        torch.autograd.backward(fn(*leaves), upstream)
    want = x.grad.clone()
    for t in leaves:
        t.grad = None
    with only_x:
        torch.autograd.backward(fn(*leaves), upstream, inputs=[x])
    assert full.sums == (1 if kind == "bias_gelu" else 3) and only_x.sums == 0
    assert all(t.grad is None for t in leaves[1:])
    torch.testing.assert_close(x.grad, want, rtol=0, atol=0)


def test_layer_norm_autocast_dtypes() -> None:
    """bf16 matmul output, float32 residual and parameters (autocast): a float32 output, as the eager LayerNorm's."""
    leaves = ln_case(19, 768, torch.bfloat16, residual_dtype=torch.float32)
    upstream = torch.randn(19, 768, device=DEVICE)
    got = values_and_grads(fl.bias_dropout_add_layer_norm(*leaves, 1e-12), leaves, upstream)
    x, *rest = leaves  # the kernel adds x + bias in float32: so does this reference
    want = values_and_grads(fl.bias_dropout_add_layer_norm_reference(x.float(), *rest, 1e-12), leaves, upstream)
    assert got[0].dtype == torch.float32
    check_close(got[:1] + got[3:], want[:1] + want[3:], 1e-5)
    check_close(got[1:3], want[1:3], 1e-2)  # dx rounded to bf16, and d bias its sum (as the eager matmul's)


def test_dropout_mask_is_the_seed_s() -> None:
    shape, p = torch.Size((64, 1024)), 0.1
    seed = fl.draw_seed(DEVICE)
    keep = fl.dropout_keep(seed, shape, p)
    assert torch.equal(keep, fl.dropout_keep(seed.clone(), shape, p))
    assert not torch.equal(keep, fl.dropout_keep(seed + 1, shape, p))
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01  # 64k draws: 3 sigma is 0.0035
    # the fused forward drops exactly those entries: with residual 0, LayerNorm of zeros where dropped is the shift
    x, bias, _, weight, beta = ln_case(*shape, torch.float32)
    residual = torch.zeros(shape, device=DEVICE)
    out = fl.bias_dropout_add_layer_norm(x, bias, residual, weight, beta, 1e-12, p, seed)
    want = fl.bias_dropout_add_layer_norm_reference(x, bias, residual, weight, beta, 1e-12, keep, p)
    assert rel_err(out, want) < 1e-5


def test_seed_comes_from_torch_generator() -> None:
    """The same torch seed (a resumed run's restored RNG state) gives the same seed, hence the same masks."""
    torch.manual_seed(1234)
    first = fl.draw_seed(DEVICE)
    state = torch.random.get_rng_state()
    second = fl.draw_seed(DEVICE)
    torch.manual_seed(1234)
    assert torch.equal(fl.draw_seed(DEVICE), first)
    torch.random.set_rng_state(state)
    assert torch.equal(fl.draw_seed(DEVICE), second)


def test_dropout_without_seed_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a seed"):
        fl.bias_dropout_add_layer_norm(*ln_case(3, 16, torch.float32), 1e-12, 0.1)


def test_qkv_projection_is_three_projections() -> None:
    linears = tuple(torch.nn.Linear(96, 96) for _ in range(3))
    hidden = torch.randn(2, 7, 96)
    for got, linear in zip(fl.qkv_projection(hidden, linears), linears):
        assert rel_err(got, linear(hidden)) < 1e-6


# -------------------------------------------------------------------------------------------------- the whole layer
def layer_model(dtype: torch.dtype = torch.float32, dropout: float = 0.0, **overrides: Any) -> Model:
    config = UniterConfig.tiny(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **overrides)
    model = Model(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.to(DEVICE)


def run_both(model: Model, batch: dict[str, Any], packed: bool, backend: str) -> list[torch.Tensor]:
    """The last layer's output on the valid tokens, and every parameter's gradient of a random projection of it."""
    model.set_encoder_layer_backend(backend)
    model.zero_grad(set_to_none=True)
    valid = batch["attn_masks"].bool()
    if packed:
        out = model.forward_packed(pack_batch(batch))
    else:
        out = model.forward_batch(batch, img_masks=batch["img_masks"])[valid]
    torch.manual_seed(7)
    (out.float() * torch.randn(out.shape, device=out.device)).sum().backward()
    return [out.detach()] + [p.grad for _, p in model.named_parameters()]


@DTYPES
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("hidden,heads", [(64, 4), (768, 12)])
def test_fused_layer_matches_eager(dtype: torch.dtype, packed: bool, hidden: int, heads: int) -> None:
    """fp32: fused = eager to 2e-5. bf16 (a pure-bf16 model, where two layers of rounding put the eager gradients
    ~2e-2 from the fp32 model's at H=768): fused is as close to the fp32 model as eager is."""
    sizes = dict(hidden_size=hidden, num_attention_heads=heads, intermediate_size=4 * hidden, num_hidden_layers=2)
    model = layer_model(dtype, **sizes).train()
    batch = padded_batch([7, 3, 12], [5, 9, 1], vocab=model.config.vocab_size)
    want = run_both(model, batch, packed, "reference")
    got = run_both(model, batch, packed, "triton")
    exact = want
    if dtype != torch.float32:
        fp32 = layer_model(**sizes).train()
        fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        exact = run_both(fp32, batch, packed, "reference")
    names = ["output"] + [name for name, _ in model.named_parameters()]
    for name, g, w, e in zip(names, got, want, exact):
        assert (g is None) == (w is None), name
        if g is None or name.endswith("key.bias"):  # unused, or mathematically zero (softmax is shift-invariant)
            continue
        if dtype == torch.float32:
            assert rel_err(g, w) < 2e-5, f"{name}: {rel_err(g, w):.2e}"
        else:
            assert rel_err(g, e) < 1.25 * rel_err(w, e) + 5e-3, f"{name}: {rel_err(g, e):.2e} vs {rel_err(w, e):.2e}"


def test_fused_layer_under_autocast() -> None:
    model = layer_model().train()
    batch = padded_batch([9, 4], [6, 11], vocab=model.config.vocab_size)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        want = run_both(model, batch, True, "reference")
        got = run_both(model, batch, True, "triton")
    assert got[0].dtype == want[0].dtype
    for (name, _), g, w in zip([("output", None), *model.named_parameters()], got, want):
        assert (g is None) == (w is None), name
        if g is not None and not name.endswith("key.bias"):
            assert rel_err(g, w) < 2e-2, f"{name}: {rel_err(g, w):.2e}"


def test_fused_layer_dropout_reproducible() -> None:
    model = layer_model(dropout=0.1).train()
    model.set_encoder_layer_backend("triton")
    packed = pack_batch(padded_batch([7, 3], [5, 9], vocab=model.config.vocab_size))
    torch.manual_seed(3)
    first = model.forward_packed(packed)
    grads = torch.autograd.grad(first.sum(), list(model.encoder.parameters()))
    torch.manual_seed(3)
    again = model.forward_packed(packed)
    assert torch.equal(again, first)
    assert all(
        torch.equal(a, b) for a, b in zip(torch.autograd.grad(again.sum(), list(model.encoder.parameters())), grads)
    )
    first = first.detach()
    assert not torch.equal(model.forward_packed(packed), first)  # the next call draws new seeds
    assert not torch.equal(model.eval().forward_packed(packed), first)


# ------------------------------------------------------------------------------------------ the option and the default
def test_config_option_and_its_error() -> None:
    assert UniterConfig().encoder_layer_backend == "auto"
    assert UniterConfig(encoder_layer_backend="triton").encoder_layer_backend == "triton"
    with pytest.raises(ValueError, match="encoder_layer_backend: unknown encoder_layer backend 'fused'"):
        UniterConfig(encoder_layer_backend="fused")
    model = layer_model()
    with pytest.raises(ValueError, match="unknown encoder_layer backend"):
        model.set_encoder_layer_backend("cuda")


def test_triton_refused_without_interpreter_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    model = layer_model().to("cpu")
    model.set_encoder_layer_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    packed = pack_batch(padded_batch([4], [3], vocab=model.config.vocab_size))
    with pytest.raises(ValueError, match="encoder_layer backend 'triton' cannot run on tensors on cpu"):
        model.forward_packed(packed)


def test_default_path_unchanged() -> None:
    """auto resolves to the eager layer (bit-identical to reference), and the checkpoint keys do not change."""
    model = layer_model(dropout=0.1).train()
    batch = padded_batch([7, 3], [5, 9], vocab=model.config.vocab_size)
    outputs = []
    for backend in ("auto", "reference"):
        model.set_encoder_layer_backend(backend)
        torch.manual_seed(5)
        outputs.append((model.forward_packed(pack_batch(batch)), model.forward_batch(batch)))
    assert all(torch.equal(a, b) for a, b in zip(*outputs))
    fused = Model(UniterConfig.tiny(encoder_layer_backend="triton"))
    assert list(fused.state_dict()) == list(Model(UniterConfig.tiny()).state_dict())
    assert any(k.endswith("attention.self.query.weight") for k in fused.state_dict())


def test_zero3_refused() -> None:
    """ZeRO-3 gathers a parameter only inside its owner's forward; the fused layer reads q/k/v, dense and LayerNorm
    parameters from their parents (and forward_packed runs no module hooks), so the engine refuses the pair."""
    from uniter_fast.training.engine import build_engine

    model = layer_model()
    model.set_encoder_layer_backend("triton")
    with pytest.raises(ValueError, match="encoder_layer_backend 'triton' cannot run under ZeRO-3"):
        build_engine(model, None, {"zero_optimization": {"stage": 3}})


# ------------------------------------------------------------------------------------------------- AOT compilation
SCRIPT = """
import dataclasses, json, sys
from uniter_fast.kernels.aot import compile_spec
from uniter_fast.kernels.fused_layer import aot_specs
specs = [s for s in aot_specs() if s.name in set(sys.argv[1:])]
print(json.dumps([dataclasses.asdict(compile_spec(s, cap)) for s in specs for cap in (90, 80)]))
"""


def test_aot_compiles_without_spills() -> None:
    names = ["bias_gelu_bwd_bf16_amp", "ln_fwd_bf16_amp_b1024_dropout", "ln_bwd_bf16_amp_b1024_dropout"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, *names], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(results) == 2 * len(names)
    for r in results:
        assert r["registers"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
