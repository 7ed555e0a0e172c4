"""What a run leaves in its ``output_dir``, and the rule that a new run never mixes its files with a previous run's.

A run's outputs are the training floor's (``train_steps.jsonl``, ``validation.jsonl``, ``tb/``, ``ckpt/``) and the
recipe's (:meth:`~uniter_fast.training.config.RunConfig.run_outputs`: pretraining's ``pretrained/``, ``curves.png``,
``alignment.png``; fine-tuning's export dir and ``results/``), with the temporary files and directories of their
atomic writes that a killed process left (``.tmp-*-<name>``). An output dir holding any of them holds a previous run:
a new run there is refused unless ``--resume`` (continue it) or ``--overwrite`` (remove exactly those entries, then
start over) is given. Anything else in the dir is the user's and stays. The check runs before start-up.
"""

from __future__ import annotations

import logging
import os
import shutil

from uniter_fast.errors import ConfigError
from uniter_fast.files import TMP_PREFIX
from uniter_fast.training.config import RunConfig
from uniter_fast.training.distributed import launch_rank
from uniter_fast.training.logs import STEP_LOG, TB_SUBDIR, VAL_LOG
from uniter_fast.training.loop import CKPT_SUBDIR

logger = logging.getLogger(__name__)

RUN_FILES = (STEP_LOG, VAL_LOG, TB_SUBDIR, CKPT_SUBDIR)


def run_outputs(cfg: RunConfig) -> tuple[str, ...]:
    """Every name a run of ``cfg`` writes directly under its ``output_dir``: the training floor's and the recipe's."""
    return RUN_FILES + tuple(cfg.run_outputs())


def previous_run(output_dir: str, names: tuple[str, ...]) -> list[str]:
    """The entries of ``output_dir`` (sorted) that a run writing ``names`` left: those names, and the leftovers of
    their atomic writes (``.tmp-<random>-<name>``); [] when the dir does not exist."""
    if not os.path.isdir(output_dir):
        return []
    return [
        entry
        for entry in sorted(os.listdir(output_dir))
        if entry in names or (entry.startswith(TMP_PREFIX) and any(entry.endswith("-" + name) for name in names))
    ]


def _inside(path: str, directory: str) -> bool:
    path, directory = os.path.realpath(path), os.path.realpath(directory)
    return os.path.commonpath([path, directory]) == directory


def prepare_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> None:
    """Check ``cfg.output_dir`` before start-up: a previous run there needs ``resume`` or ``overwrite`` (else a
    ``ConfigError`` naming the dir, what is there and both options); ``resume`` needs a previous run; with
    ``overwrite`` the launcher's rank 0 removes the previous run's entries (refusing when the run's ``checkpoint``
    lies among them). Every rank calls it; only rank 0 removes, before the ranks start, so no rank sees a half-removed
    run."""
    directory = cfg.output_dir
    if resume and overwrite:
        raise ConfigError(
            f"--resume and --overwrite exclude each other (output dir {directory!r}): --resume continues the run "
            "there, --overwrite removes it and starts over; give one"
        )
    names = run_outputs(cfg)
    found = previous_run(directory, names)
    if resume and not found:
        raise ConfigError(
            f"--resume: output dir {directory!r} holds no previous run (none of {list(names)}); "
            "run without --resume to start one"
        )
    if found and not (resume or overwrite):
        raise ConfigError(
            f"output dir {directory!r} holds a previous run ({', '.join(found)}); give --resume to continue it, or "
            "--overwrite to remove those files and start over (or choose another --output_dir)"
        )
    if not overwrite or not found:
        return
    doomed = [os.path.join(directory, entry) for entry in found]
    if cfg.checkpoint and any(_inside(cfg.checkpoint, path) for path in doomed):
        raise ConfigError(
            f"--overwrite would remove the run's own --checkpoint {cfg.checkpoint!r} (part of the previous run in "
            f"{directory!r}); copy it elsewhere first, or choose another --output_dir"
        )
    if launch_rank() != 0:
        return
    for path in doomed:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    logger.info("--overwrite: removed the previous run's %s from %s", ", ".join(found), directory)
