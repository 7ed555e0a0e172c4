"""Infinite, resumable per-task loaders: token-bucket batches built in ``DataLoader`` worker processes.

Each worker builds whole batches (``dataset.batch``: read the records, draw the masks from the batch's generator,
collate the one layout the step reads). The loader state is two counters, (epoch, position = batches already
yielded in that epoch); batches and their random draws depend only on (seed, rank, epoch, position), so
``load_state_dict`` continues with exactly the batches an uninterrupted run would have produced, with any number of
workers. On CUDA, batches come in pinned memory so that :func:`move_to_device` copies without blocking.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch

from uniter_fast.config import BUCKET_SIZE, SIZE_MULTIPLE
from uniter_fast.data.collate import check_layout
from uniter_fast.data.sampler import TokenBucketSampler


class EpochBatches(torch.utils.data.Dataset):
    """The batches of one epoch as a map-style dataset: item ``p`` is batch ``p``, built by ``dataset.batch``."""

    def __init__(self, dataset: Any, batches: list[list[int]], rank: int, layout: str, feat_dtype: torch.dtype) -> None:
        self.dataset, self.batches, self.rank, self.layout, self.feat_dtype = dataset, batches, rank, layout, feat_dtype

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return self.dataset.batch(self.batches[position], position, self.rank, self.layout, self.feat_dtype)


def _whole_batch(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def batch_loader(
    dataset: Any,
    batches: list[list[int]],
    start: int = 0,
    rank: int = 0,
    layout: str = "packed",
    num_workers: int = 0,
    pin_memory: Optional[bool] = None,
    prefetch_factor: int = 2,
    feat_dtype: torch.dtype = torch.float32,
) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` over ``batches[start:]`` of ``dataset``'s current epoch (``set_epoch`` first), built in
    ``num_workers`` processes in ``layout`` with region features in ``feat_dtype``; ``pin_memory`` defaults to "CUDA
    is available"."""
    check_layout(layout, feat_dtype)
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return torch.utils.data.DataLoader(
        EpochBatches(dataset, batches, rank, layout, feat_dtype),
        batch_size=None,
        sampler=range(start, len(batches)),
        collate_fn=_whole_batch,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


class TaskLoader:
    """Endless batches of one task dataset, epoch after epoch, in ``layout`` ("packed": the fast model path;
    "padded": the reference path), region features in ``feat_dtype`` (float32, or float16 as stored).

    ``batch_size`` is the per-rank token budget; ``num_workers`` DataLoader processes build batches in parallel;
    ``pin_memory`` (default: CUDA available) hands them over in pinned memory.
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 2,
        droplast: bool = True,
        bucket_size: int = BUCKET_SIZE,
        size_multiple: int = SIZE_MULTIPLE,
        pin_memory: Optional[bool] = None,
        prefetch_factor: int = 2,
        layout: str = "packed",
        feat_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not hasattr(dataset, "batch"):
            raise TypeError(f"dataset must have a batch method (a task dataset), got {type(dataset).__name__}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        check_layout(layout, feat_dtype)
        self.dataset, self.rank, self.layout, self.feat_dtype = dataset, rank, layout, feat_dtype
        self.sampler = TokenBucketSampler(
            dataset.lens, bucket_size, batch_size, droplast, size_multiple, seed=seed, rank=rank, world=world
        )
        self.num_workers, self.pin_memory, self.prefetch_factor = num_workers, pin_memory, prefetch_factor
        self.epoch, self.position = 0, 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Set the dataset to ``epoch`` (new ITM negatives) and return that epoch's batches of indices."""
        self.dataset.set_epoch(epoch)
        self.sampler.set_lens(self.dataset.lens)
        return self.sampler.batches(epoch)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batches = self.epoch_batches(self.epoch)
            if not batches:
                raise ValueError(
                    f"epoch {self.epoch} of task {self.dataset.task!r} has no batch; "
                    "lower batch_size or set droplast=False"
                )
            loader = batch_loader(
                self.dataset,
                batches,
                self.position,
                self.rank,
                self.layout,
                self.num_workers,
                self.pin_memory,
                self.prefetch_factor,
                self.feat_dtype,
            )
            for batch in loader:
                self.position += 1
                yield batch
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        """{"epoch", "position"}: where the next batch comes from."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from ``state``; iterators made before this call must be dropped."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def pin_batch(batch: Any) -> Any:
    """Every host tensor of a (nested) batch in pinned memory where CUDA is available (else the batch as it is), so
    that :func:`move_to_device` copies it without a stream sync: a batch built in the main process, such as a
    fixed-shape batch of ``uniter_fast.data.buckets``."""
    if not torch.cuda.is_available():
        return batch
    if isinstance(batch, torch.Tensor):
        return batch if batch.is_cuda or batch.is_pinned() else batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pin_batch(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(pin_batch(v) for v in batch)
    return batch


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Copy every tensor of a (nested) batch to ``device`` (asynchronously from pinned memory); other values, such
    as ``max_seqlen`` and ``task``, are kept as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch
