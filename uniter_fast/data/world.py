"""A small synthetic visual world: scenes with objects of known classes, colours and box geometry.

Each image is a scene holding a few coloured objects (one class may appear up to 3 times), stuff regions (sky,
floor, ...) and low-confidence clutter proposals. Every region gets a detector-like record: a 2048-d feature drawn
around its class (and colour) prototype plus a scene context term (RoI features see their surroundings), a
normalised box, a confidence and a 1601-way soft label concentrated on its class. Captions come from a small grammar
that names the scene, the objects, their colours, counts and spatial relations, so text and regions are tied
together and MLM, MRC-kl and ITM are learnable.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uniter_fast.config import IMG_DIM, IMG_LABEL_DIM

COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "orange"]
SCENES = {
    "kitchen": (["cup", "plate", "bowl", "knife", "bottle", "cat", "chair", "apple"], ["wall", "floor", "counter"]),
    "street": (["car", "bus", "bicycle", "man", "dog", "sign", "truck", "bag"], ["road", "building", "sky"]),
    "park": (["dog", "man", "woman", "tree", "bench", "ball", "bird", "kite"], ["grass", "sky", "path"]),
    "beach": (["umbrella", "boat", "woman", "surfboard", "bird", "ball", "towel", "chair"], ["sand", "water", "sky"]),
    "room": (["sofa", "cat", "lamp", "table", "chair", "book", "clock", "vase"], ["wall", "floor", "window"]),
}
PLURALS = {"man": "men", "woman": "women", "bus": "buses", "knife": "knives", "bench": "benches", "sky": "skies"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
ON_SCENES = {"street", "beach"}
N_CLUTTER = 64
CLASS_WEIGHT = 1.5  # weight of the class prototype in a region's feature (colour 0.7, scene 1.0, noise 0.5)
SHAPE_SPREAD = 0.03  # spread (log scale / band fraction) of a box around its class's typical shape
# the typical shapes: object classes take distinct cells of a grid of log aspects (w/h) x sizes (sqrt of the area
# fraction); stuff classes distinct cells of vertical band centres x band heights. Distinct cells make a region's
# class readable from its box alone (a classifier on the 7-d box gets ~0.89 of the soft labels' argmax), as in real
# detections, where a bus is wide, a man tall and the sky on top.
OBJECT_ASPECTS, OBJECT_SIZES = np.linspace(-1.0, 1.0, 7), np.linspace(0.12, 0.42, 6)
STUFF_BANDS, STUFF_HEIGHTS = np.linspace(0.15, 0.85, 5), (0.1, 0.18, 0.28)


def plural(word: str) -> str:
    """English plural of a class name of this world."""
    return PLURALS.get(word, word + "s")


@dataclasses.dataclass
class Region:
    """One proposal: class name (or None for clutter), colour index (-1 if none), box in pixels, confidence."""

    cls: str | None
    color: int
    box: tuple[float, float, float, float]
    conf: float
    clutter: int = -1


@dataclasses.dataclass
class SynthImage:
    """One image's arrays (fp32, sorted by confidence) and its captions."""

    features: np.ndarray
    norm_bb: np.ndarray
    conf: np.ndarray
    soft_labels: np.ndarray
    captions: list[str]


class World:
    """Class prototypes, label ids and the generators, all fixed by ``seed``."""

    def __init__(self, seed: int) -> None:
        rng = np.random.default_rng([seed, 0])
        objects = sorted({o for objs, _ in SCENES.values() for o in objs})
        stuff = sorted({s for _, ss in SCENES.values() for s in ss})
        self.classes = objects + stuff
        self.objects = set(objects)
        labels = rng.choice(np.arange(1, IMG_LABEL_DIM), size=len(self.classes) * 3 + N_CLUTTER, replace=False)
        n = len(self.classes)
        self.label = {c: int(labels[i]) for i, c in enumerate(self.classes)}
        self.confusers = {c: labels[n + 2 * i : n + 2 * i + 2].astype(np.int64) for i, c in enumerate(self.classes)}
        self.clutter_labels = labels[3 * n :].astype(np.int64)
        self.class_proto = {c: rng.standard_normal(IMG_DIM).astype(np.float32) for c in self.classes}
        self.color_proto = rng.standard_normal((len(COLORS), IMG_DIM)).astype(np.float32)
        self.clutter_proto = rng.standard_normal((N_CLUTTER, IMG_DIM)).astype(np.float32)
        self.scene_proto = rng.standard_normal((len(SCENES), IMG_DIM)).astype(np.float32)
        # typical box of each class, one grid cell each: objects (log aspect w/h, size), stuff (band centre, height)
        cells = rng.permutation([(a, s) for a in OBJECT_ASPECTS for s in OBJECT_SIZES])
        self.shape = {c: (float(a), float(s)) for c, (a, s) in zip(objects, cells)}
        bands = rng.permutation([(b, h) for b in STUFF_BANDS for h in STUFF_HEIGHTS])
        self.band = {c: (float(b), float(h)) for c, (b, h) in zip(stuff, bands)}

    def class_names(self) -> dict[str, str]:
        """Soft-label column (as a string, JSON-ready) -> name: the classes, their confusers ("<class>?") and the
        clutter labels ("clutter")."""
        names = {str(label): c for c, label in self.label.items()}
        names.update({str(int(label)): f"{c}?" for c, labels in self.confusers.items() for label in labels})
        names.update({str(int(label)): "clutter" for label in self.clutter_labels})
        return names

    def _layout(self, rng: np.random.Generator) -> tuple[str, list[Region], list[tuple[str, int, tuple]], tuple]:
        scene = list(SCENES)[rng.integers(len(SCENES))]
        objs, stuff = SCENES[scene]
        w_img, h_img = float(rng.integers(400, 641)), float(rng.integers(400, 641))
        regions: list[Region] = []
        instances: list[tuple[str, int, tuple]] = []
        classes = rng.choice(objs, size=int(rng.integers(2, 5)), replace=False)
        for k, cls in enumerate(classes):
            copies = int(rng.integers(1, 4)) if k == 0 else 1
            color = int(rng.integers(len(COLORS)))
            log_aspect, size = self.shape[str(cls)]
            for _ in range(copies):
                aspect = np.exp(log_aspect + rng.normal(0, SHAPE_SPREAD))
                side = size * np.exp(rng.normal(0, SHAPE_SPREAD))
                bw, bh = side * np.sqrt(aspect) * w_img, side / np.sqrt(aspect) * h_img
                x1, y1 = rng.uniform(0, w_img - bw), rng.uniform(0, h_img - bh)
                box = (x1, y1, x1 + bw, y1 + bh)
                instances.append((str(cls), color, box))
                regions.append(Region(str(cls), color, box, float(rng.uniform(0.6, 0.97))))
                for _ in range(int(rng.integers(2, 4))):
                    jit = rng.normal(0, 0.05, 4) * np.array([bw, bh, bw, bh])
                    jb = _clip_box(np.array(box) + jit, w_img, h_img)
                    regions.append(Region(str(cls), color, jb, float(rng.uniform(0.25, 0.6))))
        for cls in rng.choice(stuff, size=2, replace=False):
            for _ in range(int(rng.integers(1, 4))):
                band, height = self.band[str(cls)]
                bw, bh = rng.uniform(0.5, 1.0) * w_img, height * np.exp(rng.normal(0, SHAPE_SPREAD)) * h_img
                centre = np.clip(band + rng.normal(0, SHAPE_SPREAD), bh / h_img / 2, 1 - bh / h_img / 2)
                x1, y1 = rng.uniform(0, w_img - bw), centre * h_img - bh / 2
                regions.append(Region(str(cls), -1, (x1, y1, x1 + bw, y1 + bh), float(rng.uniform(0.1, 0.5))))
        n_total = int(np.clip(len(regions) + rng.integers(2, 12), 10, 36))
        while len(regions) < n_total:
            bw, bh = rng.uniform(0.05, 0.3) * w_img, rng.uniform(0.05, 0.3) * h_img
            x1, y1 = rng.uniform(0, w_img - bw), rng.uniform(0, h_img - bh)
            clutter = int(rng.integers(N_CLUTTER))
            regions.append(Region(None, -1, (x1, y1, x1 + bw, y1 + bh), float(rng.uniform(0.02, 0.2)), clutter))
        regions.sort(key=lambda r: -r.conf)
        return scene, regions[:36], instances, (w_img, h_img)

    def captions(self, layout_rng: np.random.Generator, n_captions: int) -> list[str]:
        """Only the captions of the image :meth:`image` draws from the same ``layout_rng`` state (cheap)."""
        scene, _, instances, _ = self._layout(layout_rng)
        return _captions(layout_rng, scene, instances, n_captions)

    def image(self, layout_rng: np.random.Generator, rng: np.random.Generator, n_captions: int) -> SynthImage:
        """Draw one image with ``n_captions`` different captions: layout and captions from ``layout_rng``, features
        and soft labels from ``rng``."""
        scene, regions, instances, (w_img, h_img) = self._layout(layout_rng)
        captions = _captions(layout_rng, scene, instances, n_captions)
        n = len(regions)
        base = np.stack([self.clutter_proto[r.clutter] if r.cls is None else self.class_proto[r.cls] for r in regions])
        no_color = np.zeros(IMG_DIM, np.float32)
        color = np.stack([self.color_proto[r.color] if r.color >= 0 else no_color for r in regions])
        noise = rng.standard_normal((n, IMG_DIM), dtype=np.float32)
        scene_ctx = 1.0 * self.scene_proto[list(SCENES).index(scene)]
        features = np.maximum(CLASS_WEIGHT * base + 0.7 * color + scene_ctx + 0.5 * noise, 0.0)
        boxes = np.array([r.box for r in regions], dtype=np.float64) / np.array([w_img, h_img, w_img, h_img])
        norm_bb = np.concatenate([boxes, boxes[:, 2:3] - boxes[:, 0:1], boxes[:, 3:4] - boxes[:, 1:2]], axis=1)
        conf = np.array([r.conf for r in regions], dtype=np.float32)
        soft = self._soft_labels(rng, regions, conf)
        return SynthImage(features, norm_bb.astype(np.float32), conf, soft, captions)

    def _soft_labels(self, rng: np.random.Generator, regions: list[Region], conf: np.ndarray) -> np.ndarray:
        n = len(regions)
        rest = 1.0 - conf
        soft = np.zeros((n, IMG_LABEL_DIM), dtype=np.float32)
        soft[:] = (0.1 * rest / IMG_LABEL_DIM)[:, None]
        for i, r in enumerate(regions):
            if r.cls is None:
                soft[i, 0] += 0.7 * rest[i]
                soft[i, self.clutter_labels[r.clutter]] += conf[i]
                soft[i, rng.choice(self.clutter_labels, 2)] += 0.1 * rest[i]
            else:
                soft[i, 0] += (0.1 if r.cls in self.objects else 0.3) * rest[i]
                soft[i, self.label[r.cls]] += conf[i]
                soft[i, self.confusers[r.cls]] += 0.3 * rest[i]
        return soft / soft.sum(axis=1, keepdims=True)


def _clip_box(box: np.ndarray, w_img: float, h_img: float) -> tuple[float, float, float, float]:
    x1, y1 = np.clip(box[0], 0, w_img - 2), np.clip(box[1], 0, h_img - 2)
    x2, y2 = np.clip(box[2], x1 + 1, w_img), np.clip(box[3], y1 + 1, h_img)
    return (float(x1), float(y1), float(x2), float(y2))


def _relation(a: tuple, b: tuple) -> str:
    dx = (a[0] + a[2] - b[0] - b[2]) / 2
    dy = (a[1] + a[3] - b[1] - b[3]) / 2
    if abs(dx) >= abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def _a(word: str) -> str:
    """'a' or 'an' before ``word``."""
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _captions(rng: np.random.Generator, scene: str, instances: list[tuple[str, int, tuple]], k: int) -> list[str]:
    prep = "on" if scene in ON_SCENES else "in"
    counts: dict[str, int] = {}
    for cls, _, _ in instances:
        counts[cls] = counts.get(cls, 0) + 1
    out: list[str] = []
    for template in rng.permutation(4)[:k]:
        c1, k1, b1 = instances[rng.integers(len(instances))]
        others = [inst for inst in instances if inst[0] != c1]
        c2, k2, b2 = others[rng.integers(len(others))]
        if template == 0:
            out.append(f"{prep} the {scene} {_a(COLORS[k1])} {c1} is {_relation(b1, b2)} {_a(COLORS[k2])} {c2} .")
        elif template == 1:
            out.append(f"{_a(COLORS[k1])} {c1} and {_a(COLORS[k2])} {c2} {prep} the {scene} .")
        elif template == 2:
            n1 = counts[c1]
            noun = c1 if n1 == 1 else plural(c1)
            out.append(f"{NUMBERS[n1]} {COLORS[k1]} {noun} near the {c2} {prep} this {scene} .")
        else:
            out.append(f"there is {_a(c2)} {_relation(b2, b1)} the {COLORS[k1]} {c1} {prep} this {scene} .")
    return out
