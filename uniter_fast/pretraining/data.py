"""Training and validation data of a training config, built from ``uniter_fast.data``.

Each ``{task}_{dataset}`` gets a task dataset over the dataset's txt_db / img_db pairs (several pairs are
concatenated, as the original ``ConcatDatasetWithLens``), batched by token budget; training mixes them with the
resumable ``MetaLoader``. Batches come in the layout the model reads: packed with the region features as stored
(fp16) for the fast path (``cfg.fast``), padded and float32 for the reference path. The token budget is checked
against the longest possible example before training.
"""

from __future__ import annotations

import bisect
from typing import Any, Iterator

import numpy as np
import torch

from uniter_fast.data import (
    DetectFeatLmdb,
    ItmDataset,
    MetaLoader,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    PairRecord,
    TaskLoader,
    TokenBucketSampler,
    TxtTokLmdb,
    batch_loader,
    default_corpus,
)
from uniter_fast.data.datasets import TaskBatches
from uniter_fast.data.sampler import check_token_budget
from uniter_fast.pretraining.config import DatasetSpec, TrainingConfig
from uniter_fast.pretraining.model import task_kind


class ConcatTaskDataset(torch.utils.data.Dataset, TaskBatches):
    """Several task datasets of one kind as one: concatenated ``lens``, ``set_epoch`` forwarded, records of the part
    an index falls in, batches drawn and collated as one dataset's (the parts share seed, masking and tokenizer)."""

    def __init__(self, parts: list[Any]) -> None:
        first = parts[0]
        for part in parts[1:]:
            if part.token_ids != first.token_ids:
                raise ValueError(
                    f"txt_dbs {first.txt_db.path!r} and {part.txt_db.path!r} have different special ids or vocabulary "
                    f"({first.token_ids} vs {part.token_ids}); datasets of one task must share the tokenizer"
                )
        self.parts = parts
        self.task, self.seed, self.mask_prob, self.token_ids = first.task, first.seed, first.mask_prob, first.token_ids
        self.epoch = 0
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

    @property
    def lens(self) -> np.ndarray:
        """int64 [N] token counts of all parts."""
        return np.concatenate([p.lens for p in self.parts])

    def __len__(self) -> int:
        return self.offsets[-1]

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to every part."""
        self.epoch = int(epoch)
        for part in self.parts:
            part.set_epoch(epoch)

    def __getitem__(self, index: int) -> PairRecord:
        part = bisect.bisect_right(self.offsets, index) - 1
        return self.parts[part][index - self.offsets[part]]


class DataBuilder:
    """Opens each database once and builds task datasets and loaders for rank ``rank`` of ``world``."""

    def __init__(self, cfg: TrainingConfig, rank: int, world: int, num_workers: int) -> None:
        self.cfg, self.rank, self.world, self.num_workers = cfg, rank, world, num_workers
        # fast path: packed layout, region features as stored (fp16; the model casts them exactly); reference: as the
        # original, padded and float32
        self.layout = "packed" if cfg.fast else "padded"
        self.feat_dtype = torch.float16 if cfg.fast else torch.float32
        self._txt: dict[str, TxtTokLmdb] = {}
        self._img: dict[str, DetectFeatLmdb] = {}

    def _dbs(self, txt_path: str, img_path: str) -> tuple[TxtTokLmdb, DetectFeatLmdb]:
        cfg = self.cfg
        if txt_path not in self._txt:
            self._txt[txt_path] = TxtTokLmdb(txt_path, cfg.max_txt_len)
        if img_path not in self._img:
            self._img[img_path] = DetectFeatLmdb(img_path, cfg.conf_th, cfg.max_bb, cfg.min_bb, cfg.num_bb)
        return self._txt[txt_path], self._img[img_path]

    def vocab_size(self) -> int:
        """The largest vocabulary size (``v_range`` end) of the text dbs opened so far."""
        return max(int(db.v_range[1]) for db in self._txt.values())

    def _one(self, task: str, txt: TxtTokLmdb, img: DetectFeatLmdb) -> Any:
        cfg, kind = self.cfg, task_kind(task)
        if kind == "mlm":
            return MlmDataset(txt, img, seed=cfg.seed)
        if kind == "mrfr":
            return MrfrDataset(txt, img, cfg.mrm_prob, seed=cfg.seed)
        if kind in ("mrc", "mrckl"):
            return MrcDataset(txt, img, cfg.mrm_prob, seed=cfg.seed, task=kind)
        return ItmDataset(txt, img, cfg.itm_neg_prob, seed=cfg.seed, rank=self.rank, world=self.world)

    def dataset(self, spec: DatasetSpec, task: str, budget: int, budget_name: str) -> ConcatTaskDataset:
        """The task dataset of ``spec``; ``ValueError`` if ``budget`` cannot hold one batch of its longest example."""
        parts = [self._one(task, *self._dbs(t, i)) for t, i in zip(spec.db, spec.img)]
        longest = max(int(p.txt_lens.max()) + max(p.img_db.name2nbb[f] for f in p.img_fnames) for p in parts)
        check_token_budget(budget, longest, budget_name, f"dataset {spec.name!r} ({task})")
        return ConcatTaskDataset(parts)

    def train_stream(self, grad_accum_steps: int) -> MetaLoader:
        """The task mixer over every training task (mix ratios of the config, or its ``phases`` curriculum)."""
        cfg = self.cfg
        loaders, ratios = {}, {}
        for spec in cfg.train_datasets:
            for task, name, ratio in zip(spec.tasks, spec.task_names(), spec.mix_ratio):
                data = self.dataset(spec, task, cfg.train_batch_size, "train_batch_size")
                loaders[name] = TaskLoader(
                    data,
                    cfg.train_batch_size,
                    cfg.seed,
                    self.rank,
                    self.world,
                    self.num_workers,
                    droplast=True,
                    layout=self.layout,
                    feat_dtype=self.feat_dtype,
                )
                ratios[name] = ratio
        return MetaLoader(loaders, ratios, grad_accum_steps, seed=cfg.seed, phases=cfg.phase_starts())

    def val_datasets(self) -> dict[str, ConcatTaskDataset]:
        """Validation task datasets by task name."""
        cfg = self.cfg
        return {
            name: self.dataset(spec, task, cfg.val_batch_size, "val_batch_size")
            for spec in cfg.val_datasets
            for task, name in zip(spec.tasks, spec.task_names())
        }

    def val_batches(self, dataset: ConcatTaskDataset) -> Iterator[dict[str, Any]]:
        """One pass over this rank's shard of ``dataset`` (epoch 0, nothing dropped)."""
        dataset.set_epoch(0)
        sampler = TokenBucketSampler(
            dataset.lens, batch_size=self.cfg.val_batch_size, seed=self.cfg.seed, rank=self.rank, world=self.world
        )
        yield from batch_loader(
            dataset,
            sampler.batches(0),
            rank=self.rank,
            layout=self.layout,
            num_workers=self.num_workers,
            feat_dtype=self.feat_dtype,
        )


def bundled_batches(
    kind: str, budget: int, count: int, layout: str = "packed", droplast: bool = False
) -> list[dict[str, Any]]:
    """The first ``count`` batches of epoch 0 of the bundled corpus's (:func:`uniter_fast.data.default_corpus`)
    ``kind`` loader ("mlm", "mrfr", "mrc", "mrckl" or "itm"; the task dataset with its default options) at ``budget``
    tokens per batch, as training builds them: the token-bucket sampler (``droplast`` as given), CPU tensors in
    ``layout`` ("packed": region features fp16, the fast path's; "padded": float32, the reference path's)."""
    paths = default_corpus()
    txt, img = TxtTokLmdb(paths.txt_db), DetectFeatLmdb(paths.img_db)
    datasets = {"mlm": MlmDataset, "mrfr": MrfrDataset, "itm": ItmDataset}
    dataset = datasets[kind](txt, img) if kind in datasets else MrcDataset(txt, img, task=kind)
    indices = TokenBucketSampler(dataset.lens, batch_size=budget, droplast=droplast).batches(0)[:count]
    feat_dtype = torch.float16 if layout == "packed" else torch.float32
    return list(batch_loader(dataset, indices, layout=layout, feat_dtype=feat_dtype))
