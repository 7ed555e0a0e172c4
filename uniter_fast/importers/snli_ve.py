"""SNLI-VE (necla-ml/SNLI-VE): ``snli_ve_{train,dev,test}.jsonl``, SNLI's JSON lines with the Flickr30k image of the
premise added as ``Flikr30kID`` (sic, e.g. "3416050480.jpg"): ``{"pairID", "Flikr30kID", "sentence2" (the
hypothesis), "gold_label", "sentence1", "annotator_labels", ...}`` -> VE annotations.

As the original's databases: the id is ``pairID``, the text ``sentence2``, the class ``gold_label``
(contradiction 0, entailment 1, neutral 2), the image ``flickr30k_<image id, 12 digits>.npz``.
"""

from __future__ import annotations

from typing import Any

from uniter_fast.data.task_db import read_jsonl
from uniter_fast.data.task_records import VE_ENT2IDX, field
from uniter_fast.errors import DataError
from uniter_fast.importers import Importer
from uniter_fast.importers.published import image_name


def _image_id(raw: dict[str, Any], where: str) -> int:
    """The Flickr30k id of ``Flikr30kID`` ("<digits>.jpg")."""
    name = field(raw, "Flikr30kID", str, where)
    stem = name.split(".")[0]
    if not stem.isdigit():
        raise DataError(
            f"{where}: field 'Flikr30kID' must be a Flickr30k file name like '3416050480.jpg', got {name!r}"
        )
    return int(stem)


def read(paths: list[str], options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """VE annotations ``{"id", "image", "hypothesis", "label"}`` of every line of every file."""
    out = []
    for path in paths:
        for where, raw in read_jsonl(path):
            label = field(raw, "gold_label", str, where)
            if label not in VE_ENT2IDX:
                raise DataError(
                    f"{where}: field 'gold_label' must be one of {sorted(VE_ENT2IDX)}, got {label!r} "
                    "(SNLI-VE keeps the pairs with a gold label)"
                )
            image = image_name(options["image_pattern"], "image_pattern", image_id=_image_id(raw, where))
            record = {
                "id": field(raw, "pairID", str, where),
                "image": image,
                "hypothesis": field(raw, "sentence2", str, where),
                "label": label,
            }
            out.append((where, record))
    return out


IMPORTER = Importer(
    name="snli-ve",
    task="ve",
    description="SNLI-VE JSON lines (pairID, Flikr30kID, sentence2, gold_label)",
    files="snli_ve_<split>.jsonl [...]",
    options={
        "image_pattern": (str, "flickr30k_{image_id:012d}", "img_db key of an image ({image_id}: the Flickr30k id)"),
    },
    read=read,
)
