"""The fine-tuning loop: the pretraining ``Trainer`` (steps, accumulation, DeepSpeed checkpoints, exact resume,
logging) with the task's evaluation, prediction files and export plugged in.

Each validation evaluates every configured split ("val", "test") with the task's metric, writes the predictions in
the original's format to ``output_dir/results/{split}_results_{step}.*`` and logs the metrics to TensorBoard
(``val/{split}/{metric}``). At the end the consolidated weights go to ``output_dir/finetuned/`` (``config.json`` +
``model.safetensors`` + ``task.json``, loadable by ``evaluate.py``) plus ``model_step_{N}.pt`` in the original
layout.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

from uniter_fast.data.loader import move_to_device
from uniter_fast.pretraining.checkpoint import load_consolidated_zero
from uniter_fast.pretraining.trainer import TaskStream, Trainer, _barrier, format_table
from uniter_fast.tasks.checkpoint import save_task_model
from uniter_fast.tasks.data import TaskDataset
from uniter_fast.tasks.spec import Task

RESULTS_SUBDIR = "results"
FINETUNED_SUBDIR = "finetuned"


class FinetuneTrainer(Trainer):
    """Trains a task model (``engine`` wraps it) on ``stream`` and evaluates it on ``eval_sets``."""

    validate_at_start = False  # the final table reports the task's metric after training only

    def __init__(
        self,
        engine: Any,
        cfg: Any,
        stream: TaskStream,
        task: Task,
        options: dict[str, Any],
        eval_sets: dict[str, TaskDataset],
        output_dir: str,
        writer: Optional[Any] = None,
        world: int = 1,
    ) -> None:
        super().__init__(engine, cfg, stream, dict, output_dir, writer)
        self.task, self.options, self.eval_sets, self.world = task, options, eval_sets, world
        self.progress_name = f"finetune {task.name}"

    def run_validation(self) -> dict[str, dict[str, float]]:
        """Evaluate every split (all ranks), write its predictions (rank 0), log; returns {split: metrics}."""
        results = {}
        with torch.random.fork_rng(devices=[]):
            for split, dataset in self.eval_sets.items():
                metrics, predictions = self.task.evaluate_split(
                    self.engine,
                    dataset,
                    self.cfg.val_batch_size,
                    self.options,
                    self.rank,
                    self.world,
                    lambda b: move_to_device(b, self.engine.device),
                    desc=f"eval {split}",
                )
                results[split] = metrics
                if self.rank == 0:
                    directory = os.path.join(self.output_dir, RESULTS_SUBDIR)
                    os.makedirs(directory, exist_ok=True)
                    self.task.write_predictions(predictions, directory, f"{split}_results_{self.step}")
        self._log_validation(results)
        return results

    def export(self, tag: str) -> None:
        """Consolidated fp32 weights of checkpoint ``tag`` into ``output_dir/finetuned`` (rank 0)."""
        if self.rank == 0:
            module = self.engine.module
            if self.engine.zero_optimization_stage() > 0:
                fresh = self.task.build_model(module.config, self.options, module.fast)
                load_consolidated_zero(fresh, self.ckpt_dir, tag)
                module = fresh
            save_task_model(module, self.task, self.options, os.path.join(self.output_dir, FINETUNED_SUBDIR), self.step)
        _barrier()

    def summary(self, results: dict[str, dict[str, float]]) -> str:
        """The final table: one row per evaluated split with the task's metrics, and the last training loss."""
        keys = sorted({k for m in results.values() for k in m}, key=lambda k: (k != self.task.headline, k))
        recent = self.recent.get(self.task.name) or [v for vs in self.recent.values() for v in vs]
        train = f"{np.mean(recent):.4f}" if recent else "-"
        rows = [[split, train, *(f"{m[k]:.4f}" if k in m else "-" for k in keys)] for split, m in results.items()]
        return format_table(rows, ["split", "train loss", *keys])
