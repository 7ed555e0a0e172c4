"""The UNITER encoder (``UniterModel`` / ``Model``) and its checkpoint I/O."""

from uniter_fast.model.checkpoint import export_original_checkpoint
from uniter_fast.model.uniter import Model, UniterModel

__all__ = ["Model", "UniterModel", "export_original_checkpoint"]
