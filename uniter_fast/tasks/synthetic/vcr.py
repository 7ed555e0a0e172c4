"""Bundled VCR questions: multiple choice with a rationale, in VCR's token-list format (object tags as lists).

Object k of a scene (left to right, the GT-box rows) is tagged ``[k]``. Q->A asks the colour or the class of a
tagged object (four distinct options). QA->R then picks, among four statements, the one that is true of the image
and agrees with the answer: the right colour (or class) and the true spatial relation to another tagged object.
One distractor has the right colour but a false relation, the two others a wrong colour, so neither the answer
text nor the image alone settles it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from uniter_fast.data.world import COLORS
from uniter_fast.tasks.synthetic.pool import Scene, relation
from uniter_fast.tasks.synthetic.re import CATEGORIES
from uniter_fast.tasks.synthetic.vqa_ve import RELATIONS

QUESTIONS_PER_IMAGE = 2


def _options(rng: np.random.Generator, right: str, pool: list[str]) -> tuple[list[str], int]:
    """Four distinct options including ``right`` at a random position; returns (options, its index)."""
    others = [p for p in pool if p != right]
    picked = [others[int(i)] for i in rng.permutation(len(others))[:3]]
    label = int(rng.integers(4))
    return picked[:label] + [right] + picked[label:], label


def vcr_question(rng: np.random.Generator, scene: Scene, qid: str) -> dict[str, Any]:
    """One VCR annotation about ``scene``."""
    k, j = (int(i) for i in rng.permutation(len(scene.objects))[:2])
    obj, other = scene.objects[k], scene.objects[j]
    ask_color = bool(rng.random() < 0.5)
    if ask_color:
        question = ["what", "color", "is", [k], "?"]
        answers, a_label = _options(rng, obj.color, list(COLORS))
        answer_choices = [[[k], "is", a] for a in answers]
    else:
        question = ["what", "is", [k], "?"]
        answers, a_label = _options(rng, obj.cls, CATEGORIES)
        answer_choices = [[[k], "is", "a", a] for a in answers]
    true_rel = relation(obj, other)
    wrong_rels = [r for r in RELATIONS if r != true_rel]
    wrong = [a for i, a in enumerate(answers) if i != a_label]
    statements = [(answers[a_label], true_rel), (answers[a_label], wrong_rels[int(rng.integers(3))])]
    statements += [
        (wrong[int(i)], true_rel if n == 0 else wrong_rels[int(rng.integers(3))])
        for n, i in enumerate(rng.permutation(3)[:2])
    ]
    order = rng.permutation(4)
    rationales = [statements[int(i)] for i in order]
    r_label = int(np.flatnonzero(order == 0)[0])
    rationale_choices = [["the", value, "one", [k], "is", *rel.split(), [j]] for value, rel in rationales]
    return {
        "annot_id": qid,
        "image": scene.det_name,
        "gt_image": scene.gt_name,
        "question": question,
        "answer_choices": answer_choices,
        "rationale_choices": rationale_choices,
        "answer_label": a_label,
        "rationale_label": r_label,
        "objects": [o.cls for o in scene.objects],
    }


def vcr_annotations(scenes: list[Scene], rng: np.random.Generator, split: str) -> list[dict[str, Any]]:
    """``QUESTIONS_PER_IMAGE`` questions per scene; annotation ids ``{split}-{n}`` as VCR's."""
    return [
        vcr_question(rng, scene, f"{split}-{scene.image_id * 10 + n}")
        for scene in scenes
        for n in range(QUESTIONS_PER_IMAGE)
    ]
