"""Counting the host-device synchronisations of a piece of code, on a GPU and on a CPU-only machine.

A synchronisation stalls the host until the device has caught up (``.item()``, ``bool(t)``, ``t.tolist()``,
``nonzero``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``, ...); the fewer a training step
has, the further ahead of the GPU the host can queue work.

- On CUDA, :class:`SyncCounter` uses ``torch.cuda.set_sync_debug_mode("warn")``, which makes every synchronising
  CUDA call warn, and counts the warnings: the exact number.
- Without a GPU there is nothing to synchronise with, so the counter patches the tensor methods and functions that
  synchronise on a GPU and counts their calls on any tensor. This is an upper bound of the GPU count for code that
  keeps its tensors on the device (a call on a tensor that would stay on the host counts too).

:func:`uniter_fast.pretraining.syncs.count_step_syncs` counts one pretraining micro-step with it.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import torch

_SYNC_WARNING = "called a synchronizing CUDA operation"

# (owner, attribute): always a synchronisation on a GPU tensor
_ALWAYS = [
    (torch.Tensor, "item"),
    (torch.Tensor, "tolist"),
    (torch.Tensor, "__bool__"),
    (torch.Tensor, "__int__"),
    (torch.Tensor, "__float__"),
    (torch.Tensor, "__index__"),
    (torch.Tensor, "nonzero"),
    (torch.Tensor, "masked_select"),
    (torch.Tensor, "unique"),
    (torch.Tensor, "is_nonzero"),
    (torch.Tensor, "cpu"),
    (torch, "nonzero"),
    (torch, "argwhere"),
    (torch, "masked_select"),
    (torch, "unique"),
    (torch, "equal"),
    (torch, "is_nonzero"),
]


def _is_mask(index: Any) -> bool:
    """Whether an index (or a tuple/list of them) holds a bool/uint8 tensor: indexing with it calls nonzero."""
    if isinstance(index, torch.Tensor):
        return index.dtype in (torch.bool, torch.uint8)
    if isinstance(index, (tuple, list)):
        return any(_is_mask(part) for part in index)
    return False


def _syncs_when(name: str, args: tuple, kwargs: dict) -> bool:
    """For the operations that synchronise only with some arguments: whether this call does (``args[0]`` is the
    tensor operated on, ``args[1]`` the index or the repeats)."""
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_"):
        return _is_mask(args[1] if len(args) > 1 else kwargs.get("indices"))
    if name == "repeat_interleave":  # tensor repeats without output_size: the output length is read on the host
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if name == "where":  # torch.where(condition) is nonzero
        return len(args) + len(kwargs) == 1
    return True


_SOMETIMES = [
    (torch.Tensor, "__getitem__"),
    (torch.Tensor, "__setitem__"),
    (torch.Tensor, "index_put"),
    (torch.Tensor, "index_put_"),
    (torch.Tensor, "repeat_interleave"),
    (torch, "repeat_interleave"),
    (torch, "where"),
]


class SyncCounter:
    """Context manager counting host syncs in its body: ``with SyncCounter(device) as c: ...; c.count``.

    ``device``: CUDA counts what ``set_sync_debug_mode`` reports; any other device counts calls of the patched
    operations (see the module doc). ``c.calls`` lists the names counted (CPU) or the ``file:line`` that asked for
    each synchronising operation (CUDA).
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.calls: list[str] = []
        self._undo: list[Callable[[], None]] = []

    @property
    def count(self) -> int:
        """The syncs counted so far."""
        return len(self.calls)

    def _patch(self, owner: Any, name: str, conditional: bool) -> None:
        original = getattr(owner, name)
        label = f"{'Tensor' if owner is torch.Tensor else 'torch'}.{name}"

        @functools.wraps(original)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if not conditional or _syncs_when(name, args, kwargs):
                self.calls.append(label)
            return original(*args, **kwargs)

        setattr(owner, name, counted)
        self._undo.append(lambda: setattr(owner, name, original))

    def __enter__(self) -> SyncCounter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._warnings = warnings.catch_warnings(record=True)
            self._records = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            return self
        for owner, name in _ALWAYS:
            self._patch(owner, name, conditional=False)
        for owner, name in _SOMETIMES:
            self._patch(owner, name, conditional=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            self.calls += [
                f"{w.filename}:{w.lineno}" for w in self._records if _SYNC_WARNING in str(w.message)
            ]  # where: the Python line that asked for the synchronising operation
            return
        while self._undo:
            self._undo.pop()()


def count_syncs(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[int, list[str]]:
    """Run ``fn()`` once under a :class:`SyncCounter`; returns (count, what was counted)."""
    with SyncCounter(device) as counter:
        fn()
    return counter.count, counter.calls
