"""The loss kernels' launch configurations compile ahead of time for sm_90a and sm_80 without spills."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

# Run in a fresh interpreter without TRITON_INTERPRET: under the interpreter @triton.jit gives no compilable kernel.
SCRIPT = """
import dataclasses, json, sys
from uniter_fast.kernels.aot import compile_spec
from uniter_fast.kernels.fused_linear_losses import aot_specs
wanted = set(sys.argv[1:])
specs = [s for s in aot_specs() if not wanted or s.name in wanted]
print(json.dumps([dataclasses.asdict(compile_spec(s, cap)) for s in specs for cap in (90, 80)]))
"""
# One launch per kernel, the largest tiles, in the training dtype.
REPRESENTATIVE = ["ce_rows_bf16_b4096", "kl_rows_bf16_b2048", "mse_rows_fp32_b2048"]


def compile_report(names: list[str]) -> list[dict]:
    """AOT-compile the named specs (all when empty) for capabilities 90 and 80; one dict per (spec, arch)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, *names], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_no_spills(results: list[dict]) -> None:
    """Every compiled spec uses registers, spills none, and both architectures are present."""
    assert {r["arch"] for r in results} == {"sm_90a", "sm_80"}
    for r in results:
        assert r["registers"] > 0, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


def test_one_launch_per_kernel_compiles_without_spills() -> None:
    results = compile_report(REPRESENTATIVE)
    assert sorted({r["name"] for r in results}) == sorted(REPRESENTATIVE)
    check_no_spills(results)


@pytest.mark.slow
def test_every_listed_launch_compiles_without_spills() -> None:
    from uniter_fast.kernels.fused_linear_losses import aot_specs

    results = compile_report([])
    assert {r["name"] for r in results} == {s.name for s in aot_specs()}
    check_no_spills(results)
