"""What :class:`~uniter_fast.inference.Pipeline` takes: images (a path, a PIL image or an RGB array, decoded as
``python -m uniter_fast.extract`` decodes files) and queries (one, or a batch as lists), turned into the task's
:class:`~uniter_fast.tasks.spec.Query` records over image keys."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import numpy as np

from uniter_fast.extract.given_boxes import check_boxes
from uniter_fast.extract.images import load_bgr, pil_to_bgr
from uniter_fast.tasks.spec import Query, Task


def to_bgr(image: Any) -> np.ndarray:
    """[H, W, 3] uint8 BGR (what the detector takes) of ``image``: a file path (decoded by ``load_bgr``, as the
    extractor decodes files), a PIL image, or a numpy uint8 array [H, W] (grey), [H, W, 3] (RGB, as PIL, imageio
    and scikit-image give them) or [H, W, 4] (RGBA; alpha dropped)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image: {path!r} is not a file")
        return load_bgr(path)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ValueError(
                f"image: a numpy image must be uint8 [H, W], [H, W, 3] (RGB) or [H, W, 4], got {image.dtype} "
                f"{list(image.shape)}"
            )
        rgb = np.repeat(image[:, :, None], 3, axis=2) if image.ndim == 2 else image[:, :, :3]
        if rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError(f"image: the numpy image has no pixels (shape {list(image.shape)})")
        return np.ascontiguousarray(rgb[:, :, ::-1])
    if hasattr(image, "convert") and hasattr(image, "mode"):  # a PIL image
        return pil_to_bgr(image)
    raise TypeError(f"image: expected a path, a PIL image or a numpy array, got {type(image).__name__}")


@dataclasses.dataclass
class QueryBatch:
    """Queries over image keys: ``queries`` (``Query.images`` are keys ``image<i>.npz``), ``images`` (the distinct
    inputs, key i = ``images[i]``), ``single`` (the caller gave one query: one result, not a list), ``boxes``: per
    distinct image its given boxes [n, 4] float64 (x1, y1, x2, y2 pixels) or None (detected boxes)."""

    queries: list[Query]
    images: list[Any]
    single: bool
    boxes: list[Optional[np.ndarray]] = dataclasses.field(default_factory=list)


def image_key(index: int) -> str:
    """The img_db key of the ``index``-th distinct image of a call."""
    return f"image{index}.npz"


def _is_one_image(value: Any) -> bool:
    """Whether ``value`` is one image (not a list or tuple of them)."""
    return not isinstance(value, (list, tuple))


def _per_query(value: Any, count: int, one: Any, name: str) -> list[Any]:
    """``value`` as a list of ``count`` per-query values; ``one(value)`` says whether it is a single one (then
    repeated for every query)."""
    if one(value):
        return [value] * count
    if len(value) != count:
        raise ValueError(f"{name}: expected one, or one per text ({count}), got {len(value)}")
    return list(value)


def as_lists(value: Any) -> Any:
    """``value`` with numpy arrays and tuples turned into (nested) lists of Python numbers, for ``check_boxes``."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [as_lists(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def _is_box_list(value: Any) -> bool:
    """Whether ``value`` is one image's boxes (a list of [x1, y1, x2, y2]), not a list of such (or None) per text."""
    first = value[0] if isinstance(value, list) and value else []
    return not (first is None or (isinstance(first, list) and first and isinstance(first[0], list)))


def make_queries(
    task: Task,
    image: Any,
    text: Any,
    answers: Optional[Sequence[Any]] = None,
    rationales: Optional[Sequence[Any]] = None,
    boxes: Optional[Any] = None,
) -> QueryBatch:
    """The queries of one pipeline call. ``text``: a string (one query) or a list of strings (a batch); ``image``:
    one image, or one per text (NLVR2: a (left, right) pair, or one pair per text); one image (pair) with several
    texts is asked every text. VCR: ``answers`` / ``rationales`` four strings each (or a list of such per text).
    ``boxes``: the image's regions instead of the detector's, [[x1, y1, x2, y2], ...] in original pixels (one list
    for every text, or one list (or None: detected boxes) per text; one-image tasks), checked by
    ``given_boxes.check_boxes``."""
    single = isinstance(text, str)
    texts = [text] if single else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"text: expected a string or a non-empty list of strings, got {text!r}")
    per = task.query_images
    one = (
        _is_one_image
        if per == 1
        else (lambda v: isinstance(v, (list, tuple)) and len(v) == per and all(map(_is_one_image, v)))
    )
    if per > 1 and not (one(image) or (isinstance(image, (list, tuple)) and all(one(v) for v in image))):
        raise ValueError(
            f"image: task {task.name} takes {per} images per text (a list of {per}, or one such list per text)"
        )
    per_text = _per_query(image, len(texts), one, "image")
    choices = []
    for name, value in (("answers", answers), ("rationales", rationales)):
        if value is None:
            choices.append([[] for _ in texts])
            continue
        four = lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)  # noqa: E731
        choices.append([list(v) for v in _per_query(value, len(texts), four, name)])
    given: list[Optional[np.ndarray]] = [None] * len(texts)
    if boxes is not None:
        if per > 1:
            raise ValueError(f"boxes: given boxes are for one-image tasks; task {task.name} takes {per} per text")
        per_box = _per_query(as_lists(boxes), len(texts), _is_box_list, "boxes")
        given = [None if b is None else check_boxes(b, "boxes") for b in per_box]
    keys: dict[Any, int] = {}
    distinct: list[Any] = []
    distinct_boxes: list[Optional[np.ndarray]] = []
    queries = []
    for i, (t, images, a, r, b) in enumerate(zip(texts, per_text, *choices, given)):
        names = []
        for im in [images] if per == 1 else images:
            ident = (
                os.fspath(im) if isinstance(im, (str, os.PathLike)) else id(im),
                None if b is None else tuple(b.ravel().tolist()),
            )
            if ident not in keys:
                keys[ident] = len(distinct)
                distinct.append(im)
                distinct_boxes.append(b)
            names.append(image_key(keys[ident]))
        queries.append(Query(str(i), names, t, a, r))
    return QueryBatch(queries, distinct, single, distinct_boxes)
