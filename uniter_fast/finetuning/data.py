"""The training stream of a fine-tuning config: the task's training streams (``Task.train_streams``: one for most
tasks, one per objective for the VCR second stage), each through the resumable ``TaskLoader``, drawn by the task
mixer one stream per optimizer step (the ``MetaLoader``, which holds the accumulation cycle). Token budgets are
checked against each stream's longest example before training."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from uniter_fast.data import MetaLoader, TaskLoader
from uniter_fast.data.buckets import mean_example_tokens
from uniter_fast.data.sampler import check_token_budget
from uniter_fast.finetuning.config import FinetuneConfig
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.spec import Task
from uniter_fast.training.run import Run


def train_stream(task: Task, cfg: FinetuneConfig, dbs: DbCache, options: dict[str, Any], run: Run) -> MetaLoader:
    """Endless, resumable (stream name, batch) pairs for rank ``run.rank``, ``run.grad_accum_steps`` micro-batches
    per optimizer step."""
    loaders, ratios = {}, {}
    for name, (dataset, ratio) in task.train_streams(dbs, cfg.train_pairs(), options, cfg.seed).items():
        if not task.by_examples:
            what = f"task {task.name!r}" + (f" stream {name!r}" if name != task.name else "")
            check_token_budget(cfg.train_batch_size, int(dataset.lens.max()), "train_batch_size", what)
        loaders[name] = TaskLoader(
            dataset, cfg.train_batch_size, cfg.seed, run.rank, run.world, run.num_workers, droplast=True
        )
        ratios[name] = ratio
    return MetaLoader(loaders, ratios, run.grad_accum_steps, seed=cfg.seed)


def capture_tokens(task: Task, datasets: list[Any], batch_size: int, seed: int) -> Optional[int]:
    """The packed tokens (text tokens + regions) a training micro-batch of ``task`` holds, which size the captured
    step's buckets (``Trainer``'s ``capture_tokens``): None for a task whose ``batch_size`` is a token budget
    already; for one whose ``batch_size`` counts examples (``Task.by_examples``: RE, ITM), ``batch_size`` x the mean
    packed tokens of an example of its training ``datasets`` (``mean_example_tokens``: a sample drawn with ``seed``)."""
    if not task.by_examples:
        return None
    mean = float(np.mean([mean_example_tokens(dataset, batch_size, seed) for dataset in datasets]))
    return round(batch_size * mean)


def eval_datasets(task: Task, cfg: FinetuneConfig, dbs: DbCache, options: dict[str, Any]) -> dict[str, Any]:
    """{split: the task's evaluation data} of the configured evaluation splits."""
    return {
        split: task.eval_dataset(dbs, txt_path, img_path, options, split, cfg.seed)
        for split, (txt_path, img_path) in cfg.eval_sets().items()
    }
