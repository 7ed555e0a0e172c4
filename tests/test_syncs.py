"""The host-sync counter (uniter_fast.syncs) and the sync budget of a training micro-step per task.

On this CPU machine the counter patches the operations that synchronise on a GPU (an upper bound of the GPU count);
bench/gpu_suite.py counts the same steps with torch.cuda.set_sync_debug_mode on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from uniter_fast.pretraining.syncs import count_step_syncs
from uniter_fast.syncs import SyncCounter, count_syncs

# Host syncs allowed in one fast-path micro-step (forward + backward), as documented in docs/pretraining.md.
# ITM: the checks of the collate's txt_lens / img_lens against the pads in uniter_fast.ot.optimal_transport_dist
# (range and suffix, per side). They run only on host tensors, so this CPU emulation counts them; on a GPU the lengths
# travel with the batch and are not read (check_values=False): bench/gpu_suite.py measures 0 there.
FAST_STEP_SYNCS = {"mlm": 0, "mrfr": 0, "mrc": 0, "mrckl": 0, "itm": 4}


def test_counter_counts_what_synchronises_and_nothing_else() -> None:
    x = torch.arange(10.0)
    repeats = torch.ones(10, dtype=torch.long)
    syncing = {
        "Tensor.item": lambda: x.sum().item(),
        "Tensor.tolist": lambda: x.tolist(),
        "Tensor.__bool__": lambda: bool(x.any()),
        "Tensor.__int__": lambda: int(x[3]),
        "Tensor.nonzero": lambda: x.nonzero(),
        "torch.nonzero": lambda: torch.nonzero(x),
        "Tensor.__getitem__": lambda: x[x > 3],
        "Tensor.__setitem__": lambda: x.clone().__setitem__(x > 3, torch.zeros(6)),
        "torch.repeat_interleave": lambda: torch.repeat_interleave(x, repeats),
        "torch.equal": lambda: torch.equal(x, x),
        "torch.where": lambda: torch.where(x > 3),
    }
    for label, fn in syncing.items():
        count, calls = count_syncs(fn)
        assert count >= 1 and label in calls, (label, calls)
    free = [
        lambda: x.index_select(0, torch.tensor([1, 4])),
        lambda: x[torch.tensor([1, 4])],
        lambda: x[2:5],
        lambda: x.masked_fill(x > 3, 0.0),
        lambda: torch.repeat_interleave(x, repeats, output_size=10),
        lambda: torch.where(x > 3, x, 0.0),
        lambda: x.sum() * 2,
    ]
    for fn in free:
        assert count_syncs(fn) == (0, [])


def test_counter_restores_torch() -> None:
    before = (torch.Tensor.item, torch.Tensor.__getitem__, torch.nonzero, torch.repeat_interleave)
    with SyncCounter("cpu") as counter:
        assert torch.Tensor.item is not before[0]
        torch.ones(2).sum().item()
    assert (torch.Tensor.item, torch.Tensor.__getitem__, torch.nonzero, torch.repeat_interleave) == before
    assert counter.count == 1
    with pytest.raises(RuntimeError):  # restored even when the body raises
        with SyncCounter("cpu"):
            raise RuntimeError("boom")
    assert torch.Tensor.item is before[0]


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrckl", "itm"])
def test_fast_step_stays_within_its_sync_budget(task: str) -> None:
    fast, fast_calls = count_step_syncs(task, fast=True)
    assert fast <= FAST_STEP_SYNCS[task], fast_calls
    reference, _ = count_step_syncs(task, fast=False)
    assert reference > fast  # the counter sees the reference path's value checks and boolean indexing
