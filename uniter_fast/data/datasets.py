"""Per-task datasets over a txt_db and an img_db (uniter.md §2, §3.3).

Randomness (masks, ITM negatives) is drawn from ``numpy`` generators seeded by (seed, epoch, index), so an example
looks the same in any worker and after a resume; call ``set_epoch(e)`` before iterating epoch ``e``.
Texts whose image is missing from the img_db are skipped at construction with one warning and counted in
``skipped``; a missing or corrupted record met while reading raises :class:`DataError` naming the text and image.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from uniter_fast.data.collate import itm_collate, mlm_collate, mrc_collate, mrfr_collate
from uniter_fast.data.img_db import DetectFeatLmdb, box_7d
from uniter_fast.data.lmdb_env import DataError
from uniter_fast.data.masking import MASK_PROB, random_word, region_mask
from uniter_fast.data.txt_db import TxtTokLmdb


class DetectFeatTxtTokDataset(torch.utils.data.Dataset):
    """Text-image pairs; ``ids`` [N] text ids, ``lens`` int64 [N] = wordpieces (no [CLS]/[SEP]) + nbb."""

    task = "pairs"

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

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch``."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of example ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def read(self, index: int, img_fname: str | None = None, soft_labels: bool = False) -> dict[str, Any]:
        """input_ids int64 [t] (with [CLS]/[SEP], unmasked wordpieces in ``wordpieces``), img_feat [n, 2048],
        img_pos_feat [n, 7] (float32), and soft_labels [n, 1601] when asked; ``img_fname`` overrides the image."""
        id_ = self.ids[index]
        fname = img_fname or self.img_fnames[index]
        try:
            record = self.txt_db[id_]
            dump = self.img_db.get_dump(fname, soft_labels=soft_labels)
        except DataError as exc:
            raise DataError(f"text {id_!r} (image {fname!r}): {exc}") from exc
        wordpieces = np.asarray(record["input_ids"], dtype=np.int64)
        out = {
            "id": id_,
            "wordpieces": wordpieces,
            "input_ids": self.txt_db.combine_inputs(wordpieces.tolist()),
            "img_feat": torch.from_numpy(dump["features"]),
            "img_pos_feat": box_7d(torch.from_numpy(dump["norm_bb"])),
        }
        if soft_labels:
            out["soft_labels"] = torch.from_numpy(dump["soft_labels"])
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.read(index)


class MlmDataset(DetectFeatTxtTokDataset):
    """MLM items: masked input_ids int64 [t] and txt_labels int64 [t] (-1 on [CLS]/[SEP] and unmasked)."""

    task = "mlm"

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.read(index)
        db = self.txt_db
        masked, labels = random_word(item["wordpieces"], db.v_range, db.mask, self.rng(index))
        item["input_ids"] = db.combine_inputs(masked.tolist())
        item["txt_labels"] = torch.tensor([-1, *labels.tolist(), -1], dtype=torch.int64)
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """See :func:`collate.mlm_collate`."""
        return mlm_collate(items)


class _MrmDataset(DetectFeatTxtTokDataset):
    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, mask_prob: float = MASK_PROB, seed: int = 0):
        super().__init__(txt_db, img_db, seed)
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.mask_prob = mask_prob

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.read(index, soft_labels=True)
        item["img_mask"] = torch.from_numpy(region_mask(item["img_feat"].size(0), self.rng(index), self.mask_prob))
        return item


class MrfrDataset(_MrmDataset):
    """MRFR items: regions masked with ``mask_prob`` (>= 1), ``img_mask`` bool [n], ``soft_labels`` [n, 1601]."""

    task = "mrfr"

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """See :func:`collate.mrfr_collate`."""
        return mrfr_collate(items)


class MrcDataset(_MrmDataset):
    """MRC / MRC-kl items (as :class:`MrfrDataset`); ``task`` = "mrckl" (default) or "mrc" names the batches."""

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

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """See :func:`collate.mrc_collate`."""
        return mrc_collate(items, self.task)


class ItmDataset(DetectFeatTxtTokDataset):
    """ITM items with image-swap negatives: each text is a negative with ``neg_prob``, redrawn per epoch
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
        draw = rng.integers(len(self.pool), size=n)
        clash = (self.targets == 0) & (draw == own)
        while clash.any():
            draw[clash] = rng.integers(len(self.pool), size=int(clash.sum()))
            clash = (self.targets == 0) & (draw == own)
        self.neg_fnames = [f if t == 1 else self.pool[d] for f, t, d in zip(self.img_fnames, self.targets, draw)]
        nbb = np.array([self.img_db.name2nbb[f] for f in self.neg_fnames], dtype=np.int64)
        self.lens = self.txt_lens + nbb

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.read(index, img_fname=self.neg_fnames[index])
        item["target"] = int(self.targets[index])
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """See :func:`collate.itm_collate`."""
        return itm_collate(items)
