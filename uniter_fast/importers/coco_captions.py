"""``--from coco-captions``: COCO's caption annotations (``captions_train2014.json``, ``captions_val2014.json`` of
https://cocodataset.org/#download, ``annotations_trainval2014.zip``; the files cocoapi's ``COCO`` class reads) as
pretraining caption records.

The file: ``{"images": [{"id", "file_name", "height", "width", ...}], "annotations": [{"id", "image_id",
"caption"}], ...}``. A record per annotation: id = the annotation ``id``, caption = ``caption`` as written, image =
the ``--image_key`` pattern over the annotation's image (fields ``id``, ``subset`` and ``stem`` of its
``file_name`` ``COCO_<subset>_<id>.jpg``; default ``coco_{subset}_{id:012}``, the original img_dbs' names).

The original UNITER pretrained on COCO's Karpathy train + restval captions (``--from karpathy-coco``), which leaves
out the images of the retrieval val / test sets; with the whole 2014 sets, ``--exclude`` drops the images of the
downstream val / test sets (``coco:<image id>`` lines; ``docs/datasets.md``).
"""

from __future__ import annotations

from typing import Any

from uniter_fast.data.task_records import field
from uniter_fast.errors import DataError
from uniter_fast.importers import PRETRAIN, Importer
from uniter_fast.importers.common import (
    COCO_KEY,
    Caption,
    caption,
    coco_fields,
    image_key,
    json_object,
    read_exclusions,
)


def read(paths: list[str], options: dict[str, Any]) -> list[Caption]:
    """Caption records of every annotation of the COCO caption files ``paths`` whose image is not excluded."""
    excluded = read_exclusions(options["exclude"])["coco"]
    records: list[Caption] = []
    for path in paths:
        data = json_object(path, "COCO captions file", ("images", "annotations"))
        keys: dict[int, str] = {}
        for i, image in enumerate(data["images"]):
            where = f"{path} images[{i}]"
            image_id = field(image, "id", int, where)
            fields = {**coco_fields(field(image, "file_name", str, where), where), "id": image_id}
            keys[image_id] = image_key(options["image_key"], fields, where)
        for i, ann in enumerate(data["annotations"]):
            where = f"{path} annotations[{i}]"
            image_id = field(ann, "image_id", int, where)
            if image_id not in keys:
                raise DataError(f"{where}: image_id {image_id} is not among the file's images")
            text = field(ann, "caption", str, where)
            if image_id not in excluded:
                records.append(caption(where, field(ann, "id", int, where), keys[image_id], text))
    if not records:
        raise DataError(f"COCO captions {paths}: no annotation of an image not excluded by --exclude")
    return records


IMPORTER = Importer(
    name="coco-captions",
    task=PRETRAIN,
    description="COCO captions (captions_{train,val}2014.json): pretraining caption records",
    files="captions_train2014.json [captions_val2014.json]",
    options={
        "image_key": (str, COCO_KEY, "img_db key pattern; fields id, subset, stem"),
        "exclude": (str, None, "file of images to leave out, one coco:<image id> a line"),
    },
    read=read,
)
