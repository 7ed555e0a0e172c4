"""uniter_fast: a fast, checkpoint-compatible UNITER.

``from uniter_fast import Model`` gives the UNITER encoder (``UniterModel``) with the original forward signature and
parameter names, so original checkpoints load as they are. ``from uniter_fast import Pipeline`` gives the
photo-and-text-to-answer pipeline of the fine-tuned tasks (``uniter_fast.inference``; imported on first use, as it
brings the detector and the tasks).
"""

from typing import Any

from uniter_fast.config import UniterConfig
from uniter_fast.model import Model, UniterModel

__all__ = ["Model", "Pipeline", "UniterConfig", "UniterModel"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``Pipeline``, imported on first use."""
    if name == "Pipeline":
        from uniter_fast.inference import Pipeline

        return Pipeline
    raise AttributeError(f"module 'uniter_fast' has no attribute {name!r}")
