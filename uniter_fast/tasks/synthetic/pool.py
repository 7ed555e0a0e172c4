"""The image pool of the bundled task sets: scenes of the pretraining corpus's synthetic world, written as a
detected-box img_db and a GT-box img_db, with the scene facts that the task generators read.

The world is :class:`uniter_fast.data.world.World` with the corpus seed (same class, colour and scene prototypes as
the pretraining corpus, so a model pretrained on it transfers), drawn from other generator streams (new images).
``World.image`` draws the regions and their features; the layout it used is drawn again from the same generator
state (``World._layout``) to know each region's class, colour and box. The objects (instances) are the GT boxes:
their rows of the detected features, ordered left to right, form the GT-box db.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from tqdm import tqdm

from uniter_fast.data.img_db import ImgDbWriter
from uniter_fast.data.re_db import det_image_name, gt_image_name
from uniter_fast.data.world import COLORS, World
from uniter_fast.files import write_json_atomic

SPLITS = {"train": 0, "val": 1, "test": 2}
IMAGE_ID_BASE = {"train": 0, "val": 100000, "test": 200000}


@dataclasses.dataclass
class SceneObject:
    """One GT object: class name, colour name, pixel box (x1, y1, x2, y2)."""

    cls: str
    color: str
    box: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        """Box centre (x, y) in pixels."""
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclasses.dataclass
class Scene:
    """One pool image: its id and img_db keys, size, scene name and GT objects (left to right)."""

    image_id: int
    split: str
    scene: str
    width: float
    height: float
    objects: list[SceneObject]

    @property
    def det_name(self) -> str:
        """Key in the detected-box img_db."""
        return det_image_name(self.image_id)

    @property
    def gt_name(self) -> str:
        """Key in the GT-box img_db."""
        return gt_image_name(self.image_id)

    def count(self, cls: str) -> int:
        """Number of objects of class ``cls``."""
        return sum(o.cls == cls for o in self.objects)

    def classes(self) -> list[str]:
        """Object classes present, in first-seen order."""
        return list(dict.fromkeys(o.cls for o in self.objects))

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (see :meth:`from_json`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Scene:
        """Inverse of :meth:`to_json`."""
        objects = [SceneObject(o["cls"], o["color"], tuple(o["box"])) for o in raw["objects"]]
        return cls(**{**raw, "objects": objects})


def relation(a: SceneObject, b: SceneObject) -> str:
    """Where ``a`` is relative to ``b``: "to the left of", "to the right of", "above" or "below" (the dominant axis
    of the centre offset, as the corpus captions)."""
    (ax, ay), (bx, by) = a.center, b.center
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


def draw_scene(world: World, seed: int, split: str, index: int) -> tuple[Scene, Any, np.ndarray]:
    """Scene ``index`` of ``split``: (facts, the world's SynthImage, GT rows of the detected features)."""
    layout_seed = [seed, 100, SPLITS[split], index]
    image = world.image(np.random.default_rng(layout_seed), np.random.default_rng([seed, 101, SPLITS[split], index]), 0)
    scene, regions, instances, (width, height) = world._layout(np.random.default_rng(layout_seed))
    if len(regions) != image.features.shape[0]:
        raise RuntimeError("the world's layout and image draws disagree; the pool generator needs updating")
    boxes = [r.box for r in regions]
    rows = [boxes.index(box) for _, _, box in instances]  # each object's exact-box proposal
    order = sorted(range(len(instances)), key=lambda i: (instances[i][2][0] + instances[i][2][2], i))
    objects = [SceneObject(instances[i][0], COLORS[instances[i][1]], tuple(instances[i][2])) for i in order]
    facts = Scene(IMAGE_ID_BASE[split] + index, split, scene, float(width), float(height), objects)
    return facts, image, np.array([rows[i] for i in order])


def build_pool(out_dir: str, seed: int, counts: dict[str, int]) -> list[Scene]:
    """Write ``img_det/`` (every proposal; conf_th 0.2, 10-100 boxes, as the corpus) and ``img_gt/`` (the objects'
    rows; read with conf_th -1) plus ``scenes.json``; returns the scenes of every split."""
    world = World(seed)
    scenes = []
    with (
        ImgDbWriter(os.path.join(out_dir, "img_det")) as det,
        ImgDbWriter(os.path.join(out_dir, "img_gt"), conf_th=-1, num_bb=100) as gt,
    ):
        for split, count in counts.items():
            for i in tqdm(range(count), desc=f"task images {split}"):
                facts, im, rows = draw_scene(world, seed, split, i)
                det.add(facts.det_name, im.features, im.norm_bb, im.conf, im.soft_labels)
                gt.add(facts.gt_name, im.features[rows], im.norm_bb[rows], im.conf[rows], im.soft_labels[rows])
                scenes.append(facts)
    write_json_atomic(os.path.join(out_dir, "scenes.json"), [s.to_json() for s in scenes])
    return scenes
