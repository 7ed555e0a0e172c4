"""Fork-safe LMDB handles, checked at open: an environment is opened lazily in the process that reads it.

LMDB environments must not be shared across ``fork`` (DataLoader workers), so readers keep only the path and reopen
the environment the first time a new process touches it. LMDB maps ``data.mdb`` into memory: a page read past the end
of a truncated file kills the process with SIGBUS. So every open compares the file's size with the pages its meta
page says are in use (``last_pgno + 1`` pages of ``psize`` bytes; a stat and two reads of the meta page, microseconds),
and every LMDB error, at open or on a read, becomes a :class:`~uniter_fast.errors.DataError` naming the database
(and the record).

What no check at open can see, LMDB having no checksums: a flipped byte inside a stored value reads as other data
(the record decoders catch most such damage), and a flipped size, flag or offset inside LMDB's own page structure can
still make LMDB read past the end of the file (py-lmdb touches every page of a value as it returns it).
"""

from __future__ import annotations

import os
from typing import Optional

import lmdb

from uniter_fast.errors import DataError

MAP_SIZE = 4 * 1024**4
"""Map size of written databases (4 TiB, as the original ``TxtLmdb``); LMDB files are sparse, so this costs nothing."""

DATA_FILE = "data.mdb"
MAX_KEY_BYTES = 511
"""The longest key LMDB stores (its default ``MDB_MAXKEYSIZE``); an empty key is refused too."""


_OPEN: dict[str, _Handle] = {}
"""Read-only environments of this process by real path: py-lmdb allows one open environment per path and process."""


class _Handle:
    """This process's read-only environment of one database and its read transaction, opened after checking that
    ``data.mdb`` holds every page LMDB will read (DataError naming the path otherwise)."""

    def __init__(self, path: str) -> None:
        self.pid = os.getpid()
        data_file = os.path.join(path, DATA_FILE)
        if not os.path.isfile(data_file):
            raise DataError(f"LMDB {path!r} has no {DATA_FILE} (not a database, or one whose build did not finish)")
        try:
            self.env = lmdb.open(path, readonly=True, create=False, lock=False, readahead=False, max_readers=512)
        except lmdb.Error as exc:
            raise DataError(f"LMDB {path!r} is corrupted or not an LMDB database ({exc}); rebuild it") from None
        try:
            size = os.path.getsize(data_file)
            need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]
            if size < need:
                raise DataError(
                    f"LMDB {path!r} is truncated or damaged: {DATA_FILE} holds {size} bytes, its pages need "
                    f"{need}; copy it again or rebuild it"
                )
            self.txn = self.env.begin(buffers=True)
        except lmdb.Error as exc:
            self.env.close()
            raise DataError(f"LMDB {path!r} is corrupted ({exc}); rebuild it") from None
        except BaseException:
            self.env.close()
            raise


def _handle(path: str) -> _Handle:
    entry = _OPEN.get(path)
    if entry is not None and entry.pid == os.getpid():
        return entry
    if entry is not None:  # inherited through fork: drop the parent's handle in this process, then reopen
        entry.env.close()
        del _OPEN[path]
    entry = _OPEN[path] = _Handle(path)
    return entry


def close_reader(path: str) -> None:
    """Close this process's read handle of ``path`` (before rewriting a database in place)."""
    entry = _OPEN.pop(os.path.realpath(path), None)
    if entry is not None and entry.pid == os.getpid():
        entry.env.close()


class LazyReader:
    """Read-only LMDB access, opened and checked on construction and on first use in each process (fork-safe,
    shared per path and process).

    ``get(key)`` returns a copy of the bytes stored under ``key`` (str), ``view(key)`` the bytes in place (a
    read-only memoryview of the map, valid while this process's handle is open); both give None for an absent key.
    A truncated or corrupted database, or a record that cannot be read, is a :class:`DataError` naming the path (and
    the key).
    """

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"LMDB directory {path!r} does not exist")
        self.path = path
        self._real = os.path.realpath(path)
        _handle(self._real)

    def get(self, key: str) -> Optional[bytes]:
        """A copy of the bytes stored under ``key``, or None."""
        raw = self.view(key)
        return None if raw is None else bytes(raw)

    def view(self, key: str) -> Optional[memoryview]:
        """The bytes stored under ``key`` without a copy, or None."""
        handle = _handle(self._real)
        try:
            raw = handle.txn.get(key.encode("utf-8"))
        except lmdb.Error as exc:
            raise DataError(f"LMDB {self.path!r}: record {key!r} cannot be read ({exc}); rebuild it") from None
        return raw


class Writer:
    """Write-once LMDB with a commit every ``commit_every`` puts (1000, as the original ``TxtLmdb``).

    ``close(commit)`` commits or aborts the last transaction.
    """

    def __init__(self, path: str, commit_every: int = 1000) -> None:
        os.makedirs(path, exist_ok=True)
        close_reader(path)
        self.env = lmdb.open(path, readonly=False, create=True, map_size=MAP_SIZE, lock=True)
        self.txn = self.env.begin(write=True)
        self.commit_every = commit_every
        self._count = 0

    def put(self, key: str, value: bytes) -> None:
        """Store ``value`` under ``key`` (utf-8)."""
        self.txn.put(key.encode("utf-8"), value)
        self._count += 1
        if self._count % self.commit_every == 0:
            self.txn.commit()
            self.txn = self.env.begin(write=True)

    def close(self, commit: bool = True) -> None:
        """Commit (or abort) the open transaction and close the environment."""
        if commit:
            self.txn.commit()
        else:
            self.txn.abort()
        self.env.sync()
        self.env.close()
