"""The one run set-up under both recipes: start the ranks, build the engine, train with the recipe's callables, and
head the final summary."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Optional

from uniter_fast.checkpoint import CONFIG_NAME
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.training.cli import apply_run_arguments
from uniter_fast.training.config import RunConfig
from uniter_fast.training.distributed import init_ranks, setup_environment
from uniter_fast.training.engine import build_engine, load_ds_config
from uniter_fast.training.logs import open_output_dir
from uniter_fast.training.loop import CKPT_SUBDIR, Export, Results, TaskStream, Trainer, Validate
from uniter_fast.training.outputs import prepare_output_dir


@dataclasses.dataclass
class Run:
    """A started run: this process's ``rank`` of ``world``, its data-loader ``num_workers`` and the completed
    ``ds_config``."""

    rank: int
    world: int
    num_workers: int
    ds_config: dict[str, Any]

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step (ds.json's ``gradient_accumulation_steps`` after the run config's)."""
        return int(self.ds_config["gradient_accumulation_steps"])


def start_run(cfg: RunConfig, ds_config_path: str) -> Run:
    """Check and complete ``ds.json`` for ``cfg`` (before anything starts), then start this rank: the process-group
    environment, DeepSpeed's process group, threads, logging and seeds."""
    setup_environment()
    ds_config = load_ds_config(ds_config_path, cfg)
    rank, world, num_workers = init_ranks(cfg.seed, cfg.num_workers)
    return Run(rank, world, num_workers, ds_config)


def fit(
    run: Run,
    model: UniterPreTrainedModel,
    cfg: RunConfig,
    stream: TaskStream,
    validate: Validate,
    export: Export,
    *,
    resume: bool = False,
    stop_after: Optional[int] = None,
    progress_name: str = "train",
    validate_at_start: bool = False,
    lr_mul: float = 1.0,
    head_names: tuple[str, ...] = (),
) -> tuple[Trainer, Results]:
    """Train ``model`` on ``stream`` as ``cfg`` says (the engine with the original's optimizer groups; ``lr_mul`` for
    the parameters under ``head_names``), resuming from ``output_dir`` with ``resume``; returns the trainer (its
    ``step``, ``recent`` losses, ``engine``) and the final validation results. ``model.config`` is written beside
    the checkpoints (``ckpt/config.json``), so a DeepSpeed checkpoint loads with its model's sizes."""
    writer = open_output_dir(cfg.output_dir, run.rank)
    if run.rank == 0:  # the model config beside the DeepSpeed checkpoints: `--checkpoint <output_dir>/ckpt` needs it
        os.makedirs(os.path.join(cfg.output_dir, CKPT_SUBDIR), exist_ok=True)
        model.config.to_json_file(os.path.join(cfg.output_dir, CKPT_SUBDIR, CONFIG_NAME))
    engine = build_engine(model, cfg, run.ds_config, lr_mul=lr_mul, head_names=head_names)
    trainer = Trainer(engine, cfg, stream, validate, export, writer, progress_name, validate_at_start)
    if resume:
        trainer.resume()
    try:
        results = trainer.train(stop_after)
    finally:
        if writer is not None:
            writer.close()
    return trainer, results


Recipe = Callable[[Any, Run, bool, Optional[int]], "tuple[Results, str]"]


def run_recipe(cfg: RunConfig, args: argparse.Namespace, recipe: Recipe) -> Results:
    """What a training CLI does once its config is read: the command-line overrides of ``args`` (the options of
    ``uniter_fast.training.cli``), the output dir checked against a previous run (``--resume`` / ``--overwrite``),
    start the run, ``recipe(cfg, run, resume, stop_after)``, print its text on rank 0 (after a ``--stop_after`` stop,
    and a line saying how to continue); returns the final results."""
    apply_run_arguments(cfg, args)
    prepare_output_dir(cfg, args.resume, args.overwrite)
    run = start_run(cfg, args.ds_config)
    results, text = recipe(cfg, run, args.resume, args.stop_after)
    if run.rank == 0:
        print(text)
        if args.stop_after is not None and args.stop_after < cfg.num_train_steps:
            print(stopped_line(cfg, args.stop_after))
    return results


def summary_heading(what: str, trainer: Trainer, run: Run) -> str:
    """``final <what> after N steps (W rank(s), ZeRO-k):``, the first line of every final table; for a run stopped
    before ``num_train_steps``, ``<what> at step N of M (...)``."""
    where = f"({run.world} rank(s), ZeRO-{trainer.engine.zero_optimization_stage()})"
    if trainer.step < trainer.cfg.num_train_steps:
        return f"{what} at step {trainer.step} of {trainer.cfg.num_train_steps} {where}:"
    return f"final {what} after {trainer.step} steps {where}:"


def stopped_line(cfg: RunConfig, step: int) -> str:
    """The last line of a run stopped by ``--stop_after``: where it stopped, its checkpoint, how to continue."""
    return (
        f"stopped at step {step} of {cfg.num_train_steps} (--stop_after) with a checkpoint in "
        f"{os.path.join(cfg.output_dir, CKPT_SUBDIR)}; to continue, run the same command with --resume "
        "(without --stop_after, or with a later step)"
    )
