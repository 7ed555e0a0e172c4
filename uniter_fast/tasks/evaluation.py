"""Run a task's evaluation over this rank's batches, sum over all ranks and gather every prediction.

Shared by the validation of ``finetune.py`` and by ``evaluate.py``: each rank evaluates its shard (the ranks step in
lockstep, as pretraining validation, so ZeRO-3 weight gathers match), the task's sums are all-reduced, the
prediction records are all-gathered, and the task turns them into metrics, identical on every rank.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from tqdm import tqdm

from uniter_fast.model.base import eval_mode
from uniter_fast.training.distributed import is_distributed, lockstep


@torch.no_grad()
def evaluate(
    task: Any,
    model: Any,
    batches: Iterable[dict[str, Any]],
    options: dict[str, Any],
    to_device: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b,
    desc: str = "eval",
) -> tuple[dict[str, float], list[Any]]:
    """(metrics, every rank's prediction records) of ``task`` (a :class:`~uniter_fast.tasks.spec.Task`: its ``sums``,
    ``eval_batch`` and ``metrics``) on ``batches`` (this rank's, finite).

    ``model`` is the task model or a DeepSpeed engine around it; it is put in eval mode and back.
    """
    totals = dict.fromkeys(task.sums, 0.0)
    predictions: list[Any] = []
    quiet = is_distributed() and dist.get_rank() != 0
    with eval_mode(model) as module:
        device = next(module.parameters()).device
        for batch, counts in tqdm(lockstep(batches, device), desc=desc, disable=quiet, leave=False):
            sums, preds = task.eval_batch(model, to_device(batch), options)
            if counts:
                for key in task.sums:
                    totals[key] += sums[key]
                predictions += preds
    if is_distributed():
        vector = torch.tensor([totals[k] for k in task.sums], dtype=torch.float64, device=device)
        dist.all_reduce(vector)
        totals = dict(zip(task.sums, vector.tolist()))
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, predictions)
        predictions = [p for part in gathered for p in part]
    return task.metrics(totals, predictions), predictions
