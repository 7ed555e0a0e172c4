"""What a batch is made of: the stored records of its text-image pairs and the random draws of its task.

A :class:`PairRecord` holds one pair as stored (wordpieces and the image's fp16 arrays, read in place); the random
masks of a whole batch come from one generator (:func:`draw`). Both collate paths (the fast one of ``collate.py``
and the reference one of ``reference.py``) start from the same records and draws.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from uniter_fast.data.masking import mask_regions, mask_words
from uniter_fast.data.txt_db import TokenIds

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
MRM_TASKS = ("mrfr", "mrc", "mrckl")


def check_task(task: str) -> None:
    """Raise ``ValueError`` unless ``task`` is one of :data:`TASKS`."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


class PairRecord(NamedTuple):
    """One text-image pair as stored.

    wordpieces: int64 [w] (no [CLS]/[SEP]); features [n, 2048], norm_bb [n, 6] and (MRC tasks only) soft_labels
    [n, 1601] in the stored dtype (fp16), read-only and possibly views of the LMDB map; target: 1 = match,
    0 = negative (ITM), -1 for the other tasks.
    """

    txt_id: str
    img_fname: str
    wordpieces: np.ndarray
    features: np.ndarray
    norm_bb: np.ndarray
    soft_labels: Optional[np.ndarray]
    target: int


class Draws(NamedTuple):
    """The random draws of one batch: MLM ``words`` (masked wordpieces) and ``labels`` int64 [W]; MRM ``regions``
    bool [Σn]; None where the task draws nothing."""

    words: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    regions: Optional[np.ndarray] = None


def draw(task: str, records: list[PairRecord], rng: np.random.Generator, tokens: TokenIds, mask_prob: float) -> Draws:
    """The masks of a batch of ``task`` (see :mod:`uniter_fast.data.masking`); ITM draws nothing per batch."""
    check_task(task)
    if task == "mlm":
        lengths = np.array([r.wordpieces.size for r in records], dtype=np.int64)
        words, labels = mask_words(
            np.concatenate([r.wordpieces for r in records]), lengths, tokens.v_range, tokens.mask, rng, mask_prob
        )
        return Draws(words=words, labels=labels)
    if task == "itm":
        return Draws()
    num_bbs = np.array([r.features.shape[0] for r in records], dtype=np.int64)
    return Draws(regions=mask_regions(num_bbs, rng, mask_prob))
