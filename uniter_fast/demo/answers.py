"""What one click of the browser demo computes (no gradio here): a task's answer to an uploaded photo and a text, and
the word-region alignment picture."""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional, Sequence

from PIL import Image

from uniter_fast.demo.render import draw_box, summary
from uniter_fast.inference import Pipeline


def lines_of(text: Optional[str], what: str, count: int) -> list[str]:
    """The non-empty lines of ``text``; a ValueError naming ``what`` unless there are ``count`` of them."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if len(lines) != count:
        raise ValueError(f"{what}: expected {count} lines, one each, got {len(lines)}")
    return lines


def ask(
    pipe: Pipeline,
    images: Sequence[Optional[Image.Image]],
    text: Optional[str],
    answers: Optional[str] = None,
    rationales: Optional[str] = None,
) -> tuple[str, Optional[Image.Image], dict[str, Any]]:
    """(the one-line answer, the photo with the referred box drawn for RE (else None), the full result) of ``pipe``'s
    task for ``text`` about ``images`` (``task.query_images`` of them; VCR: four answers and four rationales, one a
    line). A ValueError says what is missing."""
    task = pipe.task.name
    if len(images) != pipe.task.query_images or any(image is None for image in images):
        raise ValueError(f"upload {'both images' if pipe.task.query_images == 2 else 'an image'} first")
    if not text or not text.strip():
        raise ValueError("type a text first")
    extra = {}
    if task == "vcr":
        extra = {"answers": lines_of(answers, "answers", 4), "rationales": lines_of(rationales, "rationales", 4)}
    image: Any = images[0] if len(images) == 1 else list(images)
    result = pipe(image, text.strip(), **extra)
    boxed = draw_box(images[0], result["box"], f"box {result['index']}") if task == "re" else None
    return summary(task, result), boxed, result


def align(pipe: Pipeline, image: Optional[Image.Image], text: Optional[str]) -> tuple[Image.Image, str]:
    """(the WRA picture of ``text`` and ``image`` drawn by ``Pipeline.alignment`` with ``pipe``'s encoder, a line
    with its OT distance)."""
    if image is None:
        raise ValueError("upload an image first")
    if not text or not text.strip():
        raise ValueError("type a text first")
    with tempfile.TemporaryDirectory(prefix="uniter-demo-") as folder:
        out = pipe.alignment(image, text.strip(), os.path.join(folder, "alignment.png"))
        with Image.open(out["path"]) as picture:
            picture.load()
            return picture.copy(), f"OT distance {out['ot_distance']:.4f} over {len(out['words'])} tokens"
