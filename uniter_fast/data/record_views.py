"""Zero-copy views of the arrays in an img_db record (a msgpack map of msgpack_numpy arrays).

``msgpack.unpackb`` copies every binary field of a record, the 1601-wide soft labels included, before one value is
used. :func:`array_views` instead locates the arrays of the asked fields inside the record's buffer (an LMDB
memoryview) and returns numpy views of it: no copy, and the other fields are skipped by their byte length. It reads
the layout msgpack_numpy (0.4.x) writes, the one of the original img_dbs and of :class:`~uniter_fast.data.img_db.
ImgDbWriter`: a map of name -> {nd: True, type: dtype str, kind: '', shape: [...], data: bin}, keys as str or bin.
Any other layout gives None and the caller decodes the record with ``msgpack``.
"""

from __future__ import annotations

import math
import re
import struct
from typing import Any, Optional

import msgpack
import numpy as np


def _key(name: bytes) -> bytes:
    """Pattern of the map key ``name`` written as bin8 (msgpack_numpy's keys) or as fixstr."""
    return b"(?:" + re.escape(bytes([0xC4, len(name)])) + b"|" + re.escape(bytes([0xA0 + len(name)])) + b")" + name


_ENTRY = re.compile(
    rb"(?:\xc4.|\xd9.|[\xa0-\xbf])(\w+)"  # the field name (str or bin)
    rb"\x85"  # its array: a map of 5 entries
    + _key(b"nd")
    + rb"\xc3"
    + _key(b"type")
    + rb"(?:\xc4.|[\xa0-\xbf])([<>|=]?[A-Za-z]\d*)"
    + _key(b"kind")
    + rb"(?:\xc4\x00|\xa0)"
    + _key(b"shape")
    + rb"([\x90-\x9f].*?)"
    + _key(b"data")
    + rb"(?:\xc4(.)|\xc5(..)|\xc6(....))",
    re.DOTALL,
)
_DTYPES: dict[bytes, np.dtype] = {}


def _dtype(code: bytes) -> Optional[np.dtype]:
    if code not in _DTYPES:
        try:
            _DTYPES[code] = np.dtype(code.decode("ascii"))
        except TypeError:
            return None
    return _DTYPES[code]


def _entry(buf: memoryview, pos: int, size: int) -> Optional[tuple[str, Any, int]]:
    """The field at ``pos``: (name, (dtype, shape, data offset) or None if unreadable, position after it)."""
    match = _ENTRY.match(buf, pos)
    if match is None:
        return None
    name, code, shape_bytes, len8, len16, len32 = match.groups()
    length = len8[0] if len8 is not None else struct.unpack(">H" if len16 is not None else ">I", len16 or len32)[0]
    start = match.end()
    try:
        shape = msgpack.unpackb(shape_bytes)
    except (ValueError, msgpack.ExtraData):
        return None
    dtype = _dtype(code)
    if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        return None
    if math.prod(shape) * dtype.itemsize != length or start + length > size:
        return None
    return name.decode("ascii"), (dtype, shape, start), start + length


def array_views(raw: Any, fields: tuple[str, ...]) -> Optional[dict[str, np.ndarray]]:
    """Read-only numpy views of ``fields`` of the msgpack_numpy record ``raw`` (bytes or memoryview), or None when
    the record has another layout (then decode it with ``msgpack``). Fields missing from the record are left out;
    the walk stops at the last asked field.

    The views share memory with ``raw``: an LMDB buffer must stay valid (its read transaction open) while they are
    used.
    """
    buf = memoryview(raw).cast("B")
    if not buf or buf[0] & 0xF0 != 0x80:  # a fixmap: at most 15 fields
        return None
    out, pos, size = {}, 1, len(buf)
    for _ in range(buf[0] & 0x0F):
        entry = _entry(buf, pos, size)
        if entry is None:
            return None
        name, (dtype, shape, start), pos = entry
        if name in fields:
            out[name] = np.frombuffer(buf, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
            if len(out) == len(fields):  # the rest of the record is never read
                break
    return out
