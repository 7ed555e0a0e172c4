"""Writing npz files safely: a hidden temp file per rank, then an atomic rename, so a file that exists is complete
(which is what makes a run resumable by skipping existing files)."""

from __future__ import annotations

import glob
import os

import numpy as np

from uniter_fast.files import atomic_write

TMP_SUFFIX = ".tmp-r{rank}"


def npz_path(out: str, name: str) -> str:
    """``out/<name>.npz``."""
    return os.path.join(out, name + ".npz")


def write_npz(out: str, name: str, record: dict[str, np.ndarray], rank: int = 0) -> str:
    """``np.savez_compressed`` of ``record`` to ``out/<name>.npz`` atomically, through a temporary file named
    ``.tmp-*-<name>.npz.tmp-r<rank>``."""
    final = npz_path(out, name)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **record)

    atomic_write(final, write, tmp_suffix=TMP_SUFFIX.format(rank=rank))
    return final


def remove_stale_temps(out: str, rank: int = 0) -> int:
    """Delete temp files an interrupted run of this ``rank`` left in ``out``; returns how many."""
    stale = glob.glob(os.path.join(glob.escape(out), ".tmp-*.npz" + TMP_SUFFIX.format(rank=rank)))
    for path in stale:
        os.unlink(path)
    return len(stale)
