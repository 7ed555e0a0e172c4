"""The GPU suite cannot rot while no GPU is around: its CPU dry run (``--device cpu --quick``, Triton interpreted)
runs every part's code, and the correctness checks can fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
from checks import Check, compare, compare_low_precision, rel_err  # noqa: E402
from gpu_suite import PARTS  # noqa: E402


def test_quick_cpu_run_finishes_every_part(tmp_path) -> None:
    out = tmp_path / "suite"
    # Caps x4: the parts' caps are sized for a quiet 2-core machine; a busy CI runner must not fail the test on time.
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu_suite.py"), "--device", "cpu", "--quick", "--out", str(out)]
    cmd += ["--cap-scale", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert [p["part"] for p in summary["parts"]] == list(PARTS)
    not_ok = [p for p in summary["parts"] if p["status"] != "ok"]
    assert not not_ok, f"{not_ok}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    checks = [g for g in summary["goals"] if g["kind"] == "correctness"]
    assert checks and all(g["met"] for g in checks), checks
    assert done.returncode == 0 and "suite passed" in done.stdout
    for part in PARTS:
        result = json.loads((out / f"{part}.json").read_text(encoding="utf-8"))
        assert result["status"] == "ok" and result["environment"]["torch"] == torch.__version__
    assert (out / "correctness.png").stat().st_size > 0


def test_rel_err_flags_poison_and_wrong_values() -> None:
    expected = torch.randn(50)
    assert rel_err(expected.clone(), expected) == 0.0
    poisoned = expected.clone()
    poisoned[7] = float("nan")
    assert rel_err(poisoned, expected) == float("inf")
    assert not compare("c", "case", "fp32", "q", poisoned, expected, 1e-5).passed
    assert not compare("c", "case", "fp32", "q", expected * (1 + 1e-3), expected, 1e-5).passed
    with pytest.raises(ValueError, match="shapes differ"):
        rel_err(expected[:3], expected)


def test_low_precision_rows_are_held_to_the_reference_at_that_precision() -> None:
    expected = torch.randn(1000, dtype=torch.float64)
    reference_bf16 = expected.to(torch.bfloat16)
    twice_worse = expected + 5 * (reference_bf16.double() - expected)  # 5x the reference's own error
    row = compare_low_precision("c", "case", "bf16", "q", twice_worse, expected, reference_bf16)
    assert isinstance(row, Check) and row.tol >= 1e-2
    assert compare_low_precision("c", "case", "bf16", "q", reference_bf16, expected, reference_bf16).passed
    noisy = expected + 0.05 * expected.norm() / expected.numel() ** 0.5 * torch.randn_like(expected)
    assert not compare_low_precision("c", "case", "bf16", "q", noisy, expected, reference_bf16).passed


def test_a_part_out_of_time_unwinds_before_it_is_killed(tmp_path) -> None:
    """A timed-out part gets SIGTERM and runs its finally blocks (a JIT build releases its lock file) before exit."""
    from gpu_suite import run_capped

    marker = tmp_path / "released"
    script = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))\n"
        "try:\n    time.sleep(60)\n"
        f"finally:\n    open({str(marker)!r}, 'w').write('lock released')\n"
    )
    began = time.monotonic()
    assert run_capped([sys.executable, "-c", script], dict(os.environ), cap=2) is None
    assert marker.read_text() == "lock released" and time.monotonic() - began < 30
