"""What the importers of public files share: reading a published JSON file, naming images in the img_db by a
pattern (``--image_key``; the fields of COCO and Flickr30k images and their default keys, the same in every
importer that reads them), the exclusion lists of pretraining (``--exclude``) and the ``--split`` lists.

Image keys are Python format patterns over the fields each importer documents (e.g. ``coco_{subset}_{id:012}``
gives ``coco_train2014_000000581857.npz``); ``{stem}``, the image file's name without its extension, gives the
names ``python -m uniter_fast.extract`` writes. An exclusion list is a text file, one ``<dataset>:<id>`` a line
(``coco:581857``, ``flickr30k:1000092795``, ``vg:2345678``; ``#`` starts a comment).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Optional

from uniter_fast.data import task_records
from uniter_fast.errors import ConfigError, DataError, closest
from uniter_fast.files import read_json

EXCLUDE_DATASETS = ("coco", "flickr30k", "vg")
COCO_KEY = "coco_{subset}_{id:012}"
"""The default key of a COCO image (fields of :func:`coco_fields`): the original img_dbs' names."""
FLICKR30K_KEY = "flickr30k_{id:012}"
"""The default key of a Flickr30k image (fields of :func:`flickr30k_fields`): the photo id, 12 digits, as COCO's."""
COCO_FILE = re.compile(r"COCO_(?P<subset>[a-z]+\d+)_(?P<id>\d+)$")
"""A COCO image file stem (``COCO_train2014_000000581857``): its subset and image id."""

Caption = tuple[str, dict[str, str]]
"""One pretraining caption record: (where it came from, ``{"id", "image", "caption"}``)."""


def load_json(path: str, what: str) -> Any:
    """The JSON content of the published file ``path`` (``what`` names the format in errors); a missing file is a
    ``FileNotFoundError``, a file that is not JSON a DataError naming it."""
    try:
        return read_json(path, what)
    except ValueError as exc:
        raise DataError(str(exc)) from None


def json_object(path: str, what: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """The published JSON object ``path`` holding the list fields ``keys``; a DataError naming the file otherwise."""
    data = load_json(path, what)
    if not isinstance(data, dict):
        raise DataError(f"{what} {path!r}: expected a JSON object with {list(keys)}, got {type(data).__name__}")
    for key in keys:
        if not isinstance(data.get(key), list):
            raise DataError(f"{what} {path!r}: expected a list under {key!r}, got {type(data.get(key)).__name__}")
    return data


def json_list(path: str, what: str, items: str) -> list[Any]:
    """The published JSON list ``path`` (of ``items``, for the error); a DataError naming the file otherwise."""
    data = load_json(path, what)
    if not isinstance(data, list):
        raise DataError(f"{what} {path!r}: expected a JSON list of {items}, got {type(data).__name__}")
    return data


def image_key(pattern: str, fields: dict[str, Any], where: str, option: str = "image_key") -> str:
    """The img_db key of an image: ``pattern`` (the ``--<option>`` value) formatted with ``fields``, ".npz" appended
    when missing; a ConfigError naming the option when the pattern uses a field this format does not have, a format
    spec that does not fit a field's value, or gives a name with a "/"."""
    try:
        key = pattern.format(**fields)
    except KeyError as exc:
        name = str(exc.args[0])
        raise ConfigError(
            f"--{option} {pattern!r}: unknown field {name!r}{closest(name, fields)}; this format has {sorted(fields)}"
        ) from None
    except (ValueError, IndexError) as exc:
        raise ConfigError(f"--{option} {pattern!r}: cannot format {where} ({exc}); fields {fields}") from None
    if not key or "/" in key:
        raise ConfigError(f"--{option} {pattern!r}: gives {key!r} for {where}; expected a file name without '/'")
    return task_records.image_key(key)


def coco_fields(file_name: str, where: str) -> dict[str, Any]:
    """``id``, ``subset`` and ``stem`` of a COCO image file name (``COCO_train2014_000000581857.jpg``); DataError
    otherwise."""
    stem = os.path.splitext(file_name)[0]
    match = COCO_FILE.match(stem)
    if match is None:
        raise DataError(f"{where}: file name {file_name!r} is not a COCO image name (COCO_<subset>_<id>.jpg)")
    return {"id": int(match["id"]), "subset": match["subset"], "stem": stem}


def coco_image(image_id: int, subset: str) -> dict[str, Any]:
    """``id``, ``subset`` and ``stem`` of COCO image ``image_id`` of the folder ``subset`` (``train2014``): the
    fields :func:`coco_fields` reads from its file name."""
    return {"id": image_id, "subset": subset, "stem": f"COCO_{subset}_{image_id:012d}"}


def flickr30k_fields(file_name: str, where: str) -> dict[str, Any]:
    """``id`` (the photo id) and ``stem`` of a Flickr30k image file name (``1000092795.jpg``); DataError otherwise."""
    stem = os.path.splitext(file_name)[0]
    if not stem.isdigit():
        raise DataError(f"{where}: {file_name!r} is not a Flickr30k file name (<photo id>.jpg, e.g. '1000092795.jpg')")
    return {"id": int(stem), "stem": stem}


def read_exclusions(path: Optional[str]) -> dict[str, set[int]]:
    """The ``--exclude`` file ``path``: dataset -> image ids (empty when ``path`` is None); a line that is not
    ``<dataset>:<id>`` is a DataError naming the file and the line."""
    found: dict[str, set[int]] = {name: set() for name in EXCLUDE_DATASETS}
    if path is None:
        return found
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--exclude file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            entry = line.split("#", 1)[0].strip()
            if not entry:
                continue
            dataset, _, number = entry.partition(":")
            if dataset not in found or not number.strip().isdigit():
                raise DataError(
                    f"--exclude {path!r} line {n}: expected '<dataset>:<image id>' with dataset one of "
                    f"{list(EXCLUDE_DATASETS)}, got {entry!r}"
                )
            found[dataset].add(int(number))
    return found


def split_names(value: Optional[str], known: Iterable[str], aliases: dict[str, tuple[str, ...]]) -> set[str]:
    """The splits of the ``--split`` value (comma-separated names of ``known``; an alias stands for its tuple); a
    ConfigError naming the option when a name is unknown or none is given."""
    known = sorted(known)
    if not value:
        raise ConfigError(f"--split is required: one or more of {known} (comma-separated)")
    out: set[str] = set()
    for name in (n.strip() for n in value.split(",")):
        if name not in known:
            raise ConfigError(f"--split {value!r}: unknown split {name!r}{closest(name, known)}; expected {known}")
        out.update(aliases.get(name, (name,)))
    return out


def caption(where: str, id_: Any, image: str, text: str) -> Caption:
    """A pretraining caption record: ``id`` and ``image`` as strings, ``caption`` the text as published."""
    return where, {"id": str(id_), "image": image, "caption": text}
