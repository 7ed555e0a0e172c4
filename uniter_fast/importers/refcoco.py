"""``--from refcoco``: RefCOCO, RefCOCO+ and RefCOCOg as published by lichengunc/refer (``refs(unc).p``,
``refs(umd).p`` or ``refs(google).p`` plus ``instances.json``, from https://bvisionweb1.cs.unc.edu/licheng/referit/data/)
into the RE task's side tables (``uniter_fast.data.re_db``), as the original UNITER's ``prepro.py --task re``.

* ``refs(<split_by>).p``: a pickle of a list of refs ``{"ref_id", "ann_id", "image_id", "split", "category_id",
  "file_name", "sent_ids", "sentences": [{"sent_id", "sent", "raw", "tokens"}]}``. It is read by a restricted
  unpickler that builds only Python's plain data types (lists, dicts, strings, numbers, sets): a pickle naming
  any other class or function is refused before anything of it runs.
* ``instances.json``: COCO's ``{"images": [{"id", "file_name", "height", "width"}], "annotations": [{"id",
  "image_id", "bbox", "area", "category_id", "iscrowd"}], "categories": [{"id", "name", "supercategory"}]}``.
* optionally ``iid_to_ann_ids.json`` (MAttNet's ``tools/map_iid_to_ann_ids.py``: ``{"iid_to_ann_ids": {image
  id: [ann ids in the row order of the image's GT-box features]}}``), which the original's prepro takes.

As the original: the refs whose ``split`` equals ``--split``; the images of those refs with their ``ann_ids``; every
annotation of those images (``id``, ``area``, ``bbox``, ``image_id``, ``category_id``, ``iscrowd``); every category;
one txt_db record per sentence, its text ``sent``. ``ann_ids`` (the GT-box feature rows) come from
``iid_to_ann_ids.json`` when given, else in the order of ``instances.json``'s annotations of the image, the order
:func:`write_gt_boxes` writes the boxes to extract in (``python -m uniter_fast.extract --boxes``).
"""

from __future__ import annotations

import builtins
import os
import pickle
from typing import Any, Optional

from uniter_fast.data.task_records import field
from uniter_fast.errors import ConfigError, DataError, closest
from uniter_fast.files import write_json_atomic
from uniter_fast.importers import Importer
from uniter_fast.importers.common import json_object, load_json

SPLITS = {
    "refcoco": ("train", "val", "testA", "testB"),
    "refcoco+": ("train", "val", "testA", "testB"),
    "refcocog": ("train", "val", "test"),  # umd; the google split has train and val only
}
SAFE_BUILTINS = frozenset({"set", "frozenset", "list", "dict", "tuple", "str", "bytes", "int", "float", "bool"})
REF_FIELDS = {"ref_id": int, "ann_id": int, "image_id": int, "split": str, "sent_ids": list, "sentences": list}


class _PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the builtin data types of :data:`SAFE_BUILTINS`."""

    def __init__(self, file: Any, path: str) -> None:
        super().__init__(file, encoding="utf-8")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        """The builtin data type ``module.name``; a DataError for anything else (nothing is imported or run)."""
        if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        raise DataError(
            f"refs pickle {self.path!r} asks for {module}.{name}; refer's refs hold only lists, dicts, strings and "
            "numbers, so the file is refused (nothing of it was run)"
        )


def load_refs(path: str) -> list[dict[str, Any]]:
    """The refs of refer's ``refs(<split_by>).p`` at ``path``, read by the restricted unpickler, each checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"refs pickle {path!r} does not exist")
    with open(path, "rb") as f:
        try:
            refs = _PlainDataUnpickler(f, path).load()
        except DataError:
            raise
        except Exception as exc:  # any corruption: truncated, not a pickle, text that is not UTF-8
            raise DataError(f"refs pickle {path!r} cannot be read ({type(exc).__name__}: {exc})") from None
    if not isinstance(refs, list):
        raise DataError(f"refs pickle {path!r}: expected a list of refs, got {type(refs).__name__}")
    for i, ref in enumerate(refs):
        where = f"{path} ref {i}"
        for name, kind in REF_FIELDS.items():
            field(ref, name, kind, where)
        for j, sentence in enumerate(ref["sentences"]):
            field(sentence, "sent_id", int, f"{where} sentences[{j}]")
            field(sentence, "sent", str, f"{where} sentences[{j}]")
    return refs


def read_ann_order(path: Optional[str]) -> Optional[dict[str, list[int]]]:
    """MAttNet's ``iid_to_ann_ids.json`` at ``path`` (image id as a string -> ann ids), or None without a path."""
    if path is None:
        return None
    data = load_json(path, "iid_to_ann_ids file")
    table = data.get("iid_to_ann_ids") if isinstance(data, dict) else None
    if not isinstance(table, dict):
        raise DataError(f"iid_to_ann_ids file {path!r}: expected {{'iid_to_ann_ids': {{image id: [ann ids]}}}}")
    return table


def image_ann_ids(instances: dict[str, Any], order: Optional[dict[str, list[int]]], where: str) -> dict[int, list]:
    """Image id -> its ``ann_ids`` in GT-box row order: ``order``'s (``iid_to_ann_ids.json``) when given, else the
    order of ``instances``' annotations of the image."""
    found: dict[int, list[int]] = {}
    for i, ann in enumerate(instances["annotations"]):
        at = f"{where} annotations[{i}]"
        found.setdefault(field(ann, "image_id", int, at), []).append(field(ann, "id", int, at))
        bbox = field(ann, "bbox", list, at)
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
            raise DataError(f"{at}: bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
    if order is None:
        return found
    out = {}
    for image_id, ann_ids in found.items():
        listed = order.get(str(image_id))
        if listed is None or sorted(listed) != sorted(ann_ids):
            raise DataError(
                f"iid_to_ann_ids: image {image_id} lists {listed}, but {where} has the annotations {sorted(ann_ids)}"
            )
        out[image_id] = list(listed)
    return out


def read(paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
    """The RE side tables (``refs``, ``annotations``, ``categories``, ``images``; ``uniter_fast.data.re_db``) of
    ``--split`` from refer's files ``paths`` (refs pickle, ``instances.json`` [, ``iid_to_ann_ids.json``])."""
    dataset, split = options["dataset"], options["split"]
    if dataset not in SPLITS:
        raise ConfigError(f"--dataset {dataset!r}: unknown{closest(dataset, SPLITS)}; expected one of {list(SPLITS)}")
    if split is None:
        raise ConfigError(f"--split is required: one of {list(SPLITS[dataset])} ({dataset})")
    if split not in SPLITS[dataset]:
        raise ConfigError(f"--split {split!r}: {dataset} has the splits {list(SPLITS[dataset])}")
    if len(paths) not in (2, 3):
        raise ConfigError(
            f"--annotations: expected 'refs(<split_by>).p instances.json [iid_to_ann_ids.json]', got {len(paths)} files"
        )
    refs = load_refs(paths[0])
    instances = json_object(paths[1], "refer instances file", ("images", "annotations", "categories"))
    ann_ids = image_ann_ids(instances, read_ann_order(paths[2] if len(paths) == 3 else None), paths[1])
    chosen = [ref for ref in refs if ref["split"] == split]
    if not chosen:
        present = sorted({ref["split"] for ref in refs})
        raise DataError(f"{paths[0]}: no ref of split {split!r}; the file has the splits {present}")
    image_set = {ref["image_id"] for ref in chosen}
    images = []
    for i, image in enumerate(instances["images"]):
        at = f"{paths[1]} images[{i}]"
        image_id = field(image, "id", int, at)
        if image_id in image_set:
            images.append(
                {
                    "id": image_id,
                    "file_name": field(image, "file_name", str, at),
                    "ann_ids": ann_ids.get(image_id, []),
                    "height": field(image, "height", int, at),
                    "width": field(image, "width", int, at),
                }
            )
    missing = image_set - {image["id"] for image in images}
    if missing:
        raise DataError(f"{paths[1]}: lacks the images {sorted(missing)[:5]} of {paths[0]}'s {split} refs")
    annotations = [
        {name: ann.get(name) for name in ("id", "area", "bbox", "image_id", "category_id", "iscrowd")}
        for ann in instances["annotations"]
        if ann["image_id"] in image_set
    ]
    side = {"refs": chosen, "annotations": annotations, "categories": instances["categories"], "images": images}
    return {**side, "where": f"{paths[0]} ({split})"}


def gt_boxes(instances: dict[str, Any], order: Optional[dict[str, list[int]]], where: str) -> dict[str, list]:
    """``python -m uniter_fast.extract --boxes`` input for every image of ``instances``: file name -> its boxes
    ``[x1, y1, x2, y2]`` (COCO's ``[x, y, w, h]``, clipped to the image) in ``ann_ids`` order."""
    anns = {ann["id"]: ann for ann in instances["annotations"]}
    ann_ids = image_ann_ids(instances, order, where)
    out = {}
    for image in instances["images"]:
        width, height = image["width"], image["height"]
        boxes = []
        for ann_id in ann_ids.get(image["id"], []):
            x, y, w, h = anns[ann_id]["bbox"]
            boxes.append([max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)])
        if boxes:
            out[image["file_name"]] = boxes
    return out


def write_gt_boxes(instances_path: str, out: str, ann_order: Optional[str] = None) -> int:
    """Write ``out``, the boxes JSON of :func:`gt_boxes` for refer's ``instances_path`` (and MAttNet's
    ``iid_to_ann_ids.json`` ``ann_order``); returns the number of images."""
    instances = json_object(instances_path, "refer instances file", ("images", "annotations", "categories"))
    boxes = gt_boxes(instances, read_ann_order(ann_order), instances_path)
    write_json_atomic(out, boxes)
    return len(boxes)


IMPORTER = Importer(
    name="refcoco",
    task="re",
    description="RefCOCO / RefCOCO+ / RefCOCOg (refer's refs(<split_by>).p + instances.json): the RE dbs",
    files="refs(unc).p|refs(umd).p|refs(google).p instances.json [iid_to_ann_ids.json]",
    options={
        "dataset": (str, "refcoco", f"which dataset the files are: one of {list(SPLITS)} (checks --split)"),
        "split": (str, None, "refs split: train, val, testA, testB (refcoco, refcoco+); train, val, test (refcocog)"),
    },
    read=read,
)
