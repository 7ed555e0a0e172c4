"""Argument checks shared by every loss backend: shapes, dtypes and label ranges, with errors naming the argument."""

from __future__ import annotations

from typing import Optional

import torch


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise ``TypeError`` unless ``tensor`` is a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``tensor.shape == expected``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {list(expected)}, got {list(tensor.shape)}")


def check_hidden(hidden: torch.Tensor) -> tuple[int, int]:
    """Check ``hidden`` is a float [M, H] tensor; returns (M, H)."""
    check_float("hidden", hidden)
    if hidden.dim() != 2:
        raise ValueError(f"hidden must have shape [M, H], got {list(hidden.shape)}")
    return hidden.shape[0], hidden.shape[1]


def check_projection(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, transposed: bool) -> int:
    """Check the head's final projection; ``weight`` is [C, H] (or [H, C] when ``transposed``), ``bias`` [C].

    Returns the number of output columns C.
    """
    _, h = check_hidden(hidden)
    check_float("weight", weight)
    check_float("bias", bias)
    if weight.dim() != 2 or weight.shape[0 if transposed else 1] != h:
        expected = "[H, C]" if transposed else "[C, H]"
        raise ValueError(f"weight must have shape {expected} with H={h}, got {list(weight.shape)}")
    c = weight.shape[1 if transposed else 0]
    check_shape("bias", bias, (c,))
    check_device("weight", weight, hidden.device)
    check_device("bias", bias, hidden.device)
    return c


def check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``tensor`` lives on ``device``."""
    if tensor.device != device:
        raise ValueError(f"{name} must be on hidden's device {device}, got {tensor.device}")


def check_labels(
    labels: torch.Tensor, rows: int, classes: int, device: torch.device, check_values: bool = True
) -> None:
    """Check ``labels`` is int64 [rows] on ``device`` and, with ``check_values``, every value in [0, classes) (one
    host sync on GPU)."""
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.int64:
        got = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 tensor, got {got}")
    check_shape("labels", labels, (rows,))
    check_device("labels", labels, device)
    if check_values and rows > 0:
        low, high = torch.stack([labels.min(), labels.max()]).tolist()
        if low < 0 or high >= classes:
            raise ValueError(f"labels must lie in [0, {classes}), got values in [{low}, {high}]")


def check_targets(name: str, targets: torch.Tensor, rows: int, classes: int, device: torch.device) -> None:
    """Check float ``targets`` [rows, classes] on ``device`` (regression targets or soft labels)."""
    check_float(name, targets)
    check_shape(name, targets, (rows, classes))
    check_device(name, targets, device)


def check_weights(weights: Optional[torch.Tensor], rows: int, device: torch.device) -> None:
    """Check optional row ``weights`` (float32 [rows] on ``device``: 1 for a real row, 0 for a padding row)."""
    if weights is None:
        return
    if not isinstance(weights, torch.Tensor) or weights.dtype != torch.float32:
        got = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise TypeError(f"weights must be a float32 tensor, got {got}")
    check_shape("weights", weights, (rows,))
    check_device("weights", weights, device)
