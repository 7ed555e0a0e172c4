"""Training stream and evaluation sets of a fine-tuning config.

Every (txt_db, img_db) training pair gives the task's dataset(s) (VCR: a Q->A and a QA->R one), concatenated as the
original's ``ConcatDatasetWithLens``, batched by the token-bucket sampler of pretraining (RE: by examples), through
the resumable ``TaskLoader`` and a one-task ``MetaLoader`` (which holds the accumulation cycle). The token budget is
checked against the longest example before training.
"""

from __future__ import annotations

from typing import Any

from uniter_fast.data import MetaLoader, TaskLoader
from uniter_fast.pretraining.data import SIZE_MULTIPLE
from uniter_fast.tasks.data import ConcatTaskDatasets, DbCache, TaskDataset
from uniter_fast.tasks.spec import Task


def train_dataset(task: Task, cfg: Any, dbs: DbCache, options: dict[str, Any]) -> Any:
    """The task's training data over every configured pair (one dataset, or a concatenation)."""
    parts: list[TaskDataset] = []
    for txt_path, img_path in zip(cfg.train_txt_dbs, cfg.train_img_dbs):
        made = task.train_dataset(dbs, txt_path, img_path, options, cfg.seed)
        parts += made if isinstance(made, list) else [made]
    dataset = parts[0] if len(parts) == 1 else ConcatTaskDatasets(parts)
    longest = int(dataset.lens.max())
    if not task.by_examples and cfg.train_batch_size < SIZE_MULTIPLE * longest:
        raise ValueError(
            f"train_batch_size={cfg.train_batch_size} tokens is too small for task {task.name!r}: its longest example "
            f"has {longest} tokens (text + regions) and a batch holds at least {SIZE_MULTIPLE} examples; use >= "
            f"{SIZE_MULTIPLE * longest}"
        )
    return dataset


def train_stream(
    task: Task, cfg: Any, dbs: DbCache, options: dict[str, Any], rank: int, world: int, num_workers: int, accum: int
) -> MetaLoader:
    """Endless, resumable (task name, batch) pairs, ``accum`` micro-batches per optimizer step."""
    dataset = train_dataset(task, cfg, dbs, options)
    loader = TaskLoader(dataset, cfg.train_batch_size, cfg.seed, rank, world, num_workers, droplast=True)
    return MetaLoader({task.name: loader}, None, accum, seed=cfg.seed)


def eval_datasets(task: Task, cfg: Any, dbs: DbCache, options: dict[str, Any]) -> dict[str, TaskDataset]:
    """{split: dataset} of the configured evaluation splits."""
    return {
        split: task.eval_dataset(dbs, txt_path, img_path, options, split)
        for split, (txt_path, img_path) in cfg.eval_sets().items()
    }
