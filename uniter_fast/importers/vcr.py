"""VCR (https://visualcommonsense.com/download/, the loader: rowanz/r2c): ``{train,val,test}.jsonl``, one question a
line: ``{"annot_id", "img_fn", "metadata_fn", "objects" (category names), "question", "answer_choices" (4),
"rationale_choices" (4), "answer_label", "rationale_label", ...}`` (no labels in test), each text a list of tokens:
a word, or a list of indices into ``objects`` -> VCR annotations.

As the original's VCR databases: a reference to a ``person`` object k becomes the person tag k (the task's tag id
``special_token_base + k``; the 81 tags person_0..person_80), a reference to any other object becomes its category
name as a word; a missing label is -1. Images: the ``--image_key`` (detected boxes) and ``--gt_image_key`` (GT
boxes) patterns over ``split`` (the annotation file's name without its extension: train / val / test), ``image``
(the file name of ``img_fn`` without its extension) and ``stem`` (the whole ``img_fn`` without its extension, ``/``
as ``__``: the name ``python -m uniter_fast.extract --images vcr1images/`` gives), by default
``vcr_<split>_<image>.npz`` and ``vcr_gt_<split>_<image>.npz``, the original's names.
"""

from __future__ import annotations

import os
from typing import Any

from uniter_fast.data.task_db import read_jsonl
from uniter_fast.data.task_records import NUM_CHOICES, field
from uniter_fast.errors import DataError
from uniter_fast.importers import Importer
from uniter_fast.importers.common import image_key

PERSON = "person"


def _tokens(tokens: Any, objects: list[str], name: str, where: str) -> list[Any]:
    """A VCR text with each object reference resolved: ``[k]`` for a person, the category name for another object."""
    if not isinstance(tokens, list):
        raise DataError(f"{where}: field {name!r} must be a token list, got {tokens!r}")
    out: list[Any] = []
    for tok in tokens:
        if isinstance(tok, str):
            out.append(tok)
            continue
        if not isinstance(tok, list) or not all(isinstance(k, int) and 0 <= k < len(objects) for k in tok):
            raise DataError(
                f"{where}: field {name!r}: token {tok!r} is neither a word nor a list of indices into "
                f"the {len(objects)} objects"
            )
        out += [[k] if PERSON in objects[k] else objects[k] for k in tok]
    return out


def _choices(raw: dict[str, Any], objects: list[str], name: str, where: str) -> list[list[Any]]:
    """The four resolved choices of field ``name``."""
    choices = field(raw, name, list, where)
    if len(choices) != NUM_CHOICES:
        raise DataError(f"{where}: field {name!r} must hold {NUM_CHOICES} choices, got {len(choices)}")
    return [_tokens(c, objects, name, where) for c in choices]


def _label(raw: dict[str, Any], name: str, where: str) -> int:
    """``raw[name]`` (an int), -1 when absent (the test split)."""
    return field(raw, name, int, where) if name in raw else -1


def read(paths: list[str], options: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """VCR annotations ``{"annot_id", "image", "gt_image", "question", "answer_choices", "rationale_choices",
    "answer_label", "rationale_label"}`` of every line of every file."""
    out = []
    for path in paths:
        split = os.path.basename(path).split(".")[0]
        for where, raw in read_jsonl(path):
            objects = field(raw, "objects", list, where)
            if not all(isinstance(o, str) for o in objects):
                raise DataError(f"{where}: field 'objects' must be a list of category names, got {objects!r}")
            img_fn = os.path.splitext(field(raw, "img_fn", str, where))[0]
            fields = {"split": split, "image": os.path.basename(img_fn), "stem": img_fn.replace("/", "__")}
            record = {
                "annot_id": field(raw, "annot_id", str, where),
                "image": image_key(options["image_key"], fields, where),
                "gt_image": image_key(options["gt_image_key"], fields, where, option="gt_image_key"),
                "question": _tokens(field(raw, "question", list, where), objects, "question", where),
                "answer_choices": _choices(raw, objects, "answer_choices", where),
                "rationale_choices": _choices(raw, objects, "rationale_choices", where),
                "answer_label": _label(raw, "answer_label", where),
                "rationale_label": _label(raw, "rationale_label", where),
            }
            out.append((where, record))
    return out


IMPORTER = Importer(
    name="vcr",
    task="vcr",
    description="VCR JSON lines (annot_id, img_fn, objects, question, answer/rationale choices and labels)",
    files="<split>.jsonl [...] (VCR's train.jsonl / val.jsonl / test.jsonl)",
    options={
        "image_key": (
            str,
            "vcr_{split}_{image}",
            "img_db key pattern of the detected boxes; fields split (the file name without extension), image "
            "(img_fn's file name without extension), stem (img_fn without extension, / as __)",
        ),
        "gt_image_key": (str, "vcr_gt_{split}_{image}", "img_db key pattern of the GT boxes (fields as --image_key)"),
    },
    read=read,
)
