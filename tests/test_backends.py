"""The one backend resolver (uniter_fast.backends): every component's names resolve or fail as documented, what auto
picks on this CPU (with and without the Triton interpreter, with and without the C++ extension), the CUDA rules as
pure functions, the OT fallbacks, logging, and the model's backend and value-check switches."""

from __future__ import annotations

import json
import logging
from typing import Optional

import pytest
import torch

from uniter_fast import Model, UniterConfig, backends
from uniter_fast.model.attention import PADDED_ATTENTION, VARLEN_ATTENTION
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.ot.backends import RUNNERS
from uniter_fast.ot.wra import WRA_RUNNERS

CPU = torch.device("cpu")
CUDA_ONLY = "needs a CUDA device"
NO_TRITON = "TRITON_INTERPRET=1"


@pytest.fixture(params=[True, False], ids=["interpret", "no-interpret"])
def interpret(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Run the test with TRITON_INTERPRET=1 and without it."""
    if request.param:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return request.param


def cpu_outcomes(interpret: bool, cpp: bool) -> dict[str, dict[str, Optional[str]]]:
    """component -> accepted name -> what it resolves to on CPU tensors (None: a ValueError saying why)."""
    triton = "triton" if interpret and backends.triton_importable() else None
    ot_auto = "cpp" if cpp else triton or "reference"
    ot = {"auto": ot_auto, "cpp": "cpp" if cpp else None, "triton": triton, "reference": "reference"}
    return {
        "attention": {"auto": "sdpa", "sdpa": "sdpa", "reference": "reference", "eager": "reference"},
        "packed_attention": {
            "auto": "sdpa_padded",
            **{n: n for n in ("sdpa_padded", "sdpa_nested", "sdpa_loop", "reference")},
            **{n: None for n in ("flash_attn", "flash_torch", "torch_varlen")},
            "eager": "reference",
        },
        "losses": {
            "auto": "chunked",
            "fast": "chunked",
            "chunked": "chunked",
            "reference": "reference",
            "triton": triton,
        },
        "ipot": ot,
        "wra": ot,
        "encoder_layer": {"auto": "reference", "triton": triton, "reference": "reference"},
    }


@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "no-cpp"])
def test_every_name_of_every_component_on_cpu(interpret: bool, cpp: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if cpp and not backends.cpp_available():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(backends, "cpp_available", lambda: cpp)
    outcomes = cpu_outcomes(interpret, cpp)
    assert set(outcomes) == set(backends.COMPONENTS)
    for name, expected in outcomes.items():
        assert set(expected) == set(backends.component(name).names), name
        for requested, want in expected.items():
            if want is None:
                with pytest.raises(ValueError, match=f"{name} backend {requested!r} cannot run on tensors on cpu"):
                    backends.resolve(name, requested, CPU)
            else:
                assert backends.resolve(name, requested, CPU, torch.bfloat16) == want, (name, requested)
        concrete = [b for b in backends.component(name).backends if expected[b] is not None]
        assert backends.available(name, CPU) == concrete


def test_why_a_backend_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "cpp_available", lambda: False)
    assert backends.unavailable_reason("packed_attention", "flash_torch", CPU) == CUDA_ONLY
    assert NO_TRITON in backends.unavailable_reason("losses", "triton", CPU)
    assert "uniter_fast._C" in backends.unavailable_reason("ipot", "cpp", CPU)
    assert backends.unavailable_reason("ipot", "cpp", "cuda") == "runs on CPU tensors only"
    assert backends.unavailable_reason("packed_attention", "sdpa_loop", "cuda") is None
    with pytest.raises(ValueError, match="ipot backend 'cpp' cannot run on tensors on cpu: it needs the C"):
        backends.resolve("ipot", "cpp", CPU)


def test_every_concrete_name_has_a_kernel() -> None:
    """The resolver's names and the components' kernel tables are the same sets."""
    assert set(backends.component("attention").backends) == set(PADDED_ATTENTION)
    assert set(backends.component("packed_attention").backends) == set(VARLEN_ATTENTION)
    assert set(backends.component("ipot").backends) == set(RUNNERS)
    assert set(backends.component("wra").backends) == set(WRA_RUNNERS) | {"reference"}
    for c in backends.COMPONENTS.values():
        assert c.backends[-1] == "reference" and "auto" not in c.backends
        assert all(target in c.backends for alias in c.aliases.values() for target in alias.values())


@pytest.mark.parametrize("name", sorted(backends.COMPONENTS))
def test_unknown_names_give_the_one_error(name: str) -> None:
    with pytest.raises(ValueError, match=rf"backend: unknown {name} backend 'fastest'; expected one of \['auto', "):
        backends.resolve(name, "fastest", CPU)


def test_unknown_component() -> None:
    with pytest.raises(ValueError, match="unknown backend component 'attn'; expected one of"):
        backends.resolve("attn", "auto", CPU)


# --------------------------------------------------------------------------------------- the rules, as pure functions
@pytest.mark.parametrize(
    "device,dtype,dropout,flash,expected",
    [
        ("cpu", torch.float32, 0.0, False, "sdpa_padded"),
        ("cpu", torch.bfloat16, 0.1, True, "sdpa_padded"),
        ("mps", torch.float16, 0.0, True, "sdpa_padded"),
        ("cuda", torch.bfloat16, 0.1, True, "flash_attn"),
        ("cuda", torch.float16, 0.0, True, "flash_attn"),
        ("cuda", torch.bfloat16, 0.0, False, "flash_torch"),
        ("cuda", torch.float16, 0.1, False, "flash_torch"),
        ("cuda", torch.float32, 0.0, True, "sdpa_padded"),
        ("cuda", torch.float32, 0.1, False, "sdpa_padded"),
    ],
)
def test_packed_attention_rule(device: str, dtype: torch.dtype, dropout: float, flash: bool, expected: str) -> None:
    assert backends.choose("packed_attention", device, dtype, {"flash_attn": flash}, dropout) == expected


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_padded_attention_rule_is_sdpa_everywhere(device: str, dtype: torch.dtype) -> None:
    assert backends.choose("attention", device, dtype, {}, 0.1) == "sdpa"


@pytest.mark.parametrize(
    "device,triton,cpp,losses,ot",
    [
        ("cuda", True, True, "triton", "triton"),
        ("cuda", False, True, "chunked", "reference"),
        ("cpu", True, True, "chunked", "cpp"),
        ("cpu", True, False, "chunked", "triton"),
        ("cpu", False, False, "chunked", "reference"),
        ("mps", True, True, "chunked", "reference"),
    ],
)
def test_losses_and_ot_rules(device: str, triton: bool, cpp: bool, losses: str, ot: str) -> None:
    probes = {"triton": triton, "cpp": cpp}
    assert backends.choose("losses", device, torch.bfloat16, probes) == losses
    assert backends.choose("ipot", device, torch.float32, probes) == ot
    assert backends.choose("wra", device, torch.float32, probes) == ot


def test_losses_fast_alias_follows_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """ "fast" is the fused path of the tensors' device: Triton on CUDA (an error without it), chunked on CPU."""
    monkeypatch.setattr(backends, "triton_importable", lambda: False)
    with pytest.raises(ValueError, match="losses backend 'fast' cannot run on tensors on cuda: it needs Triton"):
        backends.resolve("losses", "fast", "cuda")
    assert backends.resolve("losses", "fast", CPU) == "chunked"


# ----------------------------------------------------------------------------------------------- OT situations
def test_ot_pads_not_a_suffix() -> None:
    for name in ("ipot", "wra"):
        with pytest.warns(UserWarning, match="not a suffix"):
            assert backends.resolve(name, "auto", CPU, suffix_padded=False) == "reference"
        assert backends.resolve(name, "reference", CPU, suffix_padded=False) == "reference"
    if backends.cpp_available():
        with pytest.raises(ValueError, match="end of each row"):
            backends.resolve("wra", "cpp", CPU, suffix_padded=False)


def test_ot_pairs_beyond_the_triton_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from uniter_fast.kernels.ipot import MAX_BLOCK

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.resolve("ipot", "triton", CPU, pair_size=(MAX_BLOCK, MAX_BLOCK)) == "triton"
    for name in ("ipot", "wra"):
        with pytest.warns(UserWarning, match=f"at most {MAX_BLOCK}x{MAX_BLOCK} per pair, got 3x{MAX_BLOCK + 1}"):
            assert backends.resolve(name, "triton", CPU, pair_size=(3, MAX_BLOCK + 1)) == "reference"
    if backends.cpp_available():  # the C++ kernels have no size limit
        assert backends.resolve("wra", "auto", CPU, pair_size=(500, 500)) == "cpp"


# ------------------------------------------------------------------------------------------------------------ logging
def test_each_choice_is_logged_once(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_LOGGED", set())
    with caplog.at_level(logging.INFO, logger="uniter_fast.backends"):
        assert backends.resolve("packed_attention", "auto", CPU, torch.float32, dropout_p=0.1) == "sdpa_padded"
        assert backends.resolve("packed_attention", "auto", CPU, torch.float32, dropout_p=0.1) == "sdpa_padded"
        assert backends.resolve("packed_attention", "sdpa_loop", CPU, torch.float32) == "sdpa_loop"
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2  # one line per new choice, not per call
    assert messages[0] == "packed_attention on cpu/torch.float32: selected backend 'sdpa_padded'"
    assert "requested backend 'sdpa_loop'" in messages[1]


# ------------------------------------------------------------------------------------------ the model's switches
def tiny(**overrides) -> UniterConfig:
    return UniterConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **overrides)


def test_config_names_are_checked_by_the_resolver() -> None:
    with pytest.raises(ValueError, match="attention_backend: unknown attention backend 'flash9'"):
        tiny(attention_backend="flash9")
    with pytest.raises(ValueError, match="packed_attention_backend: unknown packed_attention backend 'sdpa'"):
        tiny(packed_attention_backend="sdpa")
    config = tiny()
    assert (config.attention_backend, config.packed_attention_backend) == ("auto", "auto")


def test_packed_backend_is_per_instance_and_saved(tmp_path) -> None:
    config = tiny()
    first, second = Model(config), Model(config)
    first.set_packed_attention_backend("sdpa_loop")
    first.set_attention_backend("eager")
    assert (first.config.packed_attention_backend, first.config.attention_backend) == ("sdpa_loop", "eager")
    assert (second.config.packed_attention_backend, second.config.attention_backend) == ("auto", "auto")
    assert config.packed_attention_backend == "auto"
    with pytest.raises(ValueError, match="packed_attention_backend: unknown"):
        first.set_packed_attention_backend("fastest")
    assert first.config.packed_attention_backend == "sdpa_loop"
    first.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (saved["packed_attention_backend"], saved["attention_backend"]) == ("sdpa_loop", "eager")
    assert Model.from_pretrained(tmp_path / "m").config.packed_attention_backend == "sdpa_loop"


def test_eager_alias_runs_the_reference_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """A saved config with "eager" (the older name) runs exactly the reference attention."""
    calls = []
    reference = PADDED_ATTENTION["reference"]
    monkeypatch.setitem(PADDED_ATTENTION, "reference", lambda *a: calls.append(1) or reference(*a))
    model = Model(UniterConfig.from_dict({**tiny().to_dict(), "attention_backend": "eager"})).eval()
    ids = torch.randint(1, 100, (2, 5))
    model(ids, None, None, None, torch.ones(2, 5, dtype=torch.long))
    assert len(calls) == model.config.num_hidden_layers


def test_one_value_check_flag() -> None:
    model = Model(tiny())
    assert model.check_values is True
    with pytest.raises(AttributeError, match="renamed Model.check_values"):
        model.check_inputs = False
    fast, padded = UniterPreTrainedModel(tiny(), fast=True), UniterPreTrainedModel(tiny(), fast=False)
    assert fast.check_values is False and padded.check_values is True  # default: off on the fast path only
    fast.fast = False
    assert fast.check_values is True
    fast.check_values = False
    assert fast.check_values is False
    assert UniterPreTrainedModel(tiny(), fast=True, check_values=True).check_values is True
