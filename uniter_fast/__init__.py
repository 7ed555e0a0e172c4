"""uniter_fast: a fast, checkpoint-compatible UNITER.

``from uniter_fast import Model`` gives the UNITER encoder (``UniterModel``) with the original forward signature and
parameter names, so original checkpoints load as they are.
"""

from uniter_fast.config import UniterConfig
from uniter_fast.model import Model, UniterModel

__all__ = ["Model", "UniterConfig", "UniterModel"]
__version__ = "0.1.0"
