"""GPU correctness (``pytest -m gpu``): every fast path against its reference path on a CUDA device, at UNITER shapes.

The checks are those of ``bench/gpu_suite.py``'s correctness part (bench/checks.py, written once for both): the
Triton IPOT kernel with poisoned outputs, every fast OT backend, the fused losses, the packed encoder under each varlen
backend, and one training step of every pretraining task. Skipped cleanly where there is no CUDA device.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from checks import CHECKS  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


@pytest.mark.parametrize("name", list(CHECKS))
def test_fast_path_matches_reference_on_gpu(name: str) -> None:
    rows = CHECKS[name](torch.device("cuda"), False)
    compared = [r for r in rows if r.quantity != "skipped"]
    assert compared, f"{name}: nothing was compared ({[r.note for r in rows]})"
    failed = [
        f"{r.case} {r.dtype} {r.quantity}: {r.error:.3g} > {r.tol:.3g} {r.note}" for r in compared if not r.passed
    ]
    assert not failed, "\n".join(failed)
