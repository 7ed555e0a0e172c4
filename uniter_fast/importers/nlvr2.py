"""NLVR2 (lil-lab/nlvr, ``nlvr2/data/{train,dev,test1}.json``): JSON lines ``{"identifier", "sentence", "label"
("True"/"False"), "directory", "left_url", "right_url", "writer", "synset", "query", ...}`` -> NLVR2 annotations.

As the original's ``prepro.py``: the id is ``identifier`` (``<split>-<set>-<pair>-<sentence>``), the target 1 when
``label`` is "True" and 0 when "False", and the two images (left, right) the ``--image_key`` pattern over ``pair``
(the identifier without its last -N), ``side`` (0, 1) and ``stem`` (``<pair>-img<side>``, the image file's name), by
default ``nlvr2_<pair>-img0.npz`` and ``...-img1.npz``. ``--missing_images`` drops the examples whose images are
listed, as the original's ``--missing_imgs`` (``missing_nlvr2_imgs.json``, image keys whose features were
corrupted).
"""

from __future__ import annotations

import logging
from typing import Any

from uniter_fast.data import task_records
from uniter_fast.data.task_db import read_jsonl
from uniter_fast.data.task_records import field
from uniter_fast.errors import DataError
from uniter_fast.importers import Importer
from uniter_fast.importers.common import image_key, json_list

LABELS = {"True": 1, "False": 0}

logger = logging.getLogger(__name__)


def _missing(path: Any) -> set[str]:
    """The image keys of a ``--missing_images`` JSON list (none without one)."""
    if not path:
        return set()
    names = json_list(path, "--missing_images file", "image keys")
    if not all(isinstance(n, str) for n in names):
        raise DataError(f"--missing_images file {path!r}: expected a JSON list of image keys (strings)")
    return {task_records.image_key(name) for name in names}


def read(paths: list[str], options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """NLVR2 annotations ``{"identifier", "images": [left, right], "sentence", "label"}`` of every line."""
    missing = _missing(options.get("missing_images"))
    out, dropped = [], 0
    for path in paths:
        for where, raw in read_jsonl(path):
            identifier = field(raw, "identifier", str, where)
            if "-" not in identifier:
                raise DataError(
                    f"{where}: field 'identifier' must be <split>-<set>-<pair>-<sentence>, got {identifier!r}"
                )
            label = field(raw, "label", str, where)
            if label not in LABELS:
                raise DataError(f"{where}: field 'label' must be 'True' or 'False', got {label!r}")
            pair = identifier.rsplit("-", 1)[0]
            sides = [{"pair": pair, "side": s, "stem": f"{pair}-img{s}"} for s in (0, 1)]
            images = [image_key(options["image_key"], fields, where) for fields in sides]
            if missing.intersection(images):
                dropped += 1
                continue
            record = {"identifier": identifier, "images": images, "sentence": field(raw, "sentence", str, where)}
            out.append((where, {**record, "label": LABELS[label]}))
    if dropped:
        logger.warning("nlvr2: %d examples dropped: their images are in --missing_images", dropped)
    return out


IMPORTER = Importer(
    name="nlvr2",
    task="nlvr2",
    description="NLVR2 JSON lines (identifier, sentence, label); the image pair from the identifier",
    files="<split>.json [...] (lil-lab/nlvr's nlvr2/data files, one JSON object a line)",
    options={
        "image_key": (
            str,
            "nlvr2_{pair}-img{side}",
            "img_db key pattern; fields pair (the identifier without its last -N), side (0 left, 1 right), stem "
            "(<pair>-img<side>, the image file's name)",
        ),
        "missing_images": (
            str,
            None,
            "JSON list of image keys (.npz optional) whose examples are left out (the original's "
            "missing_nlvr2_imgs.json)",
        ),
    },
    read=read,
)
