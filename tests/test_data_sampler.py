"""TokenBucketSampler: coverage, token budget, determinism, disjoint shards, the original bucket rule."""

from __future__ import annotations

import numpy as np
import pytest

from uniter_fast.data import TokenBucketSampler


def _lens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(12, 130, size=n)


@pytest.mark.parametrize("n,world,budget,bucket", [(1000, 1, 2048, 8192), (5003, 4, 4096, 512), (777, 3, 1500, 100)])
def test_each_example_once_budget_and_shards(n, world, budget, bucket):
    lens = _lens(n, n)
    seen = []
    for rank in range(world):
        s = TokenBucketSampler(
            lens, bucket_size=bucket, batch_size=budget, droplast=False, seed=7, rank=rank, world=world
        )
        for epoch in (0, 1):
            s.set_epoch(epoch)
            batches = list(s)
            flat = [i for b in batches for i in b]
            assert sorted(flat) == list(range(rank, n, world))  # the shard, each index exactly once
            for b in batches:
                assert int(lens[b].max()) * len(b) <= budget
            assert sum(len(b) % 8 != 0 for b in batches) <= -(-len(flat) // bucket)  # only bucket tails are ragged
            if epoch == 0:
                seen.append(set(flat))
    assert set().union(*seen) == set(range(n)) and sum(map(len, seen)) == n


def test_deterministic_and_fresh_per_epoch():
    lens = _lens(3000, 1)
    a = TokenBucketSampler(lens, batch_size=3000, seed=3)
    b = TokenBucketSampler(lens, batch_size=3000, seed=3)
    assert a.batches(0) == b.batches(0) and a.batches(5) == b.batches(5)
    assert a.batches(0) != a.batches(1)
    assert a.batches(0) != TokenBucketSampler(lens, batch_size=3000, seed=4).batches(0)
    a.set_epoch(2, start=3)
    assert list(a) == a.batches(2)[3:] and len(a) == len(a.batches(2)) - 3


def test_droplast_and_bucket_rule():
    lens = _lens(2000, 2)
    s = TokenBucketSampler(lens, bucket_size=256, batch_size=2000, droplast=True, seed=0)
    batches = s.batches(0)
    assert all(len(b) % 8 == 0 for b in batches)
    assert sum(map(len, batches)) < 2000
    # within a bucket every batch has 8 * floor(budget / (8 * bucket max)) examples, as the original
    rng = np.random.default_rng([0, 0, 0])
    ids = np.arange(2000)[rng.permutation(2000)]
    first_bucket = ids[:256]
    per_batch = 8 * (2000 // (8 * int(lens[first_bucket].max())))
    in_first = [b for b in batches if set(b) <= set(first_bucket.tolist())]
    assert in_first and all(len(b) == per_batch for b in in_first)


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size .* is below"):
        TokenBucketSampler([100, 200], batch_size=800).batches(0)
    with pytest.raises(ValueError, match="rank"):
        TokenBucketSampler([1, 2], rank=2, world=2)
    with pytest.raises(ValueError, match="lens"):
        TokenBucketSampler([])
    with pytest.raises(ValueError, match="bucket_size"):
        TokenBucketSampler([3], bucket_size=0)
