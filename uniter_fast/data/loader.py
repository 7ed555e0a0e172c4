"""Infinite, resumable per-task loaders: token-bucket batches through a torch ``DataLoader`` with workers.

The loader state is two counters, (epoch, position = batches already yielded in that epoch); batches and the random
draws inside them depend only on (seed, rank, epoch, index), so ``load_state_dict`` continues with exactly the
batches an uninterrupted run would have produced.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from uniter_fast.config import BUCKET_SIZE
from uniter_fast.data.datasets import DetectFeatTxtTokDataset
from uniter_fast.data.sampler import TokenBucketSampler


class TaskLoader:
    """Endless batches of one task dataset (``dataset.collate`` builds them), epoch after epoch.

    ``batch_size`` is the per-rank token budget; ``num_workers`` DataLoader processes read and collate in parallel.
    """

    def __init__(
        self,
        dataset: DetectFeatTxtTokDataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 2,
        droplast: bool = True,
        bucket_size: int = BUCKET_SIZE,
        size_multiple: int = 8,
        pin_memory: bool = False,
        prefetch_factor: int = 2,
    ) -> None:
        if not hasattr(dataset, "collate"):
            raise TypeError(f"dataset must have a collate method (a task dataset), got {type(dataset).__name__}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset = dataset
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
            workers = self.num_workers
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=batches[self.position :],
                collate_fn=self.dataset.collate,
                num_workers=workers,
                pin_memory=self.pin_memory,
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
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


def move_to_device(batch: Any, device: torch.device, non_blocking: bool = True) -> Any:
    """Copy every tensor of a (nested) batch to ``device``; other values are kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device, non_blocking) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device, non_blocking) for v in batch)
    return batch
