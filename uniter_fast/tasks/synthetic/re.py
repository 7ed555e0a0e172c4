"""Bundled referring expressions: phrases that pick exactly one object of a pool scene, in COCO-refer files.

An object of a class seen once is named by colour and class ("the red cup") or by its relation to another single
object ("the cup to the left of the dog"); copies of one class (same colour) are told apart by position ("the cup on
the left", "the rightmost cup"). Only expressions that fit exactly one object are kept; each ref has two sentences.
Boxes are the objects' pixel boxes ([x, y, w, h]); ``images.json`` lists ``ann_ids`` in the GT-box db's row order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from uniter_fast.data.world import SCENES
from uniter_fast.tasks.synthetic.pool import Scene, SceneObject, relation

CATEGORIES = sorted({o for objs, _ in SCENES.values() for o in objs})
REFS_PER_IMAGE = 2
SENTENCES_PER_REF = 2


def expressions(scene: Scene, index: int) -> list[str]:
    """Every expression of this generator that fits object ``index`` of ``scene`` and no other object."""
    obj = scene.objects[index]
    same = [i for i, o in enumerate(scene.objects) if o.cls == obj.cls]
    out = []
    if len(same) == 1:
        out += [f"the {obj.color} {obj.cls}", f"the {obj.cls}"]
        for other in scene.objects:
            if other.cls != obj.cls and scene.count(other.cls) == 1:
                out.append(f"the {obj.cls} {relation(obj, other)} the {other.cls}")
        return out
    xs = sorted(same, key=lambda i: scene.objects[i].center[0])
    ys = sorted(same, key=lambda i: scene.objects[i].center[1])
    if index == xs[0]:
        out += [f"the {obj.cls} on the left", f"the leftmost {obj.cls}"]
    if index == xs[-1]:
        out += [f"the {obj.cls} on the right", f"the rightmost {obj.cls}"]
    if index == ys[0]:
        out.append(f"the top {obj.cls}")
    if index == ys[-1]:
        out.append(f"the bottom {obj.cls}")
    return out


def _bbox(obj: SceneObject) -> list[float]:
    x1, y1, x2, y2 = obj.box
    return [x1, y1, x2 - x1, y2 - y1]


def re_annotations(scenes: list[Scene], rng: np.random.Generator, split: str) -> dict[str, list[dict[str, Any]]]:
    """The four COCO-refer lists (refs with their ``sentences``, annotations, categories, images) of ``scenes``."""
    side: dict[str, list[dict[str, Any]]] = {"refs": [], "annotations": [], "images": []}
    side["categories"] = [{"id": i + 1, "name": c, "supercategory": "object"} for i, c in enumerate(CATEGORIES)]
    cat_id = {c["name"]: c["id"] for c in side["categories"]}
    for scene in scenes:
        ann_ids = [scene.image_id * 10 + k for k in range(len(scene.objects))]
        side["images"].append(
            {
                "id": scene.image_id,
                "file_name": scene.det_name,
                "ann_ids": ann_ids,
                "height": scene.height,
                "width": scene.width,
            }
        )
        for ann_id, obj in zip(ann_ids, scene.objects):
            x, y, w, h = _bbox(obj)
            side["annotations"].append(
                {
                    "id": ann_id,
                    "area": w * h,
                    "bbox": [x, y, w, h],
                    "image_id": scene.image_id,
                    "category_id": cat_id[obj.cls],
                }
            )
        referable = [i for i in range(len(scene.objects)) if expressions(scene, i)]
        for k in rng.permutation(len(referable))[:REFS_PER_IMAGE]:
            index = referable[int(k)]
            phrases = expressions(scene, index)
            picked = [phrases[int(j)] for j in rng.permutation(len(phrases))[:SENTENCES_PER_REF]]
            ref_id = ann_ids[index]
            sentences = [{"sent_id": ref_id * 10 + j, "sent": p} for j, p in enumerate(picked)]
            side["refs"].append(
                {
                    "ref_id": ref_id,
                    "sent_ids": [s["sent_id"] for s in sentences],
                    "ann_id": ann_ids[index],
                    "image_id": scene.image_id,
                    "split": split,
                    "sentences": sentences,
                }
            )
    return side
