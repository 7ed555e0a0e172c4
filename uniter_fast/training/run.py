"""The one run set-up under both recipes: check everything checkable before start-up, start the ranks, build the
engine, train with the recipe's callables, and head the final summary."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Any, Callable, Optional

from uniter_fast.checkpoint import CONFIG_NAME, Checkpoint, read_checkpoint
from uniter_fast.errors import ConfigError
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.training.adversarial import MicroStep
from uniter_fast.training.budget import AUTO, BudgetChoice, choose_budget, cuda_memory_bytes
from uniter_fast.training.cli import apply_run_arguments
from uniter_fast.training.config import RunConfig
from uniter_fast.training.distributed import init_ranks, launch_rank, launch_world, setup_environment
from uniter_fast.training.engine import build_engine, load_ds_config
from uniter_fast.training.logs import open_output_dir
from uniter_fast.training.loop import CKPT_SUBDIR, Export, Results, TaskStream, Trainer, Validate
from uniter_fast.training.outputs import prepare_output_dir

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    """A started run: this process's ``rank`` of ``world``, its data-loader ``num_workers``, the completed
    ``ds_config`` and the initial ``checkpoint`` (the config's, read before start-up; None without one)."""

    rank: int
    world: int
    num_workers: int
    ds_config: dict[str, Any]
    checkpoint: Optional[Checkpoint] = None

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step (ds.json's ``gradient_accumulation_steps`` after the run config's)."""
        return int(self.ds_config["gradient_accumulation_steps"])

    def take_checkpoint(self) -> Optional[Checkpoint]:
        """The initial checkpoint, handed over once: the run keeps no reference to it, so that its tensors are freed
        once the recipe has loaded them into the model."""
        checkpoint, self.checkpoint = self.checkpoint, None
        return checkpoint


CheckCheckpoint = Callable[[Any, Optional[Checkpoint]], None]
"""A recipe's checks before start-up: ``check(cfg, checkpoint)`` raises when the model config is bad or the initial
checkpoint (None without one) does not fit it."""


def check_output_dir(output_dir: str) -> None:
    """``output_dir`` must be a directory or creatable (its nearest existing parent writable); whether it holds a
    previous run is ``prepare_output_dir``'s (``uniter_fast.training.outputs``)."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"output_dir {output_dir!r} is a file, not a directory")
    parent = os.path.abspath(output_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output_dir {output_dir!r}: {parent!r} is not writable")


def resolve_budget(cfg: RunConfig, world: int) -> BudgetChoice:
    """Resolve ``cfg.train_batch_size`` (``"auto"``: from this rank's CUDA device) and, with ``tokens_per_update``,
    set ``cfg.gradient_accumulation_steps`` from it for ``world`` ranks (in place; :mod:`uniter_fast.training.budget`);
    a run config's own ``gradient_accumulation_steps`` must agree. Returns the choice (its ``line()`` is logged)."""
    fallback = next(f.default for f in dataclasses.fields(cfg) if f.name == "train_batch_size")
    memory = cuda_memory_bytes()
    sized = cfg.train_batch_size == AUTO and cfg.tokens_per_update is not None and memory is not None
    model = cfg.budget_model() if sized else None  # the model's size only where a device will be sized
    choice = choose_budget(cfg.train_batch_size, cfg.tokens_per_update, world, fallback, model, memory)
    given = cfg.gradient_accumulation_steps
    if choice.accumulation is not None and given is not None and given != choice.accumulation:
        raise ConfigError(
            f"gradient_accumulation_steps={given} contradicts tokens_per_update={cfg.tokens_per_update}, which with "
            f"train_batch_size={choice.budget} on {world} rank(s) needs {choice.accumulation}; give one of the two"
        )
    cfg.train_batch_size = choice.budget
    if choice.accumulation is not None:
        cfg.gradient_accumulation_steps = choice.accumulation
    return choice


def check_run(
    cfg: RunConfig, args: argparse.Namespace, check: Optional[CheckCheckpoint] = None
) -> tuple[dict[str, Any], Optional[Checkpoint]]:
    """Everything a run can check before distributed start-up (the slow part), in well under a second beyond
    reading the initial checkpoint: the token budget (:func:`resolve_budget`, logged on rank 0), ``ds.json`` (read,
    completed and checked by the installed DeepSpeed's reader), the output dir, and the initial checkpoint
    ``cfg.checkpoint``, read once here (layout) and checked by the recipe's ``check`` (sizes against the model
    config). Returns (the completed ds config, the checkpoint)."""
    setup_environment()
    choice = resolve_budget(cfg, launch_world())
    if launch_rank() == 0:
        logger.info(choice.line())
    ds_config = load_ds_config(args.ds_config, cfg, args.allow_unknown_ds_keys)
    check_output_dir(cfg.output_dir)
    checkpoint = read_checkpoint(cfg.checkpoint) if cfg.checkpoint else None
    if check is not None:
        check(cfg, checkpoint)
    return ds_config, checkpoint


def start_run(cfg: RunConfig, ds_config: dict[str, Any], checkpoint: Optional[Checkpoint] = None) -> Run:
    """Start this rank of the checked run (:func:`check_run`): threads, DeepSpeed's process group, logging, seeds."""
    rank, world, num_workers = init_ranks(cfg.seed, cfg.num_workers)
    return Run(rank, world, num_workers, ds_config, checkpoint)


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
    micro_step: Optional[MicroStep] = None,
    capture_tokens: Optional[int] = None,
) -> tuple[Trainer, Results]:
    """Train ``model`` on ``stream`` as ``cfg`` says (the engine with the original's optimizer groups; ``lr_mul`` for
    the parameters under ``head_names``; ``micro_step``: the micro-batch step, default forward + backward;
    ``capture_tokens``: the tokens a micro-batch holds, for the captured step's buckets, see ``Trainer``), resuming
    from ``output_dir`` with ``resume``; returns the trainer (its
    ``step``, ``recent`` losses, ``engine``) and the final validation results. ``model.config`` is written beside
    the checkpoints (``ckpt/config.json``), so a DeepSpeed checkpoint loads with its model's sizes."""
    writer = open_output_dir(cfg.output_dir, run.rank)
    if run.rank == 0:  # the model config beside the DeepSpeed checkpoints: `--checkpoint <output_dir>/ckpt` needs it
        os.makedirs(os.path.join(cfg.output_dir, CKPT_SUBDIR), exist_ok=True)
        model.config.to_json_file(os.path.join(cfg.output_dir, CKPT_SUBDIR, CONFIG_NAME))
    engine = build_engine(model, cfg, run.ds_config, lr_mul=lr_mul, head_names=head_names)
    trainer = Trainer(
        engine, cfg, stream, validate, export, writer, progress_name, validate_at_start, micro_step, capture_tokens
    )
    if resume:
        trainer.resume()
    try:
        results = trainer.train(stop_after)
    finally:
        if writer is not None:
            writer.close()
    return trainer, results


Recipe = Callable[[Any, Run, bool, Optional[int]], "tuple[Results, str]"]


def run_recipe(
    cfg: RunConfig, args: argparse.Namespace, recipe: Recipe, check: Optional[CheckCheckpoint] = None
) -> Results:
    """What a training CLI does once its config is read: the command-line overrides of ``args`` (the options of
    ``uniter_fast.training.cli``), the checks before start-up (:func:`check_run`, with the recipe's ``check``), the
    output dir checked against a previous run (``--resume`` / ``--overwrite``), start the run, ``recipe(cfg, run,
    resume, stop_after)``, print its text on rank 0 (after a ``--stop_after`` stop, and a line saying how to
    continue); returns the final results."""
    apply_run_arguments(cfg, args)
    checked = check_run(cfg, args, check)
    prepare_output_dir(cfg, args.resume, args.overwrite)
    run = start_run(cfg, *checked)
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
