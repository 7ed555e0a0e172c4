"""Given boxes (ground-truth boxes of referring expressions and VCR): the ``boxes.json`` schema and its checks.

``boxes.json`` is one JSON object: key = an image's path relative to ``--images`` (the folder, or the folder of the
list file), extension included, ``/`` as separator; value = a non-empty list of boxes ``[x1, y1, x2, y2]`` in the
pixels of the image as decoded (EXIF rotation applied), with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``::

    {"a.jpg": [[10, 20, 200, 180], [0, 0, 639, 479]], "sub/b.png": [[5.5, 6, 40, 60.25]]}

Only the images it names are extracted; every error is a :class:`~uniter_fast.errors.DataError` naming the file,
the image and the box.
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np
import torch

from uniter_fast.errors import DataError, closest

EXIF_ORIENTATION = 0x0112
EXIF_SWAPS_SIDES = (5, 6, 7, 8)  # transposed or rotated by 90 degrees: the decoded image is W x H


def image_key(path: str, root: str) -> str:
    """The ``boxes.json`` key of the image ``path``: its path relative to ``root``, ``/``-separated."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return (os.path.basename(path) if rel.startswith("..") else rel).replace(os.sep, "/")


def read_boxes_file(path: str) -> dict[str, np.ndarray]:
    """``boxes.json`` as image key -> boxes [n, 4] float64 (order and values checked, not the image sizes)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DataError(f"boxes {path!r}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"boxes {path!r}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"boxes {path!r}: must be a non-empty JSON object {{image: [[x1, y1, x2, y2], ...]}}")
    return {key: check_boxes(value, f"boxes {path!r}: image {key!r}") for key, value in data.items()}


def check_boxes(value: object, where: str) -> np.ndarray:
    """``value`` as boxes [n >= 1, 4] float64 with finite x1 < x2, y1 < y2; DataError starting with ``where``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty list of [x1, y1, x2, y2] boxes, got {_short(value)}")
    for index, box in enumerate(value):
        numbers = isinstance(box, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)
        if not numbers or len(box) != 4:
            raise DataError(f"{where}: box {index} must be 4 numbers [x1, y1, x2, y2], got {_short(box)}")
        if not all(math.isfinite(v) for v in box):
            raise DataError(f"{where}: box {index} {box} is not finite")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise DataError(f"{where}: box {index} {box} is empty (needs x1 < x2 and y1 < y2)")
    return np.asarray(value, dtype=np.float64)


def check_inside(boxes: np.ndarray, height: int, width: int, where: str) -> None:
    """DataError unless every box [n, 4] lies in the image: 0 <= x1, y1 and x2 <= ``width``, y2 <= ``height``."""
    outside = (boxes[:, 0] < 0) | (boxes[:, 1] < 0) | (boxes[:, 2] > width) | (boxes[:, 3] > height)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise DataError(f"{where}: box {index} {boxes[index].tolist()} lies outside the {width} x {height} image")


def decoded_size(path: str) -> tuple[int, int]:
    """(H, W) of the image at ``path`` as :func:`~uniter_fast.extract.images.load_bgr` decodes it (EXIF rotation),
    read from the header only; raises OSError if unreadable."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(EXIF_ORIENTATION) in EXIF_SWAPS_SIDES:
            width, height = height, width
    return height, width


def boxes_for_images(boxes_file: str, paths: Sequence[str], source: str) -> tuple[list[int], list[np.ndarray]]:
    """Match ``boxes.json`` to the images ``paths`` of ``source`` (folder or list file) and check every box against
    its image's size. Returns (indices into ``paths`` of the images it names, their boxes [n, 4] float64).

    An image whose header cannot be read is left to the extraction (which reports it as a failed image)."""
    root = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    by_key = {image_key(p, root): i for i, p in enumerate(paths)}
    boxes = read_boxes_file(boxes_file)
    indices, chosen = [], []
    for key, image_boxes in boxes.items():
        if key not in by_key:
            hint = closest(key, by_key)
            raise DataError(f"boxes {boxes_file!r}: image {key!r} is not among the images of {source!r}{hint}")
        index = by_key[key]
        try:
            height, width = decoded_size(paths[index])
        except (OSError, ValueError):
            height = width = None
        if height is not None:
            check_inside(image_boxes, height, width, f"boxes {boxes_file!r}: image {key!r}")
        indices.append(index)
        chosen.append(image_boxes)
    order = sorted(range(len(indices)), key=indices.__getitem__)
    return [indices[i] for i in order], [chosen[i] for i in order]


def project_boxes(boxes: np.ndarray, scale: float, device: torch.device) -> torch.Tensor:
    """Original-pixel boxes [n, 4] float64 -> RoIs in the resized image [n, 4] float32: ``float32(boxes * scale)``
    computed in float64, as ``_project_im_rois`` + ``_get_rois_blob`` of py-faster-rcnn's ``test.py``."""
    return torch.from_numpy(np.asarray(boxes, dtype=np.float64) * scale).float().to(device)


def _short(value: object, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, np.ndarray) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
