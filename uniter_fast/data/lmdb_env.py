"""Fork-safe LMDB handles: an environment is opened lazily in the process that reads it.

LMDB environments must not be shared across ``fork`` (DataLoader workers), so readers keep only the path and reopen
the environment the first time a new process touches it.
"""

from __future__ import annotations

import os
from typing import Optional

import lmdb

MAP_SIZE = 4 * 1024**4
"""Map size of written databases (4 TiB, as the original ``TxtLmdb``); LMDB files are sparse, so this costs nothing."""


_OPEN: dict[str, tuple[int, lmdb.Environment, lmdb.Transaction]] = {}
"""Read-only environments of this process by real path: py-lmdb allows one open environment per path and process."""


def _read_txn(path: str) -> lmdb.Transaction:
    entry = _OPEN.get(path)
    if entry is not None and entry[0] == os.getpid():
        return entry[2]
    if entry is not None:  # inherited through fork: drop the parent's handle in this process, then reopen
        entry[1].close()
    env = lmdb.open(path, readonly=True, create=False, lock=False, readahead=False, max_readers=512)
    txn = env.begin(buffers=True)
    _OPEN[path] = (os.getpid(), env, txn)
    return txn


def close_reader(path: str) -> None:
    """Close this process's read handle of ``path`` (before rewriting a database in place)."""
    entry = _OPEN.pop(os.path.realpath(path), None)
    if entry is not None and entry[0] == os.getpid():
        entry[1].close()


class LazyReader:
    """Read-only LMDB access, opened on first use in each process (fork-safe, shared per path and process).

    ``get(key)`` returns a copy of the bytes stored under ``key`` (str), ``view(key)`` the bytes in place (a
    read-only memoryview of the map, valid while this process's handle is open); both give None for an absent key.
    """

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"LMDB directory {path!r} does not exist")
        self.path = path
        self._real = os.path.realpath(path)

    def get(self, key: str) -> Optional[bytes]:
        """A copy of the bytes stored under ``key``, or None."""
        raw = self.view(key)
        return None if raw is None else bytes(raw)

    def view(self, key: str) -> Optional[memoryview]:
        """The bytes stored under ``key`` without a copy, or None."""
        return _read_txn(self._real).get(key.encode("utf-8"))


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
