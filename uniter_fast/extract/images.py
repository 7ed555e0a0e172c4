"""Finding and decoding images as the Caffe pipeline sees them: ``cv2.imread(path)`` = 8-bit BGR, EXIF-rotated.

Pillow decodes (it ships wheels everywhere; OpenCV is not needed): EXIF orientation applied (cv2 >= 3.1 does it for
IMREAD_COLOR), greyscale replicated to 3 channels, alpha dropped without compositing (as IMREAD_COLOR), CMYK and
palette images converted to RGB, 16-bit images scaled to 8 bits (>> 8, as IMREAD_COLOR's depth conversion).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from uniter_fast.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("image decoding needs Pillow: pip install 'uniter_fast[extract]'") from exc
    return Image, ImageOps


def load_bgr(path: str) -> np.ndarray:
    """The image at ``path`` as [H, W, 3] uint8 BGR after EXIF rotation; ``FileNotFoundError`` for a missing file, a
    ``DataError`` naming it for one that does not decode (not an image, truncated, empty)."""
    image_mod, _ = _pil()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} is not a file")
    try:
        with image_mod.open(path) as im:
            im.load()
            return pil_to_bgr(im, repr(path))
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's decoders raise these (UnidentifiedImageError: OSError)
        raise DataError(f"image {path!r} is not a readable image ({type(exc).__name__}: {exc})") from exc


def pil_to_bgr(im: Any, name: str = "image") -> np.ndarray:
    """A loaded PIL image as [H, W, 3] uint8 BGR after EXIF rotation, as :func:`load_bgr` decodes files (``name``
    names it in the error of an image without pixels)."""
    _, image_ops = _pil()
    im = image_ops.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = (np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    elif im.mode == "F":
        grey = np.asarray(im).clip(0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
    else:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ValueError(f"image {name} has no pixels (shape {rgb.shape})")
    return np.ascontiguousarray(rgb[:, :, ::-1])


def list_images(source: str) -> list[str]:
    """Image paths from a folder (recursive, sorted, by extension) or a list file (one path a line; relative paths
    are relative to the list file's folder; blank lines and ``#`` comments skipped)."""
    if os.path.isdir(source):
        found = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            found += [os.path.join(root, f) for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]
        return found
    if os.path.isfile(source):
        if source.lower().endswith(IMAGE_EXTENSIONS):
            raise ConfigError(f"images: expected a folder or a list file of image paths, got the image {source!r}")
        base = os.path.dirname(os.path.abspath(source))
        try:
            with open(source, encoding="utf-8") as f:
                lines = [line.strip() for line in f]
        except UnicodeDecodeError:
            raise DataError(f"images: {source!r} is not a text list of image paths (not UTF-8)") from None
        return [line if os.path.isabs(line) else os.path.join(base, line) for line in lines if line and line[0] != "#"]
    raise FileNotFoundError(f"images: {source!r} is neither a folder nor a list file")


def output_names(paths: Sequence[str], source: str) -> list[str]:
    """The npz name (without ``.npz``) of each image: its path relative to the folder (or the list file's folder)
    without the extension, with ``/`` replaced by ``__``. ValueError naming both files if two names collide."""
    root = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    names, seen = [], {}
    for path in paths:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
        if rel.startswith(".."):
            rel = os.path.basename(path)
        name = os.path.splitext(rel)[0].replace(os.sep, "__")
        if name in seen:
            raise ValueError(f"images: {seen[name]!r} and {path!r} would both be written to {name}.npz; rename one")
        seen[name] = path
        names.append(name)
    return names


class ImageFiles:
    """A map-style dataset of decoded images for ``torch.utils.data.DataLoader`` workers.

    ``dataset[i]`` -> ``(i, image [H, W, 3] uint8 BGR or None, error message or None)``: an unreadable file is
    reported, not raised, so that one bad image does not stop a run.
    """

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple:
        try:
            return index, load_bgr(self.paths[index]), None
        except Exception as exc:  # any decoding failure is reported with the file name
            return index, None, f"{type(exc).__name__}: {exc}"


def collate_images(items: list) -> list:
    """DataLoader collate: keep the list of (index, image, error) as is (images differ in size)."""
    return items
