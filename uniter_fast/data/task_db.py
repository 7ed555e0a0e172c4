"""The pieces every downstream task's database builder uses (``python -m uniter_fast.build --task ...``): reading
annotation JSON lines, storing the per-image ``.npz`` features an annotation file names into an img_db, and writing
a txt_db of converted records with the checks a task db needs.

Unlike the pretraining builder, a bad annotation is an error naming the file, the line and the field (a task db with
silently dropped examples gives wrong metrics). What a record holds is the task's business: each task module
converts its annotations (with the format converters of ``uniter_fast.data.task_records`` / ``re_db``) and hands
the records to :func:`write_records`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Union

from tqdm import tqdm

from uniter_fast.data.img_db import ImgDbWriter, load_npz
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.errors import DataError

GT_BOX_SETTINGS = (-1.0, 100, 10, 100)  # GT-box img_dbs keep every stored box (conf_th -1, up to 100), as the original


@dataclasses.dataclass(frozen=True)
class Imported:
    """Annotations already read (by an importer of ``uniter_fast.importers``) in the form a builder reads them:
    ``annotations`` as ``Task.read_annotations`` returns them (pretraining: ``(where, {"id", "image", "caption"})``
    pairs); ``source`` names the files they came from, for messages; ``options``: task build options the files fix
    (e.g. VQA v2's answer vocabulary, ``{"ans2label": {answer: label}}``), over those given on the command line."""

    source: str
    annotations: Any
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


# one txt_db record: (where (file and line, for errors), id, input_ids, img_fname (a key or a list of keys), fields)
Record = tuple[str, str, list[int], Union[str, list[str]], dict[str, Any]]


def read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) per non-empty line of ``path``; a line that is not JSON is a DataError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotations file {path!r} does not exist")
    out = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                out.append((where, json.loads(line.decode("utf-8"))))
            except UnicodeDecodeError as err:
                raise DataError(f"{where}: not UTF-8 text ({err})") from None
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err})") from None
    return out


def check_image(name: str, images: Iterable[str], db: str, where: str) -> None:
    """DataError naming ``where`` unless image key ``name`` is among ``images`` (the keys of the ``db`` img_db)."""
    if name not in images:
        raise DataError(f"{where}: image {name!r} has no features in the {db} img_db")


def write_img_db(out: str, features: str, files: dict[str, str], box_settings: tuple[float, int, int, int]) -> dict:
    """Store every ``<stem>.npz`` of the directory ``features`` that ``files`` maps (stem -> img_db key) into a new
    img_db at ``out`` with ``box_settings`` (conf_th, max_bb, min_bb, num_bb); returns key -> number of boxes."""
    if not os.path.isdir(features):
        raise FileNotFoundError(f"features directory {features!r} does not exist")
    rows = {}
    with ImgDbWriter(out, *box_settings) as writer:
        for stem, key in tqdm(sorted(files.items()), desc=f"features {os.path.basename(os.path.normpath(features))}"):
            path = os.path.join(features, stem if stem.endswith(".npz") else stem + ".npz")
            if not os.path.isfile(path):
                raise DataError(f"features: {path!r} is missing (needed for image {key!r})")
            arrays = load_npz(path)
            try:
                writer.add(key, **arrays, strict=True)
            except DataError as exc:
                raise DataError(f"features: {path!r} is rejected ({exc})") from None
            rows[key] = len(arrays["features"])
    return rows


def write_records(out: str, meta: dict[str, Any], records: Iterable[Record], desc: str = "texts") -> int:
    """A txt_db at ``out`` (``meta.json`` = ``meta``) of ``records``; a duplicate id is a DataError naming where it
    came from. Returns the number of records."""
    with TxtDbWriter(out, meta) as writer:
        add_records(writer, tqdm(records, desc=desc))
        return len(writer.id2len)


def add_records(writer: TxtDbWriter, records: Iterable[Record]) -> None:
    """``writer.add`` of every record; a rejected record or a duplicate id is a DataError naming where it came
    from (the checks of every task txt_db, on disk or in memory)."""
    for where, id_, input_ids, img_fname, fields in records:
        try:
            added = writer.add(id_, input_ids, img_fname, **fields)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None
        if not added:
            raise DataError(f"{where}: duplicate id {id_!r}")
