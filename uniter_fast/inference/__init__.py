"""From photos and text to a task's answer, in memory: :class:`Pipeline` (``pipeline``), the image and query
inputs it takes (``inputs``). ``python -m uniter_fast.predict`` is its command line; docs/own-images.md."""

from uniter_fast.inference.pipeline import Pipeline

__all__ = ["Pipeline"]
