"""The VCR txt_db (the original ``data/vcr.py`` ``VcrTxtTokLmdb``) and its two image databases.

Records (key = annotation id, e.g. ``val-0``): ``input_ids`` (the question), ``input_ids_as`` (4 answers),
``input_ids_rs`` (4 rationales), ``qa_target`` / ``qar_target`` (indices; -1 on the test split), ``img_fname`` =
[GT-box image key, detected-box image key]. Side files: ``id2len_qa.json`` (question + answer lengths) and
``id2len_qar.json`` (question + answer + rationale), used for the length filter of the "qa" / "qar" datasets, and in
``meta.json`` ``special_token_base`` and ``num_special_tokens``: object tags (VCR's person/object references) are
the ids ``special_token_base + k`` for object k, i.e. the rows that ``init_word_embedding`` appends to a model whose
word table has ``special_token_base`` rows (28996 for bert-base-cased, as the original).

The two img_dbs are paired as the original's ``"gt_dir;det_dir"`` strings: GT boxes (``conf_th`` -1, 100 boxes) first
in the joint sequence, then the detected ones.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from uniter_fast.data.side_files import count_table
from uniter_fast.data.txt_db import TxtTokLmdb
from uniter_fast.errors import DataError

VCR_TASKS = ("qa", "qar", "qa,qar")
NUM_SPECIAL_TOKENS = 81
VCR_FIELDS = ("input_ids", "input_ids_as", "input_ids_rs", "qa_target", "qar_target", "img_fname")


class VcrTxtTokLmdb(TxtTokLmdb):
    """A VCR txt_db read for ``task`` "qa", "qar" or "qa,qar" (lengths from ``id2len_{qa|qar}.json``, "qa,qar" uses
    the qar lengths as the original)."""

    def __init__(self, path: str, max_txt_len: int = 120, task: str = "qa,qar") -> None:
        if task not in VCR_TASKS:
            raise ValueError(f"task must be one of {VCR_TASKS}, got {task!r}")
        super().__init__(path, -1)
        id2len = count_table(
            os.path.join(path, f"id2len_{'qar' if task == 'qa,qar' else task}.json"), "VCR length file"
        )
        self._read_as(task, id2len if max_txt_len == -1 else {k: n for k, n in id2len.items() if n <= max_txt_len})

    @classmethod
    def from_writer(cls, writer: Any, store: Any, id2len_qar: Optional[dict[str, int]] = None) -> VcrTxtTokLmdb:
        """An in-memory VCR txt_db (``TxtTokLmdb.from_writer``) read for evaluation ("qa,qar", the qar lengths
        ``id2len_qar``)."""
        reader = super().from_writer(writer, store)
        reader._read_as("qa,qar", dict(id2len_qar or {}))
        return reader

    def _read_as(self, task: str, id2len: dict[str, int]) -> None:
        """Read the db for ``task`` with the lengths ``id2len``; the tag range from ``meta.json``."""
        self.task, self.id2len = task, id2len
        for key in ("special_token_base", "num_special_tokens"):
            if type(self.meta.get(key)) is not int:
                raise DataError(f"{os.path.join(self.path, 'meta.json')}: VCR txt_db meta lacks the integer {key!r}")
        self.special_token_base = int(self.meta["special_token_base"])
        self.num_special_tokens = int(self.meta["num_special_tokens"])

    def __getitem__(self, id_: str) -> dict:
        record = super().__getitem__(id_)
        missing = [k for k in VCR_FIELDS if k not in record]
        if missing:
            raise DataError(f"txt_db {self.path!r}: VCR record {id_!r} lacks {missing}")
        if len(record["input_ids_as"]) != 4 or len(record["input_ids_rs"]) != 4:
            raise DataError(
                f"txt_db {self.path!r}: VCR record {id_!r} needs 4 answers and 4 rationales, got "
                f"{len(record['input_ids_as'])} and {len(record['input_ids_rs'])}"
            )
        if not isinstance(record["img_fname"], list) or len(record["img_fname"]) != 2:
            raise DataError(
                f"txt_db {self.path!r}: VCR record {id_!r}: img_fname must be [gt_image, det_image], "
                f"got {record['img_fname']!r}"
            )
        return record


def split_vcr_img_dirs(spec: str) -> tuple[str, str]:
    """``"gt_dir;det_dir"`` (either order) -> (GT-box dir, detected-box dir); the GT one has "gt" in its name, as
    the original's ``load_img_feat``."""
    parts = [p for p in spec.split(";") if p]
    gt = [p for p in parts if "gt" in os.path.basename(os.path.normpath(p))]
    det = [p for p in parts if p not in gt]
    if len(parts) != 2 or len(gt) != 1:
        raise ValueError(
            f"VCR img_db {spec!r}: expected 'gt_dir;det_dir' (two dirs, exactly one with 'gt' in its name)"
        )
    return gt[0], det[0]
