"""Bundled NLVR2 statements: a sentence about two images (left, right), true or false.

Each sentence is paired with two image pairs, drawn so that each pair's label is true with probability 1/2; the
identifiers follow NLVR2's ``{split}-{sentence}-{pair}-{k}``, so consistency (a sentence counts when all its pairs
are right) groups them as the official script does. The sentence names a class and says where it is (left, right,
both, exactly one image) or compares counts, or it names a place (what the left / right / both images show); only
the images decide the label.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from uniter_fast.data.world import plural
from uniter_fast.tasks.synthetic.pool import Scene

Rule = Callable[[int, int], bool]
CLASS_TEMPLATES: dict[str, tuple[str, Rule]] = {
    "left": ("there is {a} {cls} in the left image .", lambda left, right: left > 0),
    "right": ("there is {a} {cls} in the right image .", lambda left, right: right > 0),
    "both": ("both images contain {a} {cls} .", lambda left, right: left > 0 and right > 0),
    "one": ("exactly one image contains {a} {cls} .", lambda left, right: (left > 0) != (right > 0)),
    "more": ("the left image has more {plural} than the right image .", lambda left, right: left > right),
}
PLACE_TEMPLATES: dict[str, tuple[str, Rule]] = {
    "left place": ("the left image shows {a} {cls} .", lambda left, right: left > 0),
    "right place": ("the right image shows {a} {cls} .", lambda left, right: right > 0),
    "both places": ("both images show {a} {cls} .", lambda left, right: left > 0 and right > 0),
}
PAIRS_PER_SENTENCE = 2
MAX_TRIES = 200


def _draw_pair(
    rng: np.random.Generator, scenes: list[Scene], value: Callable[[Scene], int], rule: Rule, want: bool
) -> Optional[tuple[Scene, Scene]]:
    """Two different scenes whose ``value`` (a class count, or 1 for the named place) make ``rule`` equal ``want``
    (scenes with a positive value drawn half the time, so the rare true cases are reachable); None when none is
    found."""
    having = [s for s in scenes if value(s) > 0]
    for _ in range(MAX_TRIES):
        left, right = (
            having[int(rng.integers(len(having)))] if rng.random() < 0.5 else scenes[int(rng.integers(len(scenes)))]
            for _ in range(2)
        )
        if left.image_id != right.image_id and rule(value(left), value(right)) == want:
            return left, right
    return None


def _value(place: bool, name: str) -> Callable[[Scene], int]:
    """What a template's rule compares per image: 1 when the scene is the place ``name``, or the count of class
    ``name``."""
    if place:
        return lambda scene: int(scene.scene == name)
    return lambda scene: scene.count(name)


def nlvr2_annotations(scenes: list[Scene], rng: np.random.Generator, sentences: int, split: str) -> list[dict]:
    """``sentences`` statements x ``PAIRS_PER_SENTENCE`` pairs each (builder-format annotations); a third of the
    statements are about places, the rest about objects."""
    classes = sorted({c for s in scenes for c in s.classes()})
    places = sorted({s.scene for s in scenes})
    out: list[dict[str, Any]] = []
    for s in range(sentences):
        records = None
        while records is None:  # redraw a statement whose wanted labels no image pair gives
            records = _sentence(rng, scenes, classes, places, f"{split}-{s}")
        out += records
    return out


def _sentence(
    rng: np.random.Generator, scenes: list[Scene], classes: list[str], places: list[str], prefix: str
) -> Optional[list[dict[str, Any]]]:
    """One statement with ``PAIRS_PER_SENTENCE`` labelled image pairs, or None when a pair cannot be drawn."""
    place = bool(rng.random() < 1 / 3)
    templates = PLACE_TEMPLATES if place else CLASS_TEMPLATES
    names = sorted(templates)
    template, rule = templates[names[int(rng.integers(len(names)))]]
    subjects = places if place else classes
    subject = subjects[int(rng.integers(len(subjects)))]
    value = _value(place, subject)
    sentence = template.format(a="an" if subject[0] in "aeiou" else "a", cls=subject, plural=plural(subject))
    records = []
    for pair in range(PAIRS_PER_SENTENCE):
        label = bool(rng.random() < 0.5)
        drawn = _draw_pair(rng, scenes, value, rule, label)
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
