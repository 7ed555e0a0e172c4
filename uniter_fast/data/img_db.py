"""img_db: the original region-feature database (``data/data.py`` ``DetectFeatLmdb``, ``scripts/convert_imgdir.py``).

LMDB directory ``feat_th{conf_th}_max{max_bb}_min{min_bb}[_compressed]`` (or ``feat_numbb{num_bb}``) under an image
dir; key = image file name, value = msgpack(msgpack_numpy) dict of fp16 arrays ``features`` [n, 2048], ``norm_bb``
[n, 6], ``conf`` [n], ``soft_labels`` [n, 1601] (or ``np.savez_compressed`` bytes for the compressed variant);
``__keys__`` holds a JSON list of names; the side file ``nbb_th{conf_th}_max{max_bb}_min{min_bb}.json`` maps
name -> number of boxes used.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from types import TracebackType
from typing import Any, Optional

import msgpack
import msgpack_numpy
import numpy as np
import torch
from tqdm import tqdm

from uniter_fast.config import GIVEN_BOXES_FIELD, IMG_DIM, IMG_LABEL_DIM
from uniter_fast.data.lmdb_env import LazyReader, Writer
from uniter_fast.data.record_views import array_views
from uniter_fast.data.side_files import count_table
from uniter_fast.errors import ConfigError, DataError
from uniter_fast.files import write_json_atomic

FIELDS = {"features": IMG_DIM, "norm_bb": 6, "soft_labels": IMG_LABEL_DIM}
NPZ_FIELDS = ("features", "norm_bb", "conf", "soft_labels")


def load_npz(path: str) -> dict[str, Any]:
    """The arrays :data:`NPZ_FIELDS` of one image's ``.npz`` file (BUTD / ``python -m uniter_fast.extract`` output),
    unchecked, and ``keep_all``: True when the file holds given boxes (its ``given_boxes`` flag), whose rows are all
    kept. An unreadable file (not a zip, a damaged member, a pickled array) or a missing array is a DataError naming
    the file."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in NPZ_FIELDS if k not in npz.files]
            if missing:
                raise DataError(f"features: {path!r} lacks the arrays {missing}")
            return {**{k: npz[k] for k in NPZ_FIELDS}, "keep_all": given_boxes_flag(npz)}
    except DataError:
        raise
    except Exception as exc:  # zipfile, zlib, numpy format and OS errors alike mean "cannot be read"
        raise DataError(f"features: {path!r} is unreadable ({type(exc).__name__}: {exc})") from None


def given_boxes_flag(arrays: Any) -> bool:
    """Whether the npz fields ``arrays`` (an open npz or a dict, as ``Extractor.extract_boxes`` gives them) hold
    given boxes (the 0-d bool ``given_boxes``), whose rows the img_db writer all keeps (``keep_all``)."""
    names = arrays.files if hasattr(arrays, "files") else arrays
    return GIVEN_BOXES_FIELD in names and bool(np.asarray(arrays[GIVEN_BOXES_FIELD]).all())


def compute_num_bb(conf: np.ndarray, conf_th: float, min_bb: int, max_bb: int, num_bb: int = 36) -> int:
    """Boxes used for one image: clamp(#(conf > conf_th), min_bb, max_bb), or ``num_bb`` when conf_th == -1."""
    if conf_th == -1:
        return num_bb
    return int(min(max_bb, max(min_bb, int((np.asarray(conf) > conf_th).sum()))))


def check_box_settings(conf_th: float, max_bb: int, min_bb: int, num_bb: int) -> None:
    """A ``ConfigError`` unless the box settings can select boxes: ``conf_th`` in [0, 1] or -1 (a fixed ``num_bb``
    >= 1 per image), 1 <= ``min_bb`` <= ``max_bb`` (the names of ``build``'s options and of the run configs)."""
    if not (0 <= conf_th <= 1 or conf_th == -1):
        raise ConfigError(f"conf_th: expected a confidence in [0, 1] or -1 (num_bb boxes per image), got {conf_th}")
    if min_bb < 1 or max_bb < min_bb:
        raise ConfigError(f"min_bb, max_bb: need 1 <= min_bb <= max_bb, got min_bb={min_bb}, max_bb={max_bb}")
    if conf_th == -1 and num_bb < 1:
        raise ConfigError(f"num_bb: expected an integer >= 1 with conf_th -1, got {num_bb}")


def db_name(conf_th: float, max_bb: int, min_bb: int, num_bb: int, compress: bool) -> str:
    """The LMDB sub-directory name the original code uses for these settings."""
    name = f"feat_numbb{num_bb}" if conf_th == -1 else f"feat_th{conf_th}_max{max_bb}_min{min_bb}"
    return name + "_compressed" if compress else name


def nbb_name(conf_th: float, max_bb: int, min_bb: int) -> str:
    """The side-file name holding name -> nbb."""
    return f"nbb_th{conf_th}_max{max_bb}_min{min_bb}.json"


def encode_img_record(dump: dict[str, np.ndarray], compress: bool) -> bytes:
    """The stored bytes of one image: msgpack_numpy dict, or ``np.savez_compressed`` bytes when ``compress``."""
    if compress:
        with io.BytesIO() as buf:
            np.savez_compressed(buf, **dump)
            return buf.getvalue()
    return msgpack.packb(dump, default=msgpack_numpy.encode, use_bin_type=True)


def decode_img_record(raw: bytes, compress: bool) -> dict[str, np.ndarray]:
    """Inverse of :func:`encode_img_record`."""
    if compress:
        with io.BytesIO(raw) as buf, np.load(buf, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    return msgpack.unpackb(raw, object_hook=msgpack_numpy.decode, raw=False)


def _kind(value: Any) -> str:
    """What ``value`` is, for messages: an array's dtype or a Python type's name."""
    return f"dtype {value.dtype}" if isinstance(value, np.ndarray) else type(value).__name__


def validate_dump(name: str, dump: dict[str, Any], need_soft_labels: bool = True) -> int:
    """Check one image's arrays; returns the number of boxes n, or raises DataError naming the image."""
    if not isinstance(dump, dict) or "features" not in dump or "norm_bb" not in dump:
        raise DataError(f"image {name!r}: record lacks 'features' or 'norm_bb'")
    keys = ("features", "norm_bb", "soft_labels") if need_soft_labels else ("features", "norm_bb")
    n = None
    for key in keys:
        arr = dump.get(key)
        if arr is None:
            raise DataError(f"image {name!r}: record lacks {key!r}")
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise DataError(f"image {name!r}: {key} must be a floating-point array, got {_kind(arr)}")
        if arr.ndim != 2 or arr.shape[1] != FIELDS[key]:
            raise DataError(f"image {name!r}: {key} must have shape [n, {FIELDS[key]}], got {tuple(arr.shape)}")
        if n is not None and arr.shape[0] != n:
            raise DataError(f"image {name!r}: {key} has {arr.shape[0]} rows, features has {n}")
        n = arr.shape[0]
    if n == 0:
        raise DataError(f"image {name!r}: zero boxes")
    return int(n)


class RejectedImage(DataError):
    """An image the img_db writers refuse; ``kind`` is the skip count it goes to ("bad_shape", "non_finite")."""

    def __init__(self, kind: str, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind


def stored_image(
    name: str,
    features: np.ndarray,
    norm_bb: np.ndarray,
    conf: np.ndarray,
    soft_labels: np.ndarray,
    settings: tuple[float, int, int, int],
    keep_all: bool = False,
) -> dict[str, np.ndarray]:
    """What an img_db stores for one image (``convert_imgdir.py``): the arrays features [n, 2048], norm_bb [n, 6],
    conf [n] and soft_labels [n, 1601] (any float dtype) checked, cut to the image's nbb rows (:func:`compute_num_bb`
    with ``settings`` = (conf_th, max_bb, min_bb, num_bb); every row with ``keep_all``, for given boxes, unless conf_th
    is -1, when num_bb caps every image) and cast to float16. :class:`RejectedImage` says why an image cannot be
    stored (misshapen or non-float arrays, NaN/inf after the cast)."""
    conf_th, max_bb, min_bb, num_bb = settings
    dump = {"features": features, "norm_bb": norm_bb, "soft_labels": soft_labels}
    dump = {k: np.asarray(v) for k, v in dump.items()}
    conf = np.asarray(conf).reshape(-1)
    try:
        n = validate_dump(name, dump)
    except DataError as exc:
        raise RejectedImage("bad_shape", str(exc)) from None
    if conf.dtype.kind != "f" or conf.shape[0] != n:
        raise RejectedImage(
            "bad_shape", f"image {name!r}: conf must be {n} floating-point values, got {conf.shape[0]} of {_kind(conf)}"
        )
    counted = compute_num_bb(conf, conf_th, min_bb, max_bb, num_bb)
    nbb = n if keep_all and conf_th != -1 else min(n, counted)
    dump["conf"] = conf
    with np.errstate(over="ignore"):  # values beyond float16 become inf, refused just below
        stored = {k: a[:nbb].astype(np.float16) for k, a in dump.items()}
    if not all(np.isfinite(a).all() for a in (*dump.values(), *stored.values())):
        raise RejectedImage("non_finite", f"image {name!r} has NaN/inf values (or values beyond float16)")
    return stored


def image_tensors(stored: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_feat float32 [n, 2048], img_pos_feat float32 [n, 7]) of an image's stored arrays, as the readers give
    them to the datasets (``DetectFeatLmdb[name]``)."""
    features = torch.from_numpy(np.asarray(stored["features"], dtype=np.float32))
    return features, box_7d(torch.from_numpy(np.asarray(stored["norm_bb"], dtype=np.float32)))


class DetectFeatLmdb:
    """Reader of an img_db, as the original ``DetectFeatLmdb`` (``path`` is the image dir holding the LMDB).

    ``db[name]`` -> (img_feat [nbb, 2048] float32, img_pos_feat [nbb, 7] float32), 7-d box = norm_bb + w*h.
    ``get_dump(name)`` -> dict of float32 arrays cut to nbb rows (includes ``soft_labels`` [nbb, 1601]).
    ``views(name, fields)`` -> the stored (fp16) arrays cut to nbb rows, without copying or decoding other fields.
    """

    def __init__(
        self,
        path: str,
        conf_th: float = 0.2,
        max_bb: int = 100,
        min_bb: int = 10,
        num_bb: int = 36,
        compress: bool = False,
    ) -> None:
        check_box_settings(conf_th, max_bb, min_bb, num_bb)
        self.path = path
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.compress = compress
        name = db_name(conf_th, max_bb, min_bb, num_bb, compress)
        nbb_path = os.path.join(path, nbb_name(conf_th, max_bb, min_bb))
        self.name2nbb: Optional[dict[str, int]] = None
        if conf_th != -1 and os.path.exists(nbb_path):
            self.name2nbb = count_table(nbb_path, "img_db box-count file", minimum=1)
        elif conf_th != -1:
            name = "all_compressed" if compress else "all"
            if not os.path.isdir(os.path.join(path, name)):
                raise DataError(
                    f"img_db {path!r} has neither the box-count file {nbb_path!r} nor an {name!r} database (are "
                    "conf_th, max_bb and min_bb the ones it was built with?)"
                )
        self.db = LazyReader(os.path.join(path, name))
        if self.name2nbb is None:
            self.name2nbb = self._compute_nbb()

    @classmethod
    def from_store(
        cls, store: Any, name2nbb: dict[str, int], settings: tuple[float, int, int, int], compress: bool = False
    ) -> DetectFeatLmdb:
        """A reader of the images an in-memory ``store`` (``uniter_fast.data.memory_db.MemoryStore``) holds, with
        their box counts ``name2nbb`` and the box ``settings`` (conf_th, max_bb, min_bb, num_bb) they were stored
        with: the same arrays and checks as a reader of the LMDB would give, without a file."""
        reader = cls.__new__(cls)
        reader.path, reader.db, reader.compress, reader.name2nbb = store.path, store, compress, dict(name2nbb)
        reader.conf_th, reader.max_bb, reader.min_bb, reader.num_bb = settings
        return reader

    def _keys(self) -> list[str]:
        raw = self.db.get("__keys__")
        if raw is None:
            raise DataError(f"img_db {self.db.path!r} has no '__keys__' record")
        try:
            keys = json.loads(raw)
        except ValueError as exc:
            raise DataError(f"img_db {self.db.path!r}: the '__keys__' record is not JSON ({exc})") from None
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise DataError(f"img_db {self.db.path!r}: the '__keys__' record must be a JSON list of image names")
        return keys

    def _compute_nbb(self) -> dict[str, int]:
        if self.conf_th == -1:
            return {k: self.num_bb for k in self._keys()}
        name2nbb = {}
        for fname in tqdm(self._keys(), desc="counting boxes", leave=False):
            conf = self._load(fname)["conf"]
            name2nbb[fname] = compute_num_bb(conf, self.conf_th, self.min_bb, self.max_bb)
        return name2nbb

    def __contains__(self, name: str) -> bool:
        return name in self.name2nbb

    def _raw(self, name: str) -> memoryview:
        raw = self.db.view(name)
        if raw is None:
            raise DataError(f"img_db {self.path!r}: image {name!r} is not in the database")
        return raw

    def _load(self, name: str, raw: Optional[memoryview] = None) -> dict[str, np.ndarray]:
        raw = self._raw(name) if raw is None else raw
        try:
            return decode_img_record(raw, self.compress)
        except Exception as exc:
            raise DataError(f"img_db {self.path!r}: image {name!r} is corrupted ({exc})") from exc

    def _validate(self, name: str, dump: Any, soft_labels: bool) -> int:
        """:func:`validate_dump` with the database named in its error."""
        try:
            return validate_dump(name, dump, need_soft_labels=soft_labels)
        except DataError as exc:
            raise DataError(f"img_db {self.path!r}: {exc}") from None

    def _nbb(self, name: str, rows: int) -> int:
        """The box count of ``name``, whose record holds ``rows`` boxes (with ``conf_th`` -1, ``num_bb`` is a cap)."""
        nbb = self.name2nbb.get(name)
        if nbb is None:
            raise DataError(f"img_db {self.path!r}: image {name!r} has no entry in the nbb file")
        if nbb > rows and self.conf_th != -1:
            raise DataError(f"img_db {self.path!r}: image {name!r} has {rows} boxes, its nbb file entry says {nbb}")
        return nbb

    def views(self, name: str, fields: tuple[str, ...] = ("features", "norm_bb")) -> dict[str, np.ndarray]:
        """The stored arrays ``fields`` (of features [n, 2048], norm_bb [n, 6], soft_labels [n, 1601]) of ``name``,
        cut to its nbb rows, in their stored dtype (fp16), read-only.

        Uncompressed records are read in place (views of the LMDB map, valid while this process's read handle is
        open) and only the asked fields are located; other records are decoded. DataError names a missing or bad
        image.
        """
        raw = self._raw(name)
        found = None if self.compress else array_views(raw, fields)
        dump = found if found is not None else self._load(name, raw)
        nbb = self._nbb(name, self._validate(name, dump, "soft_labels" in fields))
        return {k: dump[k][:nbb] for k in fields}

    def get_dump(self, name: str, soft_labels: bool = True) -> dict[str, np.ndarray]:
        """float32 arrays of ``name`` cut to its nbb rows; DataError naming the image if it is missing or bad."""
        dump = self._load(name)
        nbb = self._nbb(name, self._validate(name, dump, soft_labels))
        keys = FIELDS if soft_labels else ("features", "norm_bb")
        return {k: dump[k][:nbb].astype(np.float32) for k in keys}

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return image_tensors(self.get_dump(name, soft_labels=False))


def box_7d(norm_bb: torch.Tensor) -> torch.Tensor:
    """[n, 6] (x1, y1, x2, y2, w, h) -> [n, 7] with w*h appended, same dtype."""
    return torch.cat([norm_bb, norm_bb[:, 4:5] * norm_bb[:, 5:6]], dim=-1)


class ImgDbWriter:
    """Writes an img_db as ``scripts/convert_imgdir.py`` does: arrays stored fp16 and cut to nbb rows.

    ``add(name, features, norm_bb, conf, soft_labels)`` validates and stores one image; bad images (wrong shapes,
    zero boxes, non-finite values) are skipped with a warning and counted in ``skipped``. Use as a context manager.
    ``store``: an in-memory store (``uniter_fast.data.memory_db.MemoryStore``) that takes the records instead of an
    LMDB under ``path``; nothing is written to disk then.
    """

    def __init__(
        self,
        path: str,
        conf_th: float = 0.2,
        max_bb: int = 100,
        min_bb: int = 10,
        num_bb: int = 36,
        compress: bool = False,
        store: Any = None,
    ) -> None:
        check_box_settings(conf_th, max_bb, min_bb, num_bb)
        self.path = path
        self.conf_th, self.max_bb, self.min_bb, self.num_bb = conf_th, max_bb, min_bb, num_bb
        self.compress = compress
        self._on_disk = store is None
        self._writer = (
            Writer(os.path.join(path, db_name(conf_th, max_bb, min_bb, num_bb, compress))) if store is None else store
        )
        self.name2nbb: dict[str, int] = {}
        self.skipped: dict[str, int] = {"bad_shape": 0, "non_finite": 0, "duplicate": 0}

    def add(
        self,
        name: str,
        features: np.ndarray,
        norm_bb: np.ndarray,
        conf: np.ndarray,
        soft_labels: np.ndarray,
        strict: bool = False,
        keep_all: bool = False,
    ) -> bool:
        """Store one image (features [n, 2048], norm_bb [n, 6], conf [n], soft_labels [n, 1601]; any float dtype).

        ``keep_all`` (given boxes): every row is used, whatever conf_th, min_bb and max_bb say (with conf_th -1,
        ``num_bb`` still caps every image: that db keeps no per-image count).

        Returns False, with a warning and a count, when the image is skipped (duplicate name, missing or misshapen
        array, not floating point, NaN/inf after the fp16 cast); with ``strict``, raises a DataError saying why.
        """
        if name in self.name2nbb:
            return self._skip("duplicate", f"duplicate image {name!r}", strict)
        settings = (self.conf_th, self.max_bb, self.min_bb, self.num_bb)
        try:
            stored = stored_image(name, features, norm_bb, conf, soft_labels, settings, keep_all)
        except RejectedImage as exc:
            return self._skip(exc.kind, str(exc), strict)
        self._writer.put(name, encode_img_record(stored, self.compress))
        self.name2nbb[name] = int(stored["features"].shape[0])
        return True

    def _skip(self, kind: str, reason: str, strict: bool) -> bool:
        """Count and warn about a skipped image (False), or raise ``reason`` as a DataError when ``strict``."""
        if strict:
            raise DataError(reason)
        self.skipped[kind] += 1
        warnings.warn(f"img_db writer: skipped ({reason})", stacklevel=3)
        return False

    def close(self, exc: Optional[BaseException] = None) -> None:
        """Write ``__keys__``, commit, and write the nbb side file (an in-memory store: nothing to do)."""
        if not self._on_disk:
            return
        if exc is None:
            self._writer.put("__keys__", json.dumps(list(self.name2nbb)).encode("utf-8"))
        self._writer.close(commit=exc is None)
        if exc is None and self.conf_th != -1:
            write_json_atomic(os.path.join(self.path, nbb_name(self.conf_th, self.max_bb, self.min_bb)), self.name2nbb)

    def __enter__(self) -> ImgDbWriter:
        return self

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close(exc)
