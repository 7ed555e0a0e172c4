"""Batch equality for the fast-vs-reference collate tests: every tensor the same dtype, shape and values."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def assert_same(fast: Any, ref: Any, where: str = "batch", same_keys: bool = True) -> None:
    """``fast`` equals ``ref``: tensors ``torch.equal`` with the same dtype and shape, numpy arrays equal, dicts key
    by key (``same_keys``: the same keys; otherwise ``fast``'s keys are a subset, e.g. one layout of both), lists
    item by item, other values ``==`` with the same type."""
    if isinstance(fast, dict):
        assert isinstance(ref, dict), (where, type(ref))
        if same_keys:
            assert set(fast) == set(ref), (where, sorted(set(fast) ^ set(ref)))
        for key, value in fast.items():
            assert key in ref, f"{where}.{key} is not in the reference batch"
            assert_same(value, ref[key], f"{where}.{key}", same_keys)
    elif isinstance(fast, torch.Tensor):
        assert isinstance(ref, torch.Tensor), (where, type(ref))
        assert fast.dtype == ref.dtype and fast.shape == ref.shape, (where, fast.dtype, ref.dtype, fast.shape)
        assert torch.equal(fast, ref), where
    elif isinstance(fast, np.ndarray):
        assert isinstance(ref, np.ndarray) and fast.dtype == ref.dtype and np.array_equal(fast, ref), where
    elif isinstance(fast, (list, tuple)):
        assert type(fast) is type(ref) and len(fast) == len(ref), (where, fast, ref)
        for i, (a, b) in enumerate(zip(fast, ref)):
            assert_same(a, b, f"{where}[{i}]", same_keys)
    else:
        assert fast == ref and type(fast) is type(ref), (where, fast, ref)
