"""Shared pieces of the extractor tests: a small detector configuration, its random weights (cached), photos.

``TINY``: one bottleneck per stage (full widths, so features are 2048-d and every key has its real shape), images
resized to a 128-pixel shorter side, 16 RoIs: the whole pipeline in about a second per image on a CPU.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from uniter_fast.extract import random_state_dict
from uniter_fast.extract.config import TINY  # noqa: F401  (re-exported for the tests)

TINY_CLI = ["--test-scale", "128", "--max-size", "214", "--pre-nms", "600", "--proposals", "16"]
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png")


@functools.lru_cache(maxsize=4)
def _tiny_weights(layout: str, seed: int) -> dict:
    return random_state_dict(layout, TINY, seed)


def tiny_weights(layout: str = "milvlg", seed: int = 0) -> dict:
    """A fresh copy of the cached random TINY weights in ``layout`` (as the file would hold them)."""
    cached = _tiny_weights(layout, seed)
    if "model" in cached:
        return {"model": {k: v.clone() for k, v in cached["model"].items()}}
    return {k: v.clone() for k, v in cached.items()}


def synthetic_image(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random colour image [H, W, 3] uint8 (blobs and edges, not white noise)."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, max(2, height // 24), max(2, width // 24))))
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return smooth[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


def photo_paths() -> list[str]:
    """The photos bundled with matplotlib (grace_hopper.jpg) and scikit-image (if installed)."""
    import matplotlib.cbook

    paths = [str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    try:
        import skimage.data
    except ImportError:
        return paths
    folder = os.path.dirname(skimage.data.__file__)
    return paths + [os.path.join(folder, name) for name in SKIMAGE_PHOTOS if os.path.isfile(os.path.join(folder, name))]
