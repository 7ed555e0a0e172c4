"""Test setup: Triton kernels run in the interpreter on CPU-only machines.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a function, so it must be set before any kernel module is
imported: here, at the very top of the first file pytest loads.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from a fixed torch seed so failures reproduce."""
    torch.manual_seed(0)
