"""Importers of the public benchmark files: each reads the annotation files of one public dataset as published
(VQA v2's questions + annotations JSON, NLVR2's jsonl, the Karpathy splits, refer's pickles, ...) and gives the
annotations in the form a task's database builder reads (``Task.read_annotations``; pretraining: caption records),
with the original preprocessing. ``python -m uniter_fast.build --from <name>`` builds the databases from them in one
call (see ``docs/datasets.md``).

An importer is one module of this package holding an :class:`Importer` named ``IMPORTER``; :data:`MODULES` lists
them.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from uniter_fast.errors import ConfigError, closest

PRETRAIN = "pretrain"
"""The ``task`` of an importer that feeds the pretraining databases (caption records)."""

MODULES: tuple[str, ...] = (
    "vqa2",
    "snli_ve",
    "nlvr2",
    "vcr",
    "karpathy_coco",
    "karpathy_flickr30k",
    "coco_captions",
    "vg_regions",
    "refcoco",
)
"""The importer modules of this package (each defines ``IMPORTER``)."""


@dataclasses.dataclass(frozen=True)
class Importer:
    """One public format.

    ``name``: the ``--from`` value; ``task``: the task whose databases it feeds (:data:`PRETRAIN` for captions);
    ``files``: what ``--annotations`` takes (for ``--help`` and errors); ``options``: its own command-line options,
    ``{name: (type, default, help)}`` as ``Task.build_options``.

    ``read(paths, options)`` receives the ``--annotations`` files ``paths`` and ``options``, the command line's
    values of the importer's own options and of the task's build options (e.g. vqa's ``ans2label``), by name. It
    returns the annotations in the form the task's builder reads (``Task.read_annotations``; for :data:`PRETRAIN`, a
    list of ``(where, {"id", "image", "caption"})`` pairs), or an ``Imported`` (``uniter_fast.data.task_db``) of
    them with the build options the files fix (VQA v2's answer vocabulary as ``ans2label``), which the builder takes
    over the command line's. Bad input is a ``DataError`` naming the file and the record, a bad option value a
    ``ConfigError`` naming the option."""

    name: str
    task: str
    description: str
    files: str
    options: dict[str, tuple[type, Any, str]]
    read: Callable[[list[str], dict[str, Any]], Any]


def importers() -> dict[str, Importer]:
    """Every importer of :data:`MODULES`, by name."""
    found = [importlib.import_module(f"{__name__}.{module}").IMPORTER for module in MODULES]
    return {imp.name: imp for imp in found}


def get_importer(name: str) -> Importer:
    """The importer called ``name``; a ``ConfigError`` naming the known ones otherwise."""
    known = importers()
    if name not in known:
        raise ConfigError(f"--from {name!r}: unknown format{closest(name, known)}; expected one of {sorted(known)}")
    return known[name]
