"""Triton kernels of uniter_fast, installed as ``uniter_fast.kernels``.

This folder lives at the repository's top level (``kernels/``) and is mapped into the package by ``setup.py``;
import it as ``uniter_fast.kernels``, never as ``kernels``. Importing a kernel module needs ``triton``; callers go
through the dispatchers in ``uniter_fast`` (``uniter_fast.ot``, the loss module, the encoder) which fall back to the
reference PyTorch path when Triton or a GPU is missing.
"""
