"""Bundled NLVR2 statements: a sentence about two images (left, right), true or false.

Each sentence is paired with two image pairs, drawn so that each pair's label is true with probability 1/2; the
identifiers follow NLVR2's ``{split}-{sentence}-{pair}-{k}``, so consistency (a sentence counts when all its pairs
are right) groups them as the official script does. The sentence names a class and says where it is (left, right,
both, exactly one image) or compares counts; only the images decide the label.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from uniter_fast.data.world import plural
from uniter_fast.tasks.synthetic.pool import Scene

TEMPLATES: dict[str, tuple[str, Callable[[int, int], bool]]] = {
    "left": ("there is {a} {cls} in the left image .", lambda left, right: left > 0),
    "right": ("there is {a} {cls} in the right image .", lambda left, right: right > 0),
    "both": ("both images contain {a} {cls} .", lambda left, right: left > 0 and right > 0),
    "one": ("exactly one image contains {a} {cls} .", lambda left, right: (left > 0) != (right > 0)),
    "more": ("the left image has more {plural} than the right image .", lambda left, right: left > right),
}
PAIRS_PER_SENTENCE = 2
MAX_TRIES = 200


def _draw_pair(
    rng: np.random.Generator, scenes: list[Scene], cls: str, rule: Callable[[int, int], bool], want: bool
) -> tuple[Scene, Scene]:
    """Two different scenes whose counts of ``cls`` make ``rule`` equal ``want`` (images with ``cls`` drawn half
    the time, so the rare true cases are reachable)."""
    having = [s for s in scenes if s.count(cls) > 0]
    for _ in range(MAX_TRIES):
        left, right = (
            having[int(rng.integers(len(having)))] if rng.random() < 0.5 else scenes[int(rng.integers(len(scenes)))]
            for _ in range(2)
        )
        if left.image_id != right.image_id and rule(left.count(cls), right.count(cls)) == want:
            return left, right
    raise RuntimeError(f"could not draw an image pair for {cls!r} with label {want}")


def nlvr2_annotations(scenes: list[Scene], rng: np.random.Generator, sentences: int, split: str) -> list[dict]:
    """``sentences`` statements x ``PAIRS_PER_SENTENCE`` pairs each (builder-format annotations)."""
    classes = sorted({c for s in scenes for c in s.classes()})
    names = sorted(TEMPLATES)
    out: list[dict[str, Any]] = []
    for s in range(sentences):
        name = names[int(rng.integers(len(names)))]
        template, rule = TEMPLATES[name]
        cls = classes[int(rng.integers(len(classes)))]
        sentence = template.format(a="an" if cls[0] in "aeiou" else "a", cls=cls, plural=plural(cls))
        for pair in range(PAIRS_PER_SENTENCE):
            label = bool(rng.random() < 0.5)
            left, right = _draw_pair(rng, scenes, cls, rule, label)
            out.append(
                {
                    "identifier": f"{split}-{s}-{pair}-0",
                    "images": [left.det_name, right.det_name],
                    "sentence": sentence,
                    "label": label,
                }
            )
    return out
