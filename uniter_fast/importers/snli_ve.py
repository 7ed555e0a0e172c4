"""SNLI-VE (necla-ml/SNLI-VE): ``snli_ve_{train,dev,test}.jsonl``, SNLI's JSON lines with the Flickr30k image of the
premise added as ``Flikr30kID`` (sic, e.g. "3416050480.jpg"): ``{"pairID", "Flikr30kID", "sentence2" (the
hypothesis), "gold_label", "sentence1", "annotator_labels", ...}`` -> VE annotations.

As the original's databases: the id is ``pairID``, the text ``sentence2``, the class ``gold_label``
(contradiction 0, entailment 1, neutral 2), the image the ``--image_key`` pattern over the Flickr30k fields of
``Flikr30kID`` (``common.flickr30k_fields``: ``id``, the photo id; ``stem``), by default ``flickr30k_<id, 12
digits>.npz``, as ``karpathy-flickr30k``.
"""

from __future__ import annotations

from typing import Any

from uniter_fast.data.task_db import read_jsonl
from uniter_fast.data.task_records import VE_ENT2IDX, field
from uniter_fast.errors import DataError
from uniter_fast.importers import Importer
from uniter_fast.importers.common import FLICKR30K_KEY, flickr30k_fields, image_key


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
            fields = flickr30k_fields(field(raw, "Flikr30kID", str, where), f"{where} field 'Flikr30kID'")
            image = image_key(options["image_key"], fields, where)
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
        "image_key": (str, FLICKR30K_KEY, "img_db key pattern; fields id (the Flickr30k photo id), stem"),
    },
    read=read,
)
