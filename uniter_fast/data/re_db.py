"""The referring-expression txt_db (the original ``data/re.py`` ``ReTxtTokLmdb``): a txt_db of one record per
sentence plus the COCO-refer side files.

Records (key = sent_id): ``input_ids``, ``img_fname``, ``sent_id``, ``sent``, ``ref_id``, ``ann_id``, ``image_id``,
``bbox`` (the referent's [x, y, w, h] in pixels). Side files beside ``meta.json`` / ``id2len.json``:

* ``refs.json``: ``[{ref_id, sent_ids, ann_id, image_id, split}]``
* ``annotations.json``: ``[{id, area, bbox, image_id, category_id}]``
* ``categories.json``: ``[{id, name, supercategory}]``
* ``images.json``: ``[{id, file_name, ann_ids, height, width}]`` (``ann_ids`` in the row order of the image's
  GT-box features, so a referent's index among them is the training target)

Image keys follow the original's COCO naming: ``visual_grounding_coco_gt_{image_id:012}.npz`` in the GT-box img_db
and ``visual_grounding_det_coco_{image_id:012}.npz`` in the detected-box one.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from uniter_fast.data.side_files import read_side_file
from uniter_fast.data.task_db import Record, add_records, check_image
from uniter_fast.data.task_records import encode, field
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtDbWriter, TxtTokLmdb
from uniter_fast.errors import DataError
from uniter_fast.files import write_json_atomic

RE_SIDE_FILES = ("refs", "annotations", "categories", "images")
REF_FIELDS = {
    "refs": ("ref_id", "sent_ids", "ann_id", "image_id"),
    "annotations": ("id", "bbox", "image_id", "category_id"),
    "categories": ("id", "name"),
    "images": ("id", "ann_ids", "height", "width"),
}


def gt_image_name(image_id: int) -> str:
    """Key of an image in the GT-box img_db (the original's COCO naming)."""
    return f"visual_grounding_coco_gt_{int(image_id):012}.npz"


def det_image_name(image_id: int) -> str:
    """Key of an image in the detected-box img_db."""
    return f"visual_grounding_det_coco_{int(image_id):012}.npz"


def check_side_file(path: str, name: str, rows: Any) -> None:
    """Raise ``DataError`` naming ``path`` and the field unless ``rows`` is a list of dicts with ``name``'s fields."""
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of {name} records, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        missing = [f for f in REF_FIELDS[name] if not isinstance(row, dict) or f not in row]
        if missing:
            raise DataError(f"{path}: record {i} lacks the fields {missing} (a {name} record needs {REF_FIELDS[name]})")


def read_re_annotations(directory: str) -> dict[str, list[dict[str, Any]]]:
    """The four COCO-refer side files of ``directory`` (``refs.json`` with each ref's ``sentences`` [{sent_id,
    sent}], ``annotations.json``, ``categories.json``, ``images.json``), each checked; ``where`` names the directory
    in later errors."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"annotations: RE takes a directory of {[n + '.json' for n in RE_SIDE_FILES]}, got {directory!r}"
        )
    side = {n: read_side_file(os.path.join(directory, f"{n}.json"), "RE annotation file") for n in RE_SIDE_FILES}
    for name in RE_SIDE_FILES:
        check_side_file(os.path.join(directory, f"{name}.json"), name, side[name])
    return {**side, "where": directory}


def re_image_files(side: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, str], dict[str, str]]:
    """(detected-box, GT-box) features of the RE side files' images: ``.npz`` stem (the image's ``file_name``
    without extension, else its id) -> img_db key (the original's COCO naming)."""
    stems = {os.path.splitext(i.get("file_name", str(i["id"])))[0]: i["id"] for i in side["images"]}
    return {s: det_image_name(i) for s, i in stems.items()}, {s: gt_image_name(i) for s, i in stems.items()}


def write_re_side_files(path: str, side: dict[str, list[dict[str, Any]]]) -> None:
    """Write ``refs.json``, ``annotations.json``, ``categories.json`` and ``images.json`` into the txt_db ``path``."""
    for name in RE_SIDE_FILES:
        check_side_file(name, name, side[name])
        write_json_atomic(os.path.join(path, f"{name}.json"), side[name])


def write_re_txt_db(
    side: dict[str, list[dict[str, Any]]],
    toker: WordPiece,
    out: str,
    images: set[str],
    gt_images: set[str],
    gt_rows: dict[str, int],
    meta_name: str = "wordpiece",
    where: str = "annotations",
) -> int:
    """Write an RE txt_db: the records of :func:`re_records`, plus the four side files. Returns the number of
    sentences."""
    records = re_records(side, toker, images, gt_images, gt_rows, where)
    with TxtDbWriter(out, toker.meta(meta_name)) as writer:
        add_records(writer, records)
        count = len(writer.id2len)
    write_re_side_files(out, side)
    return count


def re_records(
    side: dict[str, list[dict[str, Any]]],
    toker: WordPiece,
    images: set[str],
    gt_images: set[str],
    gt_rows: dict[str, int],
    where: str = "annotations",
) -> list[Record]:
    """One record per sentence of ``side["refs"]`` (each ref with ``sentences`` [{sent_id, sent}]); ``gt_rows`` (GT
    image key -> boxes) must match each image's ``ann_ids``, the image keys must be in ``images`` / ``gt_images``."""
    for name in RE_SIDE_FILES:
        check_side_file(f"{where}/{name}.json", name, side.get(name))
    anns = {a["id"]: a for a in side["annotations"]}
    imgs = {i["id"]: i for i in side["images"]}
    records: list[Record] = []
    for r, ref in enumerate(side["refs"]):
        at = f"{where}/refs.json record {r}"
        image = imgs.get(ref["image_id"])
        if image is None or ref["ann_id"] not in image["ann_ids"] or ref["ann_id"] not in anns:
            raise DataError(
                f"{at}: ann_id {ref['ann_id']} of image {ref['image_id']} is not in images.json "
                "ann_ids / annotations.json"
            )
        gt_name, det_name = gt_image_name(image["id"]), det_image_name(image["id"])
        check_image(gt_name, gt_images, "GT-box", at)
        check_image(det_name, images, "detected-box", at)
        if gt_rows[gt_name] != len(image["ann_ids"]):
            raise DataError(
                f"{at}: image {image['id']} has {len(image['ann_ids'])} ann_ids but {gt_rows[gt_name]} GT-box features"
            )
        for sentence in field(ref, "sentences", list, at):
            sent_id = str(field(sentence, "sent_id", (str, int), at))
            sent = field(sentence, "sent", str, at)
            fields = {
                "sent_id": sent_id,
                "sent": sent,
                "ref_id": ref["ref_id"],
                "ann_id": ref["ann_id"],
                "image_id": image["id"],
                "bbox": anns[ref["ann_id"]]["bbox"],
            }
            records.append((at, sent_id, encode(toker, sent, "sent", at), gt_name, fields))
    return records


class ReTxtTokLmdb(TxtTokLmdb):
    """A referring-expression txt_db: ``Refs`` / ``Anns`` / ``Cats`` / ``Images`` by id, and ``sent_ids()`` in the
    order of ``refs.json`` (the original iterates refs, then each ref's sentences, dropping those above
    ``max_txt_len``)."""

    def __init__(self, path: str, max_txt_len: int = 60) -> None:
        super().__init__(path, max_txt_len)
        side = {}
        for name in RE_SIDE_FILES:
            file = os.path.join(path, f"{name}.json")
            side[name] = read_side_file(file, "RE txt_db side file")
            check_side_file(file, name, side[name])
        self._set_side(side)

    @classmethod
    def from_writer(cls, writer: Any, store: Any, side: dict[str, list[dict[str, Any]]]) -> ReTxtTokLmdb:
        """An in-memory RE txt_db (``TxtTokLmdb.from_writer``) with the side tables ``side`` (checked)."""
        reader = super().from_writer(writer, store)
        for name in RE_SIDE_FILES:
            check_side_file(f"{writer.path}/{name}.json", name, side.get(name))
        reader._set_side(side)
        return reader

    def _set_side(self, side: dict[str, list[dict[str, Any]]]) -> None:
        """The side tables by id."""
        self.ref_ids = [ref["ref_id"] for ref in side["refs"]]
        self.Refs = {ref["ref_id"]: ref for ref in side["refs"]}
        self.Anns = {ann["id"]: ann for ann in side["annotations"]}
        self.Cats = {cat["id"]: cat["name"] for cat in side["categories"]}
        self.Images = {img["id"]: img for img in side["images"]}

    def sent_ids(self, ref_order: list[int] | None = None) -> list[str]:
        """Sentence ids (str) of the refs in ``ref_order`` (default: file order), those kept by ``max_txt_len``."""
        out = []
        for ref_id in self.ref_ids if ref_order is None else ref_order:
            out += [str(s) for s in self.Refs[ref_id]["sent_ids"] if str(s) in self.id2len]
        return out

    def shuffled_sent_ids(self, rng: np.random.Generator) -> list[str]:
        """As the original ``shuffle``: the refs in a random order, each ref's sentences kept together."""
        order = [self.ref_ids[i] for i in rng.permutation(len(self.ref_ids))]
        return self.sent_ids(order)

    def target_index(self, record: dict[str, Any]) -> int:
        """Index of the record's referent ``ann_id`` among its image's ``ann_ids`` (the GT-box row)."""
        image = self.Images.get(record["image_id"])
        if image is None:
            raise DataError(
                f"txt_db {self.path!r}: sentence {record.get('sent_id')!r} names image_id "
                f"{record['image_id']!r}, which images.json lacks"
            )
        if record["ann_id"] not in image["ann_ids"]:
            raise DataError(
                f"txt_db {self.path!r}: sentence {record.get('sent_id')!r}: ann_id {record['ann_id']} is "
                f"not among the ann_ids of image {record['image_id']} in images.json"
            )
        return image["ann_ids"].index(record["ann_id"])
