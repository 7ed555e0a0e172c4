"""Token-bucket batching as the original ``TokenBucketSampler`` (``data/sampler.py``), sharded and seeded.

Per epoch: shuffle this rank's ids, cut them into buckets of ``bucket_size``, sort each bucket by length
(descending), walk it in groups of ``size_multiple`` and close a batch when max_len * (count + size_multiple) would
exceed the token budget ``batch_size``; with ``droplast`` each bucket's trailing batch is dropped; the batches are
shuffled. ``max_len`` is the bucket's longest example, as in the original.

Differences from the original, on purpose: the shard (``ids[rank::world]``) is taken here rather than in the
dataset, the shuffles come from a generator seeded by (seed, rank, epoch) instead of the global ``random`` (so a
resumed run sees the same batches), and ``__len__`` works.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from uniter_fast.config import BUCKET_SIZE, SIZE_MULTIPLE


class TokenBucketSampler(torch.utils.data.Sampler):
    """Yields lists of dataset indices; ``lens`` [N] are the examples' token counts (text wordpieces + regions)."""

    def __init__(
        self,
        lens: Sequence[int],
        bucket_size: int = BUCKET_SIZE,
        batch_size: int = 10240,
        droplast: bool = False,
        size_multiple: int = SIZE_MULTIPLE,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        for name, value in (("bucket_size", bucket_size), ("batch_size", batch_size), ("size_multiple", size_multiple)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= rank < world:
            raise ValueError(f"need 0 <= rank < world, got rank={rank}, world={world}")
        self.bucket_size, self.batch_size, self.size_multiple = int(bucket_size), int(batch_size), int(size_multiple)
        self.droplast, self.seed, self.rank, self.world = droplast, seed, rank, world
        self.set_lens(lens)
        self.epoch, self.start = 0, 0

    def set_lens(self, lens: Sequence[int]) -> None:
        """Replace the example lengths (ITM lengths change with the negatives of each epoch)."""
        lens = np.asarray(lens, dtype=np.int64)
        if lens.ndim != 1 or lens.size == 0 or (lens < 1).any():
            raise ValueError(f"lens must be a non-empty 1-d array of positive ints, got shape {lens.shape}")
        self.lens = lens
        self._cache: dict[int, list[list[int]]] = {}

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate epoch ``epoch`` from its ``start``-th batch on (for resuming)."""
        self.epoch, self.start = int(epoch), int(start)

    def batches(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch`` for this rank, in order."""
        if epoch not in self._cache:
            self._cache = {epoch: self._build(epoch)}
        return self._cache[epoch]

    def _build(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.rank, epoch])
        ids = np.arange(self.lens.size)[self.rank :: self.world]
        ids = ids[rng.permutation(ids.size)]
        step = self.size_multiple
        batches: list[list[int]] = []
        for b in range(0, ids.size, self.bucket_size):
            bucket = ids[b : b + self.bucket_size]
            bucket = bucket[np.argsort(-self.lens[bucket], kind="stable")]
            max_len, current = 0, []
            for g in range(0, bucket.size, step):
                group = bucket[g : g + step].tolist()
                max_len = max(max_len, int(self.lens[group].max()))
                if max_len * (len(current) + step) > self.batch_size:
                    if not current:
                        raise ValueError(
                            f"batch_size (token budget) {self.batch_size} is below size_multiple * longest example "
                            f"= {step} * {max_len}"
                        )
                    batches.append(current)
                    current = group
                else:
                    current.extend(group)
            if current and not self.droplast:
                batches.append(current)
        return [batches[i] for i in rng.permutation(len(batches))]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches(self.epoch)[self.start :])

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.start


def check_token_budget(budget: int, longest: int, budget_name: str, what: str) -> None:
    """``ValueError`` unless a token budget ``budget`` holds one batch of :data:`SIZE_MULTIPLE` examples of the
    longest example (``longest`` tokens, text + regions) of ``what`` (e.g. "dataset 'coco' (itm)")."""
    if budget < SIZE_MULTIPLE * longest:
        raise ValueError(
            f"{budget_name}={budget} tokens is too small for {what}: its longest example has up to {longest} tokens "
            f"(text + regions) and a batch holds at least {SIZE_MULTIPLE} examples; use >= {SIZE_MULTIPLE * longest}"
        )
