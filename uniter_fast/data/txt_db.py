"""txt_db: the original text database (``data/data.py`` ``TxtLmdb``, written by ``prepro.py``).

An LMDB directory whose values are lz4-frame-compressed msgpack dicts (``input_ids`` without [CLS]/[SEP],
``img_fname``, ...), with side files ``meta.json``, ``id2len.json``, ``txt2img.json`` and ``img2txts.json``.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any, NamedTuple, Optional, Union

import lz4.frame
import msgpack
import torch

from uniter_fast.data.lmdb_env import MAX_KEY_BYTES, LazyReader, Writer
from uniter_fast.data.side_files import count_table, read_side_file
from uniter_fast.errors import DataError
from uniter_fast.files import write_json_atomic

SPECIAL_IDS = ("CLS", "SEP", "MASK", "UNK")


def encode_txt_record(record: dict[str, Any]) -> bytes:
    """The stored bytes of one txt_db record: lz4.frame(msgpack(record))."""
    return lz4.frame.compress(msgpack.packb(record, use_bin_type=True))


def decode_txt_record(raw: bytes) -> dict[str, Any]:
    """Inverse of :func:`encode_txt_record`."""
    return msgpack.unpackb(lz4.frame.decompress(raw), raw=False)


class TokenIds(NamedTuple):
    """The special ids of a txt_db (``meta.json``) and ``v_range`` = [lo, hi) of the random MLM replacements; hi
    is the vocabulary size, so every stored wordpiece lies in [0, hi)."""

    cls: int
    sep: int
    mask: int
    v_range: tuple[int, int]


def check_meta(meta: Any, path: str) -> dict[str, Any]:
    """``meta`` (a txt_db's ``meta.json``) if it holds the integer ids ``CLS``, ``SEP``, ``MASK``, ``UNK`` and
    ``v_range`` = [lo, hi] with 0 <= lo <= hi; DataError naming the db otherwise."""
    where = f"txt_db meta file {os.path.join(path, 'meta.json')!r}"
    if not isinstance(meta, dict):
        raise DataError(f"{where} must be a JSON object, got {type(meta).__name__}")
    for key in SPECIAL_IDS:
        if type(meta.get(key)) is not int:
            raise DataError(f"{where}: {key!r} must be an integer id, got {meta.get(key)!r}")
    v_range = meta.get("v_range")
    if not (isinstance(v_range, list) and len(v_range) == 2 and all(type(v) is int for v in v_range)) or not (
        0 <= v_range[0] <= v_range[1]
    ):
        raise DataError(f"{where}: 'v_range' must be [lo, hi] with 0 <= lo <= hi, got {v_range!r}")
    return meta


def read_meta(path: str) -> dict[str, Any]:
    """The checked ``meta.json`` of the txt_db at ``path`` (:func:`check_meta`); a DataError naming the file when it
    is missing, not JSON or malformed."""
    return check_meta(read_side_file(os.path.join(path, "meta.json"), "txt_db meta file"), path)


class TxtTokLmdb:
    """Reader of a txt_db, as the original ``TxtTokLmdb``.

    Examples longer than ``max_txt_len`` wordpieces are dropped (not truncated); ``max_txt_len=-1`` keeps all.
    ``db[id]`` gives the stored dict; ``combine_inputs(ids)`` adds [CLS]/[SEP] and returns an int64 tensor [t].
    """

    def __init__(self, path: str, max_txt_len: int = 60) -> None:
        if not isinstance(max_txt_len, int) or (max_txt_len < 1 and max_txt_len != -1):
            raise ValueError(f"max_txt_len must be a positive int or -1, got {max_txt_len!r}")
        self.path = path
        id2len = count_table(os.path.join(path, "id2len.json"), "txt_db length file")
        self.id2len = id2len if max_txt_len == -1 else {k: n for k, n in id2len.items() if n <= max_txt_len}
        self.db = LazyReader(path)
        self._set_meta(read_meta(path))

    side_tables: Optional[dict[str, dict[str, Any]]] = None
    """``txt2img`` / ``img2txts`` of a reader over an in-memory store (None: read from the side files)."""

    @classmethod
    def from_writer(cls, writer: TxtDbWriter, store: Any) -> TxtTokLmdb:
        """A reader of what ``writer`` put into the in-memory ``store`` (``TxtDbWriter(path, meta, store=store)``),
        without a file: the same records, checks and ``combine_inputs`` as a reader of the LMDB would give."""
        reader = cls.__new__(cls)
        reader.path, reader.id2len, reader.db = writer.path, dict(writer.id2len), store
        reader.side_tables = {"txt2img": dict(writer.txt2img), "img2txts": dict(writer.img2txts)}
        TxtTokLmdb._set_meta(reader, check_meta(dict(writer.meta), writer.path))
        return reader

    def _set_meta(self, meta: dict[str, Any]) -> None:
        """The special ids of ``meta`` (checked) as attributes."""
        self.meta = meta
        self.cls_: int = meta["CLS"]
        self.sep: int = meta["SEP"]
        self.mask: int = meta["MASK"]
        self.unk: int = meta["UNK"]
        self.v_range: tuple[int, int] = tuple(meta["v_range"])
        self.token_ids = TokenIds(self.cls_, self.sep, self.mask, self.v_range)

    def __getitem__(self, id_: str) -> dict[str, Any]:
        raw = self.db.view(id_)
        if raw is None:
            raise DataError(f"txt_db {self.path!r}: text id {id_!r} is not in the database")
        try:
            record = decode_txt_record(raw)
        except Exception as exc:
            raise DataError(f"txt_db {self.path!r}: record {id_!r} is corrupted ({exc})") from exc
        if not isinstance(record, dict) or "input_ids" not in record or "img_fname" not in record:
            raise DataError(f"txt_db {self.path!r}: record {id_!r} lacks 'input_ids' or 'img_fname'")
        ids, fname = record["input_ids"], record["img_fname"]
        if not isinstance(ids, list) or not all(type(i) is int for i in ids):
            raise DataError(f"txt_db {self.path!r}: record {id_!r}: 'input_ids' must be a list of integers")
        if len(ids) == 0:
            raise DataError(f"txt_db {self.path!r}: record {id_!r} has an empty caption (no wordpieces)")
        if not isinstance(fname, str) and not (isinstance(fname, list) and all(isinstance(n, str) for n in fname)):
            raise DataError(f"txt_db {self.path!r}: record {id_!r}: 'img_fname' must be a name or a list of names")
        return record

    def combine_inputs(self, inputs: list[int]) -> torch.Tensor:
        """[CLS] + inputs + [SEP] as an int64 tensor [len(inputs) + 2]."""
        return torch.tensor([self.cls_, *inputs, self.sep], dtype=torch.int64)

    @property
    def txt2img(self) -> dict[str, str]:
        """Text id -> image key."""
        if self.side_tables is not None:
            return self.side_tables["txt2img"]
        return read_side_file(os.path.join(self.path, "txt2img.json"), "txt_db side file")

    @property
    def img2txts(self) -> dict[str, list[str]]:
        """Image key -> text ids."""
        if self.side_tables is not None:
            return self.side_tables["img2txts"]
        return read_side_file(os.path.join(self.path, "img2txts.json"), "txt_db side file")


class TxtDbWriter:
    """Writes a txt_db in the original layout; side files are written (atomically) on close.

    ``store``: an in-memory store (``uniter_fast.data.memory_db.MemoryStore``) that takes the records instead of an
    LMDB at ``path``; nothing is written to disk then, and the side tables stay on the writer.

    ``add(id_, input_ids, img_fname, **extra)`` stores one record; empty ``input_ids`` or a duplicate id is skipped
    with a count in ``skipped`` (the caller reports it), an id LMDB cannot store is a DataError. Use as a context
    manager.
    """

    def __init__(self, path: str, meta: dict[str, Any], store: Any = None) -> None:
        for key in (*SPECIAL_IDS, "v_range"):
            if key not in meta:
                raise ValueError(f"meta must contain {key!r}, got keys {sorted(meta)}")
        self.path = path
        self.meta = meta
        self._writer = Writer(path) if store is None else store
        self._on_disk = store is None
        self.id2len: dict[str, int] = {}
        self.txt2img: dict[str, str] = {}
        self.img2txts: dict[str, list[str]] = {}
        self.skipped: dict[str, int] = {"empty_caption": 0, "duplicate_id": 0}

    def add(self, id_: str, input_ids: list[int], img_fname: Union[str, list[str]], **extra: Any) -> bool:
        """Store one text; returns False (and counts it) when it is skipped. ``img_fname`` is one image key, or a list
        of them for texts about several images (NLVR2's pair, VCR's GT-box and detected-box images)."""
        if not id_ or len(id_.encode("utf-8")) > MAX_KEY_BYTES:
            raise DataError(f"text id {id_[:40]!r} is empty or longer than {MAX_KEY_BYTES} bytes (an LMDB key)")
        if id_ in self.id2len:
            self.skipped["duplicate_id"] += 1
            return False
        if len(input_ids) == 0:
            self.skipped["empty_caption"] += 1
            return False
        record = {"input_ids": [int(i) for i in input_ids], "img_fname": img_fname, **extra}
        self._writer.put(id_, encode_txt_record(record))
        self.id2len[id_] = len(input_ids)
        self.txt2img[id_] = img_fname
        for name in [img_fname] if isinstance(img_fname, str) else img_fname:
            self.img2txts.setdefault(name, []).append(id_)
        return True

    def close(self, exc: Optional[BaseException] = None) -> None:
        """Commit the LMDB and write the side files (nothing to do for an in-memory store)."""
        if not self._on_disk:
            return
        self._writer.close(commit=exc is None)
        if exc is None:
            write_json_atomic(os.path.join(self.path, "meta.json"), self.meta)
            write_json_atomic(os.path.join(self.path, "id2len.json"), self.id2len)
            write_json_atomic(os.path.join(self.path, "txt2img.json"), self.txt2img)
            write_json_atomic(os.path.join(self.path, "img2txts.json"), self.img2txts)

    def __enter__(self) -> TxtDbWriter:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close(exc)
