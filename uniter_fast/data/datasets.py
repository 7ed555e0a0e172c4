"""Per-task datasets over a txt_db and an img_db (the original ``data/mlm.py``, ``data/mrm.py``, ``data/itm.py``).

``dataset[i]`` is the stored record of pair i (:class:`~uniter_fast.data.records.PairRecord`: wordpieces and the
image's fp16 arrays, read in place, only the fields the task uses); ``dataset.batch(indices, position)`` masks and
collates a batch. The random draws of a batch come from one generator seeded by (seed, epoch, rank, position of the
batch in its epoch), so a batch looks the same in any worker process and after a resume; call ``set_epoch(e)``
before building batches of epoch ``e``. ``reference_batch`` builds the same batch through the reference path
(:mod:`uniter_fast.data.reference`). Texts whose image is missing from the img_db are skipped at construction with
one warning and counted in ``skipped``; a missing or corrupted record met while reading raises :class:`DataError`
naming the text and image.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from uniter_fast.data.collate import collate
from uniter_fast.data.img_db import DetectFeatLmdb
from uniter_fast.data.masking import MASK_PROB
from uniter_fast.data.records import Draws, PairRecord, draw
from uniter_fast.data.reference import reference_collate, reference_items
from uniter_fast.data.txt_db import TokenIds, TxtTokLmdb
from uniter_fast.errors import DataError


def batch_generator(seed: int, epoch: int, rank: int, position: int) -> np.random.Generator:
    """The generator of the random draws of batch ``position`` of ``epoch`` on ``rank``."""
    return np.random.default_rng([seed, epoch, rank, position])


class TaskBatches:
    """``batch`` / ``reference_batch`` for a task dataset: needs ``self[i]`` (a PairRecord), ``task``, ``seed``,
    ``epoch``, ``token_ids`` and ``mask_prob``."""

    task: str
    seed: int
    epoch: int
    mask_prob: float
    token_ids: TokenIds

    def _records_and_draws(self, indices: list[int], position: int, rank: int) -> tuple[list[PairRecord], Draws]:
        records = [self[i] for i in indices]
        rng = batch_generator(self.seed, self.epoch, rank, position)
        return records, draw(self.task, records, rng, self.token_ids, self.mask_prob)

    def batch(
        self,
        indices: list[int],
        position: int,
        rank: int = 0,
        layout: str = "packed",
        feat_dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """Batch ``position`` of the current epoch (``indices`` in batch order) in ``layout`` ("packed" for the fast
        model path, "padded" for the reference one), region features in ``feat_dtype``; see
        :func:`uniter_fast.data.collate.collate`."""
        records, draws = self._records_and_draws(indices, position, rank)
        return collate(self.task, records, draws, self.token_ids, layout, feat_dtype)

    def reference_batch(self, indices: list[int], position: int, rank: int = 0) -> dict[str, Any]:
        """The same batch (same draws) through the reference path: padded keys and ``packed``."""
        records, draws = self._records_and_draws(indices, position, rank)
        return reference_collate(self.task, reference_items(self.task, records, draws, self.token_ids))


class DetectFeatTxtTokDataset(torch.utils.data.Dataset, TaskBatches):
    """Text-image pairs; ``ids`` [N] text ids, ``lens`` int64 [N] = wordpieces (no [CLS]/[SEP]) + nbb.

    ``task`` names the batches, ``fields`` the img_db arrays it reads, ``mask_prob`` the masking probability.
    """

    task = "pairs"
    fields: tuple[str, ...] = ("features", "norm_bb")
    mask_prob = MASK_PROB

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, seed: int = 0) -> None:
        if not isinstance(txt_db, TxtTokLmdb):
            raise TypeError(f"txt_db must be a TxtTokLmdb, got {type(txt_db).__name__}")
        if not isinstance(img_db, DetectFeatLmdb):
            raise TypeError(f"img_db must be a DetectFeatLmdb, got {type(img_db).__name__}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.txt_db, self.img_db, self.seed = txt_db, img_db, seed
        txt2img = txt_db.txt2img
        ids = [i for i in txt_db.id2len if txt2img.get(i) in img_db]
        self.skipped = {"missing_image": len(txt_db.id2len) - len(ids)}
        if self.skipped["missing_image"]:
            warnings.warn(
                f"{self.skipped['missing_image']} texts of {txt_db.path!r} point to images missing from "
                f"{img_db.path!r}; skipped",
                stacklevel=2,
            )
        if not ids:
            raise ValueError(f"no usable text-image pairs in txt_db {txt_db.path!r} with img_db {img_db.path!r}")
        self.ids = ids
        self.img_fnames = [txt2img[i] for i in ids]
        self.txt_lens = np.array([txt_db.id2len[i] for i in ids], dtype=np.int64)
        self.lens = self.txt_lens + np.array([img_db.name2nbb[f] for f in self.img_fnames], dtype=np.int64)
        self.epoch = 0

    @property
    def token_ids(self) -> TokenIds:
        """The special ids and vocabulary range of the txt_db."""
        return self.txt_db.token_ids

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch``."""
        self.epoch = int(epoch)

    def image_of(self, index: int) -> str:
        """The image paired with text ``index`` (ITM: this epoch's image, possibly a negative)."""
        return self.img_fnames[index]

    def target_of(self, index: int) -> int:
        """The ITM target of pair ``index`` (-1: no ITM target)."""
        return -1

    def __getitem__(self, index: int) -> PairRecord:
        id_, fname = self.ids[index], self.image_of(index)
        try:
            record = self.txt_db[id_]
            arrays = self.img_db.views(fname, self.fields)
        except DataError as exc:
            raise DataError(f"text {id_!r} (image {fname!r}): {exc}") from exc
        return PairRecord(
            id_,
            fname,
            np.asarray(record["input_ids"], dtype=np.int64),
            arrays["features"],
            arrays["norm_bb"],
            arrays.get("soft_labels"),
            self.target_of(index),
        )


class MlmDataset(DetectFeatTxtTokDataset):
    """MLM batches: wordpieces masked as the original ``random_word`` (15 %, 80/10/10, >= 1 per text)."""

    task = "mlm"


class _MrmDataset(DetectFeatTxtTokDataset):
    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, mask_prob: float = MASK_PROB, seed: int = 0):
        super().__init__(txt_db, img_db, seed)
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.mask_prob = mask_prob


class MrfrDataset(_MrmDataset):
    """MRFR batches: regions masked with ``mask_prob`` (>= 1 per pair); the soft labels are never read."""

    task = "mrfr"


class MrcDataset(_MrmDataset):
    """MRC / MRC-kl batches (masked as :class:`MrfrDataset`, soft labels read); ``task`` = "mrckl" (default) or
    "mrc" names the batches."""

    fields = ("features", "norm_bb", "soft_labels")

    def __init__(
        self,
        txt_db: TxtTokLmdb,
        img_db: DetectFeatLmdb,
        mask_prob: float = MASK_PROB,
        seed: int = 0,
        task: str = "mrckl",
    ) -> None:
        if task not in ("mrc", "mrckl"):
            raise ValueError(f"task must be 'mrc' or 'mrckl', got {task!r}")
        super().__init__(txt_db, img_db, mask_prob, seed)
        self.task = task


class ItmDataset(DetectFeatTxtTokDataset):
    """ITM pairs with image-swap negatives: each text is a negative with ``neg_prob``, redrawn per epoch
    (:meth:`new_epoch`); a negative's image is uniform over this rank's shard's images, never its own.

    ``targets`` int64 [N] (1 = match), ``neg_fnames`` the image used per text, ``lens`` follow the used image.
    """

    task = "itm"

    def __init__(
        self,
        txt_db: TxtTokLmdb,
        img_db: DetectFeatLmdb,
        neg_prob: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        super().__init__(txt_db, img_db, seed)
        if not 0.0 <= neg_prob <= 1.0:
            raise ValueError(f"neg_prob must be in [0, 1], got {neg_prob}")
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.neg_prob = neg_prob
        self.pool = sorted(set(self.img_fnames[rank::world]))
        if len(self.pool) < 2 and neg_prob > 0:
            raise ValueError(f"ITM negatives need >= 2 images in the shard, got {len(self.pool)}")
        self.new_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Select ``epoch`` and redraw its labels and negatives."""
        self.new_epoch(epoch)

    def new_epoch(self, epoch: int | None = None) -> None:
        """Redraw labels (0 with ``neg_prob``) and negative images for ``epoch`` (default: the next one)."""
        self.epoch = self.epoch + 1 if epoch is None else int(epoch)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch], spawn_key=(1,)))
        n = len(self.ids)
        self.targets = (rng.random(n) >= self.neg_prob).astype(np.int64)
        pool_idx = {f: i for i, f in enumerate(self.pool)}
        own = np.array([pool_idx.get(f, -1) for f in self.img_fnames])
        picks = rng.integers(len(self.pool), size=n)
        clash = (self.targets == 0) & (picks == own)
        while clash.any():
            picks[clash] = rng.integers(len(self.pool), size=int(clash.sum()))
            clash = (self.targets == 0) & (picks == own)
        self.neg_fnames = [f if t == 1 else self.pool[d] for f, t, d in zip(self.img_fnames, self.targets, picks)]
        nbb = np.array([self.img_db.name2nbb[f] for f in self.neg_fnames], dtype=np.int64)
        self.lens = self.txt_lens + nbb

    def image_of(self, index: int) -> str:
        """This epoch's image of text ``index`` (its own, or a negative)."""
        return self.neg_fnames[index]

    def target_of(self, index: int) -> int:
        """1 if text ``index`` is paired with its own image this epoch, else 0."""
        return int(self.targets[index])
