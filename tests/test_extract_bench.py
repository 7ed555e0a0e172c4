"""The GPU suite's entry point, ``bench/extract_bench.py:gpu_check``, run on the CPU with the small configuration so
that it cannot rot between GPU sessions (slow: it runs the CPU reference, the fast path and the reference path)."""

from __future__ import annotations

import os
import sys

import pytest

from tests.extract_helpers import TINY, tiny_weights

pytestmark = pytest.mark.slow
BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def test_gpu_check_runs_on_cpu() -> None:
    sys.path.insert(0, BENCH)
    try:
        from extract_bench import gpu_check
    finally:
        sys.path.remove(BENCH)
    result = gpu_check("cpu", batch_sizes=(1, 2), dtypes=("fp32",), num_images=2, warmup=0, repeats=1,
                       weights=tiny_weights(), config=TINY, matmul_size=256, chunk=8)  # fmt: skip
    paths = [(r["path"], r["batch"]) for r in result["rows"]]
    assert paths == [("fast", 1), ("fast", 2), ("reference", 2)]
    assert all(r["images_per_s"] > 0 for r in result["rows"])
    same = result["agreement"]["cpu_vs_device_fp32"]
    assert same["roi_match"] > 0.9 and same["feature_cosine_min"] > 0.999
    assert result["meta"]["flops_per_image"]["roi_head"] > result["meta"]["flops_per_image"]["trunk_rpn"]
