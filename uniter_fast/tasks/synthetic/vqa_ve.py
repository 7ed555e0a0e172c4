"""Bundled VQA questions and visual-entailment hypotheses about the pool's scenes (builder-format annotations).

VQA asks about colours, counts, presence, spatial relations and the place; the question says what to look for and
only the image holds the answer (text alone gives at best the answer type's most common answer). Counts get VQA-like
soft scores: the true count 1.0, its neighbours 0.3 (annotators who miscounted).

VE hypotheses are true or false statements about the image (a coloured object, a count, a relation, the place).
Entailment: a true statement. Contradiction: a false one (a wrong colour, count, relation or place, or an absent
object). Neutral: a true statement with an added clause the image cannot settle ("and it is new"). Half of the
contradictions carry such a clause too, so the clause alone does not give the label (text-only accuracy is at most
about 2/3: entailment without a clause, neutral with one).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from uniter_fast.data.world import COLORS, NUMBERS, SCENES, plural
from uniter_fast.tasks.synthetic.pool import Scene, SceneObject, relation

RELATIONS = ("to the left of", "to the right of", "above", "below")
STATES = ("new", "old", "wet", "clean", "broken", "expensive")
ALL_OBJECTS = sorted({o for objs, _ in SCENES.values() for o in objs})
VQA_ANSWERS = sorted({*COLORS, *NUMBERS.values(), "yes", "no", *ALL_OBJECTS, *SCENES})
BUNDLED_PER_IMAGE = {"train": 3, "val": 2, "test": 2}  # questions / hypotheses per image of the bundled sets


def _pick(rng: np.random.Generator, items: list) -> Any:
    return items[int(rng.integers(len(items)))]


def _absent_class(rng: np.random.Generator, scene: Scene) -> str:
    present = set(scene.classes())
    candidates = sorted(set(SCENES[scene.scene][0]) - present) or sorted(set(ALL_OBJECTS) - present)
    return _pick(rng, candidates)


def _unique_relation(rng: np.random.Generator, scene: Scene) -> Optional[tuple[SceneObject, str, SceneObject]]:
    """(a, rel, b): b's class occurs once and every object in relation ``rel`` to b has a's class."""
    singles = [o for o in scene.objects if scene.count(o.cls) == 1]
    for b in rng.permutation(len(singles)):
        anchor = singles[int(b)]
        by_rel: dict[str, set[str]] = {}
        for o in scene.objects:
            if o.cls != anchor.cls:
                by_rel.setdefault(relation(o, anchor), set()).add(o.cls)
        options = sorted(r for r, classes in by_rel.items() if len(classes) == 1)
        if options:
            rel = _pick(rng, options)
            a = next(o for o in scene.objects if o.cls != anchor.cls and relation(o, anchor) == rel)
            return a, rel, anchor
    return None


def vqa_question(rng: np.random.Generator, scene: Scene) -> tuple[str, dict[str, float]]:
    """One (question, {answer: score}) about ``scene``."""
    kind = int(rng.integers(5))
    if kind == 1:
        counts = {c: scene.count(c) for c in scene.classes()}
        most = max(counts.values())
        cls = _pick(rng, sorted(c for c, n in counts.items() if n == most))
        answers = {NUMBERS[most]: 1.0, **{NUMBERS[n]: 0.3 for n in (most - 1, most + 1) if n in NUMBERS}}
        return f"how many {plural(cls)} are there ?", answers
    if kind == 2:
        present = rng.random() < 0.5
        cls = _pick(rng, scene.classes()) if present else _absent_class(rng, scene)
        return f"is there {'an' if cls[0] in 'aeiou' else 'a'} {cls} ?", {"yes" if present else "no": 1.0}
    if kind == 3:
        found = _unique_relation(rng, scene)
        if found is not None:
            a, rel, b = found
            return f"what is {rel} the {b.cls} ?", {a.cls: 1.0}
    if kind == 4:
        return "where is this ?", {scene.scene: 1.0}
    obj = _pick(rng, scene.objects)
    return f"what color is the {obj.cls} ?", {obj.color: 1.0}


def vqa_annotations(scenes: list[Scene], rng: np.random.Generator, per_image: int) -> list[dict[str, Any]]:
    """``per_image`` questions per scene, question_id = image_id * 10 + k."""
    out = []
    for scene in scenes:
        for k in range(per_image):
            question, answers = vqa_question(rng, scene)
            qid = scene.image_id * 10 + k
            out.append({"question_id": qid, "image": scene.det_name, "question": question, "answers": answers})
    return out


def _statement(rng: np.random.Generator, scene: Scene, true: bool) -> tuple[str, str]:
    """(statement without its final " .", subject pronoun) that is true / false of ``scene``."""
    kind = int(rng.integers(4))
    if kind == 3:
        place = scene.scene if true else _pick(rng, sorted(set(SCENES) - {scene.scene}))
        return f"this is {_a(place)} {place}", "it"
    if kind == 0:
        obj = _pick(rng, scene.objects)
        if true:
            return f"there is {_a(obj.color)} {obj.color} {obj.cls}", "it"
        if rng.random() < 0.5:
            color = _pick(rng, [c for c in COLORS if c != obj.color])
            return f"there is {_a(color)} {color} {obj.cls}", "it"
        color = _pick(rng, list(COLORS))
        return f"there is {_a(color)} {color} {_absent_class(rng, scene)}", "it"
    if kind == 1:
        cls = _pick(rng, scene.classes())
        count = scene.count(cls)
        if not true:
            count = _pick(rng, [n for n in NUMBERS if n != count])
        noun = cls if count == 1 else plural(cls)
        return f"there {'is' if count == 1 else 'are'} {NUMBERS[count]} {noun}", "it" if count == 1 else "they"
    a, b = (scene.objects[int(i)] for i in rng.permutation(len(scene.objects))[:2])
    rel = relation(a, b) if true else _pick(rng, [r for r in RELATIONS if r != relation(a, b)])
    return f"{_a(a.color)} {a.color} {a.cls} is {rel} {_a(b.color)} {b.color} {b.cls}", "it"


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def ve_annotations(scenes: list[Scene], rng: np.random.Generator, per_image: int) -> list[dict[str, Any]]:
    """``per_image`` hypotheses per scene, labels balanced over entailment / neutral / contradiction."""
    out = []
    for scene in scenes:
        for k in range(per_image):
            label = ("entailment", "neutral", "contradiction")[int(rng.integers(3))]
            text, pronoun = _statement(rng, scene, true=label != "contradiction")
            clause = label == "neutral" or (label == "contradiction" and rng.random() < 0.5)
            if clause:
                text += f" and {pronoun} {'is' if pronoun == 'it' else 'are'} {_pick(rng, list(STATES))}"
            out.append(
                {"id": f"{scene.image_id}#{k}", "image": scene.det_name, "hypothesis": text + " .", "label": label}
            )
    return out
