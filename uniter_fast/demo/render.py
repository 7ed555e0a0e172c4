"""What the browser demo shows of a task's result (no gradio here): a one-line answer per task and the RE box drawn
on the photo (Pillow)."""

from __future__ import annotations

from typing import Any

from PIL import Image, ImageDraw, ImageFont

BOX_COLOUR = (255, 40, 40)


def summary(task: str, result: dict[str, Any]) -> str:
    """One line saying the answer of ``result`` (a ``Pipeline`` result of ``task``; fields: docs/own-images.md)."""
    if task == "vqa":
        return "answer: " + ", ".join(f"{a['answer']} ({a['score']:.3f})" for a in result["answers"])
    if task == "ve":
        return f"{result['label']} (p = {result['probs'][result['label']]:.3f})"
    if task == "nlvr2":
        return f"{'true' if result['label'] else 'false'} (p(true) = {result['prob_true']:.3f})"
    if task == "itm":
        return f"ITM score {result['score']:.3f} (logit {result['logit']:.3f})"
    if task == "re":
        x, y, w, h = result["box"]
        return (
            f"box {result['index']} of {len(result['probs'])} (p = {result['prob']:.3f}): "
            f"x {x:.0f}, y {y:.0f}, w {w:.0f}, h {h:.0f}"
        )
    if task == "vcr":
        return (
            f"answer {result['answer'] + 1} (p = {result['answer_probs'][result['answer']]:.3f}), "
            f"rationale {result['rationale'] + 1} (p = {result['rationale_probs'][result['rationale']]:.3f})"
        )
    raise ValueError(f"task: no summary for {task!r}")


def draw_box(image: Image.Image, box: list[float], label: str) -> Image.Image:
    """A copy of ``image`` (RGB) with ``box`` [x, y, w, h] (pixels) outlined and ``label`` written above it."""
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    x, y, w, h = box
    width = max(2, round(min(out.size) / 150))
    draw.rectangle([x, y, x + w, y + h], outline=BOX_COLOUR, width=width)
    font = ImageFont.load_default(size=max(12, min(out.size) // 25))
    origin = (x, max(0.0, y - draw.textbbox((0, 0), label, font=font)[3] - 2 * width))  # above the box, in the image
    left, top, right, bottom = draw.textbbox(origin, label, font=font)
    draw.rectangle([left - width, top - width, right + width, bottom + width], fill=BOX_COLOUR)
    draw.text(origin, label, fill=(255, 255, 255), font=font)
    return out
