"""What every task dataset shares: opening the databases, the dataset base, the joint collate and the loaders.

A task dataset has what ``uniter_fast.data.TaskLoader`` needs (``lens``, ``set_epoch``, ``collate``, ``task``), so
training batches come from the same token-bucket sampler, resumable loader and mixer as pretraining. Evaluation
datasets are read once, in order, sharded over ranks. Randomness inside an example (RE negatives are drawn in the
model; VCR-pretraining masks) comes from generators seeded by (seed, epoch, index), as in ``uniter_fast.data``.
"""

from __future__ import annotations

import bisect
import os
from typing import Any, Iterator, Optional

import numpy as np
import torch

from uniter_fast.config import IMG_DIM, IMG_POS_DIM
from uniter_fast.data import DetectFeatLmdb, TokenBucketSampler, TxtTokLmdb
from uniter_fast.data.collate import collate_rows as collate_rows  # the task datasets' collate (both layouts)
from uniter_fast.data.img_db import box_7d
from uniter_fast.errors import DataError
from uniter_fast.training.config import RunConfig

GT_NUM_BB = 100  # GT-box img_dbs are read with conf_th -1 and 100 boxes, as the original's VCR / RE scripts


class DbCache:
    """Opens each txt_db / img_db once, with the run config's text and box settings (``max_txt_len``, ``conf_th``,
    ``max_bb``, ``min_bb``, ``num_bb``: the original's names)."""

    def __init__(self, settings: RunConfig) -> None:
        self.settings = settings
        self._img: dict[tuple[str, bool], DetectFeatLmdb] = {}
        self._txt: dict[tuple[Any, ...], TxtTokLmdb] = {}

    def img(self, path: str, gt: bool = False) -> DetectFeatLmdb:
        """The img_db at ``path``: dynamic boxes (conf_th, min_bb..max_bb; or num_bb when conf_th is -1), or with
        ``gt`` the GT-box layout (every stored box, up to 100)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"img_db directory {path!r} does not exist")
        key = (os.path.abspath(path), gt)
        if key not in self._img:
            s = self.settings
            if gt:
                self._img[key] = DetectFeatLmdb(path, -1, s.max_bb, s.min_bb, GT_NUM_BB)
            else:
                self._img[key] = DetectFeatLmdb(path, s.conf_th, s.max_bb, s.min_bb, s.num_bb)
        return self._img[key]

    def opened_txt_dbs(self) -> list[TxtTokLmdb]:
        """Every txt_db opened so far."""
        return list(self._txt.values())

    @staticmethod
    def txt_dir(path: str) -> str:
        """``path``, checked to be a directory (``FileNotFoundError`` naming the txt_db otherwise)."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"txt_db directory {path!r} does not exist")
        return path

    def txt(self, cls: type, path: str, training: bool, **kwargs: Any) -> TxtTokLmdb:
        """A ``cls`` (TxtTokLmdb or a task subclass) over ``path``: the ``max_txt_len`` filter for training, none for
        evaluation (as the original scripts)."""
        self.txt_dir(path)
        max_len = self.settings.max_txt_len if training else -1
        key = (cls, os.path.abspath(path), max_len, tuple(sorted(kwargs.items())))
        if key not in self._txt:
            self._txt[key] = cls(path, max_len, **kwargs)
        return self._txt[key]


def image_inputs(img_db: DetectFeatLmdb, fname: str, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(img_feat float32 [n, 2048], img_pos_feat float32 [n, 7]) of ``fname``; ``DataError`` naming ``where``."""
    try:
        return img_db[fname]
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc


class TaskDataset(torch.utils.data.Dataset):
    """Base of the task datasets: ``ids`` (txt_db keys), ``lens`` int64 [N] (the token count that batching uses),
    ``set_epoch`` and a per-example generator. Subclasses set ``task`` and implement ``__getitem__`` and
    ``collate``."""

    task = "task"

    def __init__(self, txt_db: TxtTokLmdb, ids: list[str], lens: np.ndarray, seed: int = 0) -> None:
        if not ids:
            raise ValueError(f"txt_db {txt_db.path!r}: no usable examples (all filtered by max_txt_len?)")
        self.txt_db, self.ids, self.seed, self.epoch = txt_db, ids, seed, 0
        self.lens = np.asarray(lens, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Select the random draws of ``epoch``."""
        self.epoch = int(epoch)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of example ``index`` in the current epoch."""
        return np.random.default_rng([self.seed, self.epoch, index])

    def batch(
        self,
        indices: list[int],
        position: int,
        rank: int = 0,
        layout: str = "packed",
        feat_dtype: torch.dtype = torch.float32,
    ) -> dict[str, Any]:
        """Batch ``position`` (``indices`` in batch order), what ``uniter_fast.data.TaskLoader`` asks for: the
        task's ``collate`` of the examples, whose draws depend on (seed, epoch, index) only. Task batches carry
        both layouts (the heads read the padded sequence too) and float32 features, whatever ``layout`` /
        ``feat_dtype`` say."""
        return self.collate([self[i] for i in indices])

    def record(self, index: int) -> dict[str, Any]:
        """The txt_db record of example ``index``."""
        return self.txt_db[self.ids[index]]


class ConcatTaskDatasets(TaskDataset):
    """Several task datasets as one, as the original ``ConcatDatasetWithLens`` (VCR's Q->A and QA->R datasets, or
    several training dbs): concatenated ``lens``, ``set_epoch`` forwarded, the examples of the part an index falls
    in, collated by the first part's ``collate`` (the parts are datasets of one task)."""

    def __init__(self, parts: list[TaskDataset]) -> None:
        if not parts:
            raise ValueError("ConcatTaskDatasets needs at least one dataset")
        self.parts = parts
        self.task, self.txt_db, self.seed, self.epoch = parts[0].task, parts[0].txt_db, parts[0].seed, 0
        self.lens = np.concatenate([p.lens for p in parts])
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()
        self.ids = [id_ for p in parts for id_ in p.ids]

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to every part."""
        self.epoch = int(epoch)
        for part in self.parts:
            part.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part][index - self.offsets[part]]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The parts' collate."""
        return self.parts[0].collate(items)


def check_images_exist(txt_db: TxtTokLmdb, ids: list[str], names: list[list[str]], img_dbs: list[Any]) -> None:
    """Raise ``DataError`` naming the first text whose image key is missing from its img_db (before training)."""
    for id_, fnames in zip(ids, names):
        for fname, img_db in zip(fnames, img_dbs):
            if fname not in img_db:
                raise DataError(
                    f"txt_db {txt_db.path!r}: text {id_!r} names image {fname!r}, which img_db {img_db.path!r} lacks"
                )


def row(
    input_ids: torch.Tensor,
    img_feat: torch.Tensor,
    img_pos_feat: torch.Tensor,
    txt_type_ids: Optional[torch.Tensor] = None,
    img_type_ids: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """One sequence of a batch: input_ids int64 [t] ([CLS] .. [SEP]), img_feat [n, 2048], img_pos_feat [n, 7], and
    optional type ids int64 [t] / [n]."""
    out = {"input_ids": input_ids, "img_feat": img_feat, "img_pos_feat": img_pos_feat}
    if txt_type_ids is not None:
        out["txt_type_ids"] = txt_type_ids
    if img_type_ids is not None:
        out["img_type_ids"] = img_type_ids
    return out


def random_rows(
    size: int,
    sequences: int,
    vocab: int,
    rng: np.random.Generator,
    txt_range: tuple[int, int],
    img_range: tuple[int, int],
    txt_types: bool = False,
    img_types: bool = False,
) -> list[dict[str, Any]]:
    """Random rows with UNITER's shapes, for :meth:`Task.example` (benchmarks): ``size`` examples of ``sequences``
    rows each sharing the example's regions (``img_range`` regions of relu'd normal 2048-d features, uniform
    7-d boxes), each row ``txt_range`` wordpieces in [5, vocab); with ``txt_types`` random type ids 0-3 per token,
    with ``img_types`` region type k + 1 in row k (NLVR2's two images)."""
    rows = []
    for _ in range(size):
        n = int(rng.integers(img_range[0], img_range[1] + 1))
        feat = torch.from_numpy(rng.standard_normal((n, IMG_DIM), dtype=np.float32)).relu()
        pos = torch.from_numpy(rng.random((n, IMG_POS_DIM), dtype=np.float32))
        for k in range(sequences):
            t = int(rng.integers(txt_range[0], txt_range[1] + 1))
            ids = torch.from_numpy(rng.integers(5, vocab, t))
            types = torch.from_numpy(rng.integers(0, 4, t)) if txt_types else None
            region_types = torch.full((n,), k + 1, dtype=torch.long) if img_types else None
            rows.append(row(ids, feat, pos, types, region_types))
    return rows


def box_inputs(dump: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, 7-d boxes) float32 tensors of an img_db dump."""
    return torch.from_numpy(dump["features"]), box_7d(torch.from_numpy(dump["norm_bb"]))


def eval_batches(
    dataset: TaskDataset, batch_size: int, rank: int = 0, world: int = 1, by_examples: bool = False
) -> Iterator[dict[str, Any]]:
    """One pass over this rank's share of ``dataset``: token-bucket batches of ``batch_size`` tokens (or, with
    ``by_examples``, ``batch_size`` examples in order, as the original RE scripts), nothing dropped."""
    if by_examples:
        ids = list(range(len(dataset)))[rank::world]
        batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
    else:
        batches = TokenBucketSampler(dataset.lens, batch_size=batch_size, rank=rank, world=world).batches(0)
    for indices in batches:
        yield dataset.collate([dataset[i] for i in indices])
