"""The pretraining recipe: what ``pretrain.py`` hands the training loop (model, task mixer, validation, export) and
the final table it prints."""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

from uniter_fast.checkpoint import Checkpoint, check_config_fits, load_state, save_pretrained
from uniter_fast.config import UniterConfig
from uniter_fast.data.loader import move_to_device
from uniter_fast.files import atomic_directory
from uniter_fast.pretraining.config import TrainingConfig, configured_model_config
from uniter_fast.pretraining.data import DataBuilder
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.pretraining.validate import validate
from uniter_fast.training.adversarial import AdversarialStep
from uniter_fast.training.logs import PRETRAINED_SUBDIR, VAL_LOG, format_table, read_jsonl
from uniter_fast.training.loop import Export, Results, Trainer
from uniter_fast.training.run import Run, fit, summary_heading
from uniter_fast.training.zero import consolidated_model


def model_config_of(cfg: TrainingConfig, vocab_size: int) -> UniterConfig:
    """The model config (:func:`configured_model_config`); ``ValueError`` when its word table is smaller than the
    text dbs' vocabulary ``vocab_size``."""
    config = configured_model_config(cfg)
    if vocab_size > config.vocab_size:
        raise ValueError(f"model vocab_size {config.vocab_size} is smaller than the text dbs' vocabulary {vocab_size}")
    return config


def check_pretraining(cfg: TrainingConfig, checkpoint: Optional[Checkpoint]) -> None:
    """The checks of a pretraining run before start-up: the model config resolves, and the initial checkpoint's
    weights have its sizes."""
    config = configured_model_config(cfg)
    if checkpoint is not None:
        check_config_fits(
            checkpoint, config, repr(cfg.model) + (" with its model_overrides" if cfg.model_overrides else "")
        )


def pretrained_export(model_config: UniterConfig, output_dir: str) -> Export:
    """The export of a pretraining run: the consolidated fp32 weights of the checkpoint into
    ``output_dir/pretrained`` (``config.json`` + ``model.safetensors``, every pretraining key), which appears whole
    (a previous export is replaced) or not at all."""

    def export(engine: Any, checkpoint_dir: str, tag: str) -> None:
        trained = consolidated_model(engine, checkpoint_dir, tag, lambda: UniterForPretraining(model_config))
        with atomic_directory(os.path.join(output_dir, PRETRAINED_SUBDIR), replace=True) as directory:
            save_pretrained(trained, directory, dtype=torch.float32)

    return export


def summary_table(trainer: Trainer, results: Results) -> str:
    """The final metrics table: per task, the mean training loss of its last steps, the validation loss at step 0
    (untrained) and now, and the other validation metrics (accuracy; mean OT distance of matched / mismatched
    pairs for ITM)."""
    first = {r["task"]: r for r in read_jsonl(os.path.join(trainer.output_dir, VAL_LOG)) if r["step"] == 0}
    extra = sorted({k for m in results.values() for k in m} - {"loss"})
    rows = []
    for task in sorted(set(results) | set(trainer.recent)):
        train = f"{np.mean(trainer.recent[task]):.4f}" if trainer.recent.get(task) else "-"
        val = results.get(task, {})
        start = f"{first[task]['loss']:.4f}" if task in first else "-"
        now = f"{val['loss']:.4f}" if "loss" in val else "-"
        rows.append([task, train, start, now, *(f"{val[k]:.4f}" if k in val else "-" for k in extra)])
    header = ["task", "train loss", "val loss step 0", "val loss", *(f"val {k}" for k in extra)]
    return format_table(rows, header)


def pretrain(
    cfg: TrainingConfig, run: Run, resume: bool = False, stop_after: Optional[int] = None
) -> tuple[Results, str]:
    """Pretrain as ``cfg`` says on the started ``run``; returns (final validation metrics {task: {metric: value}},
    the text to print: the final table, and after a whole run the export and the pictures)."""
    data = DataBuilder(cfg, run.rank, run.world, run.num_workers)
    stream = data.train_stream(run.grad_accum_steps)
    val_sets = data.val_datasets()
    model_config = model_config_of(cfg, data.vocab_size())
    model = UniterForPretraining(model_config, fast=cfg.fast, itm_ot_lambda=cfg.itm_ot_lambda, ot_settings=vars(cfg.ot))
    checkpoint = run.take_checkpoint()
    if checkpoint is not None:
        load_state(model, checkpoint.state, checkpoint.path, strict=False)
    del checkpoint  # its tensors are in the model now

    def validate_all(engine: Any, step: int) -> Results:
        loaders = {name: data.val_batches(dset) for name, dset in val_sets.items()}
        return validate(engine, loaders, lambda b: move_to_device(b, engine.device))

    trainer, results = fit(
        run,
        model,
        cfg,
        stream,
        validate_all,
        pretrained_export(model_config, cfg.output_dir),
        resume=resume,
        stop_after=stop_after,
        progress_name="pretrain",
        validate_at_start=True,
        micro_step=None if cfg.adversarial is None else AdversarialStep(cfg.adversarial, model),
    )
    lines = ["", summary_heading("metrics", trainer, run), summary_table(trainer, results)]
    if trainer.step == cfg.num_train_steps and run.rank == 0:
        lines += finished_run_lines(cfg, model_config, cfg.output_dir)
    return results, "\n".join(lines)


def finished_run_lines(cfg: TrainingConfig, model_config: UniterConfig, output_dir: str) -> list[str]:
    """The last lines of a finished run: its export and the pictures drawn from it. Without matplotlib (the
    ``[train]`` extra has it) a line says the pictures were not drawn: the table and the export stand without them."""
    lines = [f"consolidated fp32 weights: {os.path.join(output_dir, PRETRAINED_SUBDIR)}"]
    try:
        from uniter_fast.pretraining.plots import write_pictures
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("matplotlib"):
            raise
        return lines + [f"pictures not drawn (curves.png, alignment.png): {e}; pip install matplotlib to draw them"]
    curves, alignment = write_pictures(cfg, model_config, output_dir)
    return lines + [
        f"training and validation curves: {curves}",
        f"word-region alignment of validation pairs: {alignment}",
    ]
