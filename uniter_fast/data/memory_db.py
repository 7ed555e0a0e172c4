"""The databases of a few new examples held in memory (``uniter_fast.inference``): the same writers, record checks
and readers as the LMDB databases (``ImgDbWriter`` / ``TxtDbWriter`` with an in-memory store, readers made by
``DetectFeatLmdb.from_store`` / ``TxtTokLmdb.from_writer``), so that an example read from memory is the example
``python -m uniter_fast.build`` would have written, byte for byte."""

from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from uniter_fast.data.img_db import NPZ_FIELDS, DetectFeatLmdb, ImgDbWriter, given_boxes_flag
from uniter_fast.data.task_db import Record, add_records
from uniter_fast.data.txt_db import TxtDbWriter


class MemoryStore:
    """An LMDB stand-in: the ``put`` of ``lmdb_env.Writer`` and the ``get`` / ``view`` of ``lmdb_env.LazyReader``
    over a dict of bytes; ``path`` names it in messages."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._values: dict[str, bytes] = {}

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key``."""
        self._values[key] = bytes(value)

    def get(self, key: str) -> Optional[bytes]:
        """The bytes under ``key``, None when absent."""
        return self._values.get(key)

    def view(self, key: str) -> Optional[memoryview]:
        """A read-only view of the bytes under ``key``, None when absent."""
        value = self._values.get(key)
        return None if value is None else memoryview(value)


def memory_img_db(
    records: dict[str, dict[str, np.ndarray]], settings: tuple[float, int, int, int], path: str = "<memory img_db>"
) -> DetectFeatLmdb:
    """An img_db reader of ``records`` ({image key: npz fields features [n, 2048], norm_bb [n, 6], conf [n],
    soft_labels [n, 1601]}, as ``Extractor.extract`` / ``extract_boxes`` give them) stored with ``settings`` (conf_th,
    max_bb, min_bb, num_bb) by ``ImgDbWriter``, given boxes all kept (``keep_all``, as ``python -m uniter_fast.build``
    keeps them); an image it refuses is a DataError saying why."""
    store = MemoryStore(path)
    with ImgDbWriter(path, *settings, store=store) as writer:
        for name, arrays in records.items():
            fields = {k: arrays[k] for k in NPZ_FIELDS}
            writer.add(name, **fields, strict=True, keep_all=given_boxes_flag(arrays))
    return DetectFeatLmdb.from_store(store, writer.name2nbb, settings)


def memory_txt_writer(meta: dict, records: Iterable[Record], path: str = "<memory txt_db>") -> tuple:
    """(writer, store): ``records`` (``uniter_fast.data.task_db.Record``) added by a ``TxtDbWriter`` with ``meta``
    into an in-memory store, with the checks of ``task_db.add_records``; ``TxtTokLmdb.from_writer(writer, store)``
    (or a task's reader class) reads them."""
    store = MemoryStore(path)
    writer = TxtDbWriter(path, meta, store=store)
    add_records(writer, records)
    return writer, store
