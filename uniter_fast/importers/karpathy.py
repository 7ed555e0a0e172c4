"""Karpathy's splits of COCO and Flickr30k (``dataset_coco.json``, ``dataset_flickr30k.json`` of
https://cs.stanford.edu/people/karpathy/deepimagesent/, ``caption_datasets.zip``): one caption record per sentence
of the images of the chosen splits, for the retrieval tasks (``itm``, ``itm-hn``) and COCO pretraining.

The file: ``{"dataset": "coco" | "flickr30k", "images": [{"split": "train" | "restval" | "val" | "test",
"filename", "imgid", "sentences": [{"raw", "tokens", "sentid", "imgid"}], "sentids", ...}]}``; COCO images also
have ``filepath`` (``train2014`` / ``val2014``) and ``cocoid``. A record: id = ``sentid``, caption = ``raw`` (the
sentence as written, cased, for the original's bert-base-cased tokenizer; the script of the original's retrieval
txt_dbs is not public; ``tokens`` is lower-cased and stripped of punctuation), image = the ``--image_key``
pattern. ``--split train`` takes Karpathy's train and restval images, as UNITER trained on both (its
``itm_coco_train`` and ``itm_coco_restval`` dbs); COCO has 113,287 images there, 5,000 in val and 5,000 in test,
Flickr30k 29,000 / 1,014 / 1,000.
"""

from __future__ import annotations

from typing import Any, Callable

from uniter_fast.data.task_records import field
from uniter_fast.errors import DataError
from uniter_fast.importers import PRETRAIN, Importer
from uniter_fast.importers.common import (
    Caption,
    caption,
    coco_fields,
    flickr30k_fields,
    image_key,
    json_object,
    read_exclusions,
    split_names,
)

SPLITS = ("train", "restval", "val", "test")
SPLIT_ALIASES = {"train": ("train", "restval")}


def _coco_image(image: dict[str, Any], where: str) -> tuple[dict[str, Any], tuple[str, int]]:
    """Key fields (``id`` = cocoid, ``subset`` = filepath, ``stem``, ``imgid``) and the exclusion id of a COCO image."""
    cocoid = field(image, "cocoid", int, where)
    fields = coco_fields(field(image, "filename", str, where), where)
    fields.update(id=cocoid, subset=field(image, "filepath", str, where), imgid=image.get("imgid"))
    return fields, ("coco", cocoid)


def _flickr_image(image: dict[str, Any], where: str) -> tuple[dict[str, Any], tuple[str, int]]:
    """Key fields (``id`` = the Flickr photo id, the file name's digits; ``stem``; ``imgid``) and the exclusion id."""
    fields = {
        **flickr30k_fields(field(image, "filename", str, where), f"{where} filename"),
        "imgid": image.get("imgid"),
    }
    return fields, ("flickr30k", fields["id"])


IMAGE_FIELDS = {"coco": _coco_image, "flickr30k": _flickr_image}


def karpathy_reader(dataset: str) -> Callable[[list[str], dict[str, Any]], list[Caption]]:
    """``read(paths, options)`` of the Karpathy file of ``dataset`` ("coco" or "flickr30k")."""
    image_fields = IMAGE_FIELDS[dataset]

    def read(paths: list[str], options: dict[str, Any]) -> list[Caption]:
        """Caption records of the images of ``options["split"]`` in the Karpathy files ``paths``."""
        splits = split_names(options["split"], SPLITS, SPLIT_ALIASES)
        excluded = read_exclusions(options["exclude"])
        records: list[Caption] = []
        for path in paths:
            records += _read_file(path, dataset, image_fields, splits, options["image_key"], excluded)
        return records

    return read


def _read_file(
    path: str,
    dataset: str,
    image_fields: Callable[[dict[str, Any], str], tuple[dict[str, Any], tuple[str, int]]],
    splits: set[str],
    pattern: str,
    excluded: dict[str, set[int]],
) -> list[Caption]:
    """The caption records of one Karpathy file (see the module docstring)."""
    data = json_object(path, f"Karpathy {dataset} file", ("images",))
    if data.get("dataset", dataset) != dataset:
        raise DataError(
            f"{path}: holds dataset {data['dataset']!r}, not {dataset!r} (use --from karpathy-{data['dataset']})"
        )
    records: list[Caption] = []
    present: set[str] = set()
    for i, image in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        split = field(image, "split", str, where)
        present.add(split)
        fields, (source, number) = image_fields(image, where)
        sentences = field(image, "sentences", list, where)
        if split not in splits or number in excluded[source]:
            continue
        key = image_key(pattern, fields, where)
        for j, sentence in enumerate(sentences):
            at = f"{where} sentences[{j}]"
            records.append(caption(at, field(sentence, "sentid", int, at), key, field(sentence, "raw", str, at)))
    if not records:
        raise DataError(
            f"{path}: no sentence of splits {sorted(splits)} (not excluded); the file has {sorted(present)}"
        )
    return records


def karpathy_importer(dataset: str, default_key: str, key_fields: str) -> Importer:
    """The importer of Karpathy's ``dataset_<dataset>.json``."""
    return Importer(
        name=f"karpathy-{dataset}",
        task=PRETRAIN,
        description=f"Karpathy's {dataset} splits (dataset_{dataset}.json): caption records for itm / pretraining",
        files=f"dataset_{dataset}.json",
        options={
            "split": (str, "train", "Karpathy splits, comma-separated: train (= train + restval), restval, val, test"),
            "image_key": (str, default_key, f"img_db key pattern; fields {key_fields}"),
            "exclude": (str, None, "file of images to leave out, one <dataset>:<id> a line (coco:391895)"),
        },
        read=karpathy_reader(dataset),
    )
