"""Bundled NLVR2 statements: a sentence about two images (left, right), true or false.

Each sentence is paired with two image pairs, drawn so that each pair's label is true with probability 1/2; the
identifiers follow NLVR2's ``{split}-{sentence}-{pair}-{k}``, so consistency (a sentence counts when all its pairs
are right) groups them as the official script does. A third of the sentences name a class (in the left / right /
both / exactly one image, more of it on the left), a third a place (what the left / right / both images show), a
third compare the two images (the same place, more objects on the left); only the images decide the label.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from uniter_fast.data.world import plural
from uniter_fast.tasks.synthetic.pool import Scene

Rule = Callable[[Scene, Scene, str], bool]
TEMPLATES: dict[str, dict[str, tuple[str, Rule]]] = {
    "class": {
        "left": ("there is {a} {subject} in the left image .", lambda left, right, c: left.count(c) > 0),
        "right": ("there is {a} {subject} in the right image .", lambda left, right, c: right.count(c) > 0),
        "both": ("both images contain {a} {subject} .", lambda left, right, c: min(left.count(c), right.count(c)) > 0),
        "one": (
            "exactly one image contains {a} {subject} .",
            lambda left, right, c: (left.count(c) > 0) != (right.count(c) > 0),
        ),
        "more": (
            "the left image has more {plural} than the right image .",
            lambda left, right, c: left.count(c) > right.count(c),
        ),
    },
    "place": {
        "left": ("the left image shows {a} {subject} .", lambda left, right, p: left.scene == p),
        "right": ("the right image shows {a} {subject} .", lambda left, right, p: right.scene == p),
        "both": ("both images show {a} {subject} .", lambda left, right, p: left.scene == right.scene == p),
    },
    "pair": {
        "same": ("the two images show the same place .", lambda left, right, _: left.scene == right.scene),
        "more": (
            "the left image has more objects than the right image .",
            lambda left, right, _: len(left.objects) > len(right.objects),
        ),
    },
}
PAIRS_PER_SENTENCE = 2
BUNDLED_SENTENCES = {"train": 1500, "val": 150, "test": 150}  # sentences per split of the bundled set
MAX_TRIES = 200


def _relevant(kind: str, subject: str) -> Callable[[Scene], bool]:
    """The images a statement's true cases need (drawn half the time): those with the class / of the place."""
    if kind == "class":
        return lambda scene: scene.count(subject) > 0
    if kind == "place":
        return lambda scene: scene.scene == subject
    return lambda scene: True


def _draw_pair(
    rng: np.random.Generator, scenes: list[Scene], relevant: list[Scene], rule: Rule, subject: str, want: bool
) -> Optional[tuple[Scene, Scene]]:
    """Two different scenes for which ``rule`` equals ``want`` (each drawn from ``relevant`` half the time, so the
    rare true cases are reachable); None when none is found."""
    for _ in range(MAX_TRIES):
        left, right = (
            relevant[int(rng.integers(len(relevant)))] if rng.random() < 0.5 else scenes[int(rng.integers(len(scenes)))]
            for _ in range(2)
        )
        if left.image_id != right.image_id and rule(left, right, subject) == want:
            return left, right
    return None


def nlvr2_annotations(scenes: list[Scene], rng: np.random.Generator, sentences: int, split: str) -> list[dict]:
    """``sentences`` statements x ``PAIRS_PER_SENTENCE`` pairs each (builder-format annotations)."""
    subjects = {
        "class": sorted({c for s in scenes for c in s.classes()}),
        "place": sorted({s.scene for s in scenes}),
        "pair": [""],
    }
    out: list[dict[str, Any]] = []
    for s in range(sentences):
        records = None
        while records is None:  # redraw a statement whose wanted labels no image pair gives
            records = _sentence(rng, scenes, subjects, f"{split}-{s}")
        out += records
    return out


def _sentence(
    rng: np.random.Generator, scenes: list[Scene], subjects: dict[str, list[str]], prefix: str
) -> Optional[list[dict[str, Any]]]:
    """One statement with ``PAIRS_PER_SENTENCE`` labelled image pairs, or None when a pair cannot be drawn."""
    kind = sorted(TEMPLATES)[int(rng.integers(len(TEMPLATES)))]
    names = sorted(TEMPLATES[kind])
    template, rule = TEMPLATES[kind][names[int(rng.integers(len(names)))]]
    subject = subjects[kind][int(rng.integers(len(subjects[kind])))]
    relevant = [scene for scene in scenes if _relevant(kind, subject)(scene)]
    a = "an" if subject[:1] in ("a", "e", "i", "o", "u") else "a"
    sentence = template.format(a=a, subject=subject, plural=plural(subject) if subject else "")
    records = []
    for pair in range(PAIRS_PER_SENTENCE):
        label = bool(rng.random() < 0.5)
        drawn = _draw_pair(rng, scenes, relevant, rule, subject, label)
        if drawn is None:
            return None
        records.append(
            {
                "identifier": f"{prefix}-{pair}-0",
                "images": [drawn[0].det_name, drawn[1].det_name],
                "sentence": sentence,
                "label": label,
            }
        )
    return records
