"""The command-line options every training CLI shares (``pretrain.py``, ``finetune.py``), and their overrides of the
run config, checked before any process group or model exists."""

from __future__ import annotations

import argparse
import os

from uniter_fast.errors import ConfigError
from uniter_fast.training.config import RunConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_DS_CONFIG = os.path.join(REPO_ROOT, "ds.json")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ds_config``, ``--allow_unknown_ds_keys``, ``--checkpoint``, ``--output_dir``, ``--num_train_steps``,
    ``--resume``, ``--overwrite``, ``--stop_after``, ``--reference``, ``--num_workers`` (and the DeepSpeed launcher's
    hidden ``--local_rank``)."""
    parser.add_argument("--ds_config", default=DEFAULT_DS_CONFIG, help="DeepSpeed config JSON (default: ds.json)")
    parser.add_argument(
        "--allow_unknown_ds_keys",
        action="store_true",
        help="accept ds.json keys that the installed DeepSpeed does not read (e.g. a newer version's), with a warning",
    )
    parser.add_argument("--checkpoint", default=None, help="override the config's checkpoint (a path, or 'none')")
    parser.add_argument("--output_dir", default=None, help="override output_dir of the config")
    parser.add_argument("--num_train_steps", type=int, default=None, help="override num_train_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an output_dir that holds a previous run: remove that run's files (other files stay)",
    )
    parser.add_argument("--stop_after", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument(
        "--reference", action="store_true", help="reference path (padded encoder, reference losses and OT)"
    )
    parser.add_argument(
        "--num_workers", type=int, default=None, help="data loader processes per loader (default: 0 on CPU, 2 on GPU)"
    )
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)


def apply_run_arguments(cfg: RunConfig, args: argparse.Namespace) -> None:
    """The command-line overrides of :func:`add_run_arguments` into ``cfg`` (in place); a ``--checkpoint`` that does
    not exist is a ``FileNotFoundError`` now, before any start-up."""
    if args.checkpoint is not None:
        cfg.checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
        if cfg.checkpoint is not None and not os.path.exists(cfg.checkpoint):
            raise FileNotFoundError(f"--checkpoint {cfg.checkpoint!r} does not exist")
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    if args.num_train_steps is not None:
        if args.num_train_steps <= 0:
            raise ValueError(f"--num_train_steps must be > 0, got {args.num_train_steps}")
        cfg.num_train_steps = args.num_train_steps
    if args.stop_after is not None and args.stop_after <= 0:
        raise ConfigError(f"--stop_after must be a step > 0, got {args.stop_after}")
    if args.reference:
        cfg.fast = False
    if args.num_workers is not None:
        cfg.num_workers = args.num_workers
