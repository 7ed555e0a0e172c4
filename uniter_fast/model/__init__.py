"""The UNITER encoder (``UniterModel`` / ``Model``); its checkpoint I/O is :mod:`uniter_fast.checkpoint`."""

from uniter_fast.model.uniter import Model, UniterModel

__all__ = ["Model", "UniterModel"]
