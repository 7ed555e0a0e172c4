"""Build the model, data, engine and trainer of a fine-tuning config and run it (after the process group exists)."""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

from uniter_fast.finetuning.config import FinetuneConfig
from uniter_fast.finetuning.data import eval_datasets, train_stream
from uniter_fast.finetuning.trainer import FinetuneTrainer
from uniter_fast.pretraining.engine import build_engine
from uniter_fast.pretraining.trainer import open_output_dir
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import DbCache

logger = logging.getLogger(__name__)


def dropout_overrides(cfg: FinetuneConfig) -> dict[str, Any]:
    """Model config overrides: ``dropout`` for every dropout of the encoder (the original's ``set_dropout``) and the
    config's ``model_overrides``."""
    return {"hidden_dropout_prob": cfg.dropout, "attention_probs_dropout_prob": cfg.dropout, **cfg.model_overrides}


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


def run(
    cfg: FinetuneConfig,
    ds_config: dict[str, Any],
    rank: int,
    world: int,
    num_workers: int,
    resume: bool = False,
    stop_after: Optional[int] = None,
) -> tuple[dict[str, dict[str, float]], str]:
    """Fine-tune as ``cfg`` says; returns (final metrics by split, the summary table text)."""
    if cfg.task == "vcr_pretrain":
        from uniter_fast.finetuning.vcr_pretrain import run_vcr_pretraining

        return run_vcr_pretraining(cfg, ds_config, rank, world, num_workers, resume, stop_after, dropout_overrides(cfg))
    task = get_task(cfg.task)
    dbs = DbCache(cfg)
    txt_paths = list(cfg.train_txt_dbs) + [txt for txt, _ in cfg.eval_sets().values()]
    options = {**cfg.options, **task.data_options(dbs, txt_paths, cfg.options)}
    model, options = load_task_model(
        task, cfg.checkpoint, options, cfg.model_config, cfg.fast, config_overrides=dropout_overrides(cfg)
    )
    stream = train_stream(task, cfg, dbs, options, rank, world, num_workers, ds_config["gradient_accumulation_steps"])
    eval_sets = eval_datasets(task, cfg, dbs, options)
    fit_vocab(dbs, model)

    writer = open_output_dir(cfg.output_dir, rank)
    lr_mul, heads = (cfg.lr_mul, task.heads) if task.head_lr_mul else (1.0, ())
    engine = build_engine(model, cfg, ds_config, lr_mul=lr_mul, head_names=heads)
    trainer = FinetuneTrainer(engine, cfg, stream, task, options, eval_sets, cfg.output_dir, writer, world)
    if resume:
        trainer.resume()
    results = trainer.train(stop_after)
    lines = [
        f"\nfinal {task.name} metrics after {trainer.step} steps ({world} rank(s), ZeRO-"
        f"{engine.zero_optimization_stage()}):",
        trainer.summary(results),
    ]
    if trainer.step == cfg.num_train_steps:
        lines.append(f"fine-tuned weights: {os.path.join(cfg.output_dir, 'finetuned')}")
    if writer is not None:
        writer.close()
    return results, "\n".join(lines)
