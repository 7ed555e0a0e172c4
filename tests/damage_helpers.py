"""Small databases, feature files and annotations to damage, the damage itself, and the reader process that reads a
damaged database where a signal cannot kill pytest (``tests/damage_worker.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Optional

import lmdb
import numpy as np

from uniter_fast.config import IMG_DIM, IMG_LABEL_DIM
from uniter_fast.data import ImgDbWriter, TxtDbWriter
from uniter_fast.data.tokenizer import SPECIAL_TOKENS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
META = {"bert": "test", "CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "v_range": [5, 50]}
IMG_LMDB = "feat_th0.2_max100_min10"  # the img_db sub-directory of the default box settings
WORDS = ["a", "dog", "cat", "red", "on", "the", "mat", "."]


def image_arrays(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """One image's BUTD arrays with ``n`` boxes (float16, as the extractor writes them)."""
    x1, y1 = rng.random((2, n)) * 0.5
    w, h = rng.random((2, n)) * 0.4 + 0.05
    soft = rng.random((n, IMG_LABEL_DIM))
    return {
        "features": rng.random((n, IMG_DIM)).astype(np.float16),
        "norm_bb": np.stack([x1, y1, x1 + w, y1 + h, w, h], 1).astype(np.float16),
        "conf": np.sort(rng.random(n))[::-1].astype(np.float16),
        "soft_labels": (soft / soft.sum(1, keepdims=True)).astype(np.float16),
    }


def write_pair(root: str, seed: int = 0, images: int = 3, texts: int = 8) -> tuple[str, str]:
    """A small txt_db (``root/txt``) and img_db (``root/img``, default box settings); returns their paths."""
    rng = np.random.default_rng(seed)
    txt, img = os.path.join(root, "txt"), os.path.join(root, "img")
    with ImgDbWriter(img) as w:
        for i in range(images):
            w.add(f"im{i}.npz", **image_arrays(rng, 12 + i))
    with TxtDbWriter(txt, META) as w:
        for i in range(texts):
            w.add(f"t{i}", rng.integers(5, 50, 3 + i).tolist(), f"im{i % images}.npz")
    return txt, img


def write_npz_dir(directory: str, names: list[str], seed: int = 0) -> None:
    """One ``<name>.npz`` of image arrays per name (``np.savez_compressed``, as the extractor)."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    for i, name in enumerate(names):
        np.savez_compressed(os.path.join(directory, name + ".npz"), **image_arrays(rng, 11 + i))


def write_vocab(path: str) -> str:
    """A WordPiece vocabulary of the special tokens, "!" and :data:`WORDS`."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(SPECIAL_TOKENS + ["!"] + WORDS + ["##s"]) + "\n")
    return path


def write_jsonl(path: str, rows: list[dict[str, Any]]) -> str:
    """``rows`` as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return path


def truncate(path: str, size: int) -> None:
    """Cut the file ``path`` to ``size`` bytes."""
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_bits(path: str, flips: list[tuple[int, int]]) -> None:
    """Flip bit ``bit`` of byte ``offset`` for every (offset, bit) of ``flips``."""
    with open(path, "r+b") as f:
        for offset, bit in flips:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ (1 << bit)]))


def put_record(lmdb_dir: str, key: str, value: bytes) -> None:
    """Store ``value`` under ``key`` in the LMDB ``lmdb_dir`` (a record replaced behind the reader's back)."""
    env = lmdb.open(lmdb_dir, map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(key.encode(), value)
    env.close()


def leftovers(parent: str) -> list[str]:
    """Temporary build directories (``.tmp-*``) left in ``parent``."""
    return [n for n in os.listdir(parent) if n.startswith(".tmp-")]


class ReaderProcess:
    """``tests/damage_worker.py`` in a child process: ``read(txt, img)`` gives its answer, or ``{"signal": n}`` /
    ``{"exit": code}`` when the read killed it (it is restarted for the next read)."""

    def __init__(self) -> None:
        self._proc: Optional[subprocess.Popen] = None

    def _start(self) -> subprocess.Popen:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
        return subprocess.Popen(
            [sys.executable, "-m", "tests.damage_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=REPO,
            env=env,
        )

    def read(self, txt: str, img: str) -> dict[str, Any]:
        """Every record of the two databases, or the error (or signal) reading them gave."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        try:
            self._proc.stdin.write(json.dumps({"txt": txt, "img": img}) + "\n")
            self._proc.stdin.flush()
            line = self._proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if line:
            return json.loads(line)
        code = self._proc.wait()
        self._proc = None
        return {"signal": -code} if code < 0 else {"exit": code}

    def close(self) -> None:
        """Stop the child."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=30)
        self._proc = None
