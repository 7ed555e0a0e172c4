"""The fine-tuning recipe: what ``finetune.py`` hands the training loop for a task (model, stream, validation,
export) and the final table it prints.

Each validation evaluates every configured split ("val", "test") with the task's metric, writes the predictions in
the original's format to ``output_dir/results/{split}_results_{step}.*`` and logs the metrics (TensorBoard
``val/{split}/{metric}``). At the end the consolidated weights go to ``output_dir/<task.export_dir>/``
(``config.json`` + ``model.safetensors`` + ``task.json``, loadable by ``evaluate.py``) plus ``model_step_{N}.pt`` in
the original layout.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Optional

import numpy as np

from uniter_fast.checkpoint import Checkpoint, check_config_fits, resolve_config
from uniter_fast.data.loader import move_to_device
from uniter_fast.errors import ConfigError
from uniter_fast.files import atomic_directory
from uniter_fast.finetuning.config import RESULTS_SUBDIR, FinetuneConfig
from uniter_fast.finetuning.data import capture_tokens, eval_datasets, train_stream
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import bundled_vocab
from uniter_fast.tasks.checkpoint import VOCAB_FILE, load_task_model, save_task_model, task_model_config
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.spec import Task
from uniter_fast.training.adversarial import AdversarialStep
from uniter_fast.training.logs import format_table
from uniter_fast.training.loop import Results, Trainer
from uniter_fast.training.run import Run, fit, summary_heading
from uniter_fast.training.zero import consolidated_model, frozen_parameters

logger = logging.getLogger(__name__)


def dropout_overrides(cfg: FinetuneConfig) -> dict[str, Any]:
    """Model config overrides: ``dropout`` for every dropout of the encoder (the original's ``set_dropout``) and the
    config's ``model_overrides``."""
    return {"hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout, **cfg.model_overrides}


def check_finetuning(cfg: FinetuneConfig, checkpoint: Optional[Checkpoint]) -> None:
    """The checks of a fine-tuning run before start-up: the model config resolves, and the initial checkpoint's
    weights have its sizes (the config given, else the one saved with the checkpoint); a run whose task needs a
    checkpoint (``Task.checkpoint_required``) has one."""
    if checkpoint is None:
        reason = get_task(cfg.task).checkpoint_required(cfg.options)
        if reason is not None:
            raise ConfigError(f"checkpoint: {reason}, got none")
        resolve_config(cfg.model_config or "tiny")
        return
    if cfg.model_config is None and checkpoint.config is None:
        return  # the sizes will be read off the weights
    config = task_model_config(checkpoint, cfg.model_config, dropout_overrides(cfg))
    check_config_fits(checkpoint, config, repr(cfg.model_config or checkpoint.config_path))


def fit_vocab(dbs: DbCache, model: Any) -> None:
    """Grow the model's word table (fresh N(0, 0.02) rows, a warning) when a text db's vocabulary is larger: the
    bundled task sets extend the pretraining corpus's vocabulary with the task's words (corpus ids unchanged)."""
    used = max(int(db.v_range[1]) for db in dbs.opened_txt_dbs())
    if used > model.config.vocab_size:
        logger.warning(
            "word table grown from %d to %d rows for the text dbs' vocabulary (the new words start untrained)",
            model.config.vocab_size,
            used,
        )
        model.init_word_embedding(used - model.config.vocab_size)


def summary_table(task: Task, trainer: Trainer, results: Results) -> str:
    """The final table: one row per evaluated split with the task's metrics (its headline first), and the mean loss
    of the last training steps."""
    keys = sorted({k for m in results.values() for k in m}, key=lambda k: (k != task.headline, k))
    recent = [v for values in trainer.recent.values() for v in values]
    train = f"{np.mean(recent):.4f}" if recent else "-"
    rows = [[split, train, *(f"{m[k]:.4f}" if k in m else "-" for k in keys)] for split, m in results.items()]
    return format_table(rows, ["split", "train loss", *keys])


def finetune(
    cfg: FinetuneConfig, run: Run, resume: bool = False, stop_after: Optional[int] = None
) -> tuple[Results, str]:
    """Fine-tune ``cfg.task`` as ``cfg`` says on the started ``run``; returns (final metrics {split: {metric:
    value}}, the text to print: the final table and, after a whole run, where the weights went)."""
    task = get_task(cfg.task)
    dbs = DbCache(cfg)
    options = {**cfg.options, **task.data_options(dbs, cfg.txt_dbs(), cfg.options)}
    model, options = load_task_model(
        task, run.take_checkpoint(), options, cfg.model_config, cfg.fast, config_overrides=dropout_overrides(cfg)
    )
    stream = train_stream(task, cfg, dbs, options, run)
    eval_sets = eval_datasets(task, cfg, dbs, options)
    fit_vocab(dbs, model)

    def validate(engine: Any, step: int) -> Results:
        results = {}
        for split, dataset in eval_sets.items():
            metrics, predictions = task.evaluate_split(
                engine,
                dataset,
                cfg.val_batch_size,
                options,
                run.rank,
                run.world,
                lambda b: move_to_device(b, engine.device),
                desc=f"eval {split}",
            )
            results[split] = metrics
            if run.rank == 0:
                directory = os.path.join(cfg.output_dir, RESULTS_SUBDIR)
                os.makedirs(directory, exist_ok=True)
                meta = {"task": task.name, "split": split, "run": os.path.abspath(cfg.output_dir), "step": step}
                task.write_predictions(predictions, directory, f"{split}_results_{step}", meta)
        return results

    vocab = bundled_vocab(cfg.train_txt_dbs)
    frozen = frozen_parameters(model)  # e.g. the cross-encoder of an ITM tower distilled alone: exported as loaded

    def export(engine: Any, checkpoint_dir: str, tag: str) -> None:
        trained = consolidated_model(
            engine, checkpoint_dir, tag, lambda: task.build_model(model.config, options, model.fast), frozen
        )
        with atomic_directory(os.path.join(cfg.output_dir, task.export_dir), replace=True) as directory:
            save_task_model(trained, task, options, directory, cfg.num_train_steps)
            if vocab is not None:  # trained on the bundled sets: predict, search and the demo find its words here
                shutil.copyfile(vocab, os.path.join(directory, VOCAB_FILE))

    lr_mul, heads = (cfg.lr_mul, task.heads) if task.head_lr_mul else (1.0, ())
    micro_step = None if cfg.adversarial is None else AdversarialStep(cfg.adversarial, model)
    datasets = [loader.dataset for loader in stream.loaders.values()]
    tokens = capture_tokens(task, datasets, cfg.train_batch_size, cfg.seed) if cfg.capture else None
    trainer, results = fit(
        run,
        model,
        cfg,
        stream,
        validate,
        export,
        resume=resume,
        stop_after=stop_after,
        progress_name=f"finetune {task.name}",
        lr_mul=lr_mul,
        head_names=heads,
        micro_step=micro_step,
        capture_tokens=tokens,
    )
    lines = ["", summary_heading(f"{task.name} metrics", trainer, run), summary_table(task, trainer, results)]
    if trainer.step == cfg.num_train_steps:
        lines.append(f"exported weights: {os.path.join(cfg.output_dir, task.export_dir)}")
    return results, "\n".join(lines)
