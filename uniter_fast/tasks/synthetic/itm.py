"""Bundled image-text retrieval sets: five captions per pool image, in the original itm txt_db layout.

Captions follow the pretraining corpus's templates (a coloured object in relation to another, two objects in the
place, a count near another object, "there is ..."), plus a fifth that names one object and the place, so a model
pretrained on the corpus reads them. Each caption is drawn from the scene's facts (``pool/scenes.json``), so several
images may fit a caption equally well (as in COCO, where captions are generic). The txt_dbs (``txt2img.json`` /
``img2txts.json`` beside the records, caption ids ``<image_id>_<k>``) pair with ``pool/img_det``:

    itm/txt_train (1200 images, 6000 captions)   itm/txt_val (150, 750)   itm/txt_test (150, 750)
"""

from __future__ import annotations

import os

import numpy as np

from uniter_fast.data.corpus import DEFAULT_SEED
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.data.world import NUMBERS, ON_SCENES, plural
from uniter_fast.errors import DataError
from uniter_fast.files import build_directory_once, read_json
from uniter_fast.tasks.synthetic.pool import Scene, SceneObject, relation

CAPTIONS_PER_IMAGE = 5
ITM_DIR = "itm"
ITM_SPLITS = ("train", "val", "test")


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _pair(rng: np.random.Generator, scene: Scene) -> tuple[SceneObject, SceneObject]:
    """Two objects of different classes (the second may share the class when the scene has one class only)."""
    first = scene.objects[int(rng.integers(len(scene.objects)))]
    others = [o for o in scene.objects if o.cls != first.cls] or [o for o in scene.objects if o is not first]
    return first, others[int(rng.integers(len(others)))] if others else first


def scene_captions(rng: np.random.Generator, scene: Scene, count: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """``count`` captions of ``scene`` (templates cycle when count > 5)."""
    prep = "on" if scene.scene in ON_SCENES else "in"
    place = scene.scene
    out = []
    for template in [int(t) for t in rng.permutation(5)] * (count // 5 + 1):
        if len(out) == count:
            break
        a, b = _pair(rng, scene)
        if template == 0:
            text = f"{prep} the {place} {_a(a.color)} {a.cls} is {relation(a, b)} {_a(b.color)} {b.cls} ."
        elif template == 1:
            text = f"{_a(a.color)} {a.cls} and {_a(b.color)} {b.cls} {prep} the {place} ."
        elif template == 2:
            n = scene.count(a.cls)
            text = f"{NUMBERS[n]} {a.color} {a.cls if n == 1 else plural(a.cls)} near the {b.cls} {prep} this {place} ."
        elif template == 3:
            text = f"there is {_a(b.cls)} {relation(b, a)} the {a.color} {a.cls} {prep} this {place} ."
        else:
            text = f"{_a(a.color)} {a.cls} {prep} the {place} ."
        out.append(text)
    return out


def write_itm_txt_db(captions: list[tuple[str, str, str]], toker: WordPiece, out: str, meta_name: str) -> int:
    """Write an itm txt_db ``out`` from (caption id, image key, caption) triples; returns the number of captions."""
    if not captions:
        raise ValueError(f"no captions for the itm txt_db {out!r}")
    with TxtDbWriter(out, toker.meta(meta_name)) as writer:
        for id_, image, text in captions:
            ids = toker.encode(text)
            if not ids:
                raise DataError(f"caption {id_!r} has no wordpieces: {text!r}")
            if not writer.add(id_, ids, image):
                raise DataError(f"duplicate caption id {id_!r}")
    return len(captions)


def build_itm_sets(task_root: str, seed: int = DEFAULT_SEED) -> str:
    """Write ``itm/txt_{train,val,test}`` under ``task_root`` (the bundled task sets, whose pool and vocab it
    uses) unless present; safe under concurrent first calls (temp dir, then rename). Returns the itm directory."""

    def build(out: str) -> None:
        scenes = [Scene.from_json(s) for s in read_json(os.path.join(task_root, "pool", "scenes.json"))]
        toker = WordPiece(os.path.join(task_root, "vocab.txt"))
        for n, split in enumerate(ITM_SPLITS):
            rng = np.random.default_rng([seed, 300, n])
            captions = [
                (f"{s.image_id}_{k}", s.det_name, text)
                for s in scenes
                if s.split == split
                for k, text in enumerate(scene_captions(rng, s))
            ]
            write_itm_txt_db(captions, toker, os.path.join(out, f"txt_{split}"), f"synth-itm-wordpiece-{seed}")

    return build_directory_once(os.path.join(task_root, ITM_DIR), build)
