"""UNITER pretraining with DeepSpeed: ``deepspeed uniter_fast/pretrain.py --ds_config ds.json [--config cfg.json]``.

Also runs as ``python uniter_fast/pretrain.py ...`` (one process) and under ``torchrun``. Without ``--config`` it
trains the tiny model of ``configs/pretrain-tiny.json`` on the bundled corpus (a few minutes on a CPU).
"""

import os

# MKL picks CPU kernels by memory alignment, so the same math can round differently after a resume; strict CNR mode
# keeps results bit-identical (``--resume`` continues exactly). Read when MKL loads, so before torch is imported.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Optional  # noqa: E402

from uniter_fast.entry import CommandParser, run_command  # noqa: E402
from uniter_fast.training.cli import REPO_ROOT, add_run_arguments  # noqa: E402

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "pretrain-tiny.json")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (the DeepSpeed launcher adds ``--local_rank``)."""
    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="training config JSON (default: tiny, bundled data)")
    add_run_arguments(parser)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    """Train as configured; returns the final validation metrics ({task: {metric: value}})."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from uniter_fast.pretraining.config import load_training_config
    from uniter_fast.pretraining.run import check_pretraining, pretrain
    from uniter_fast.training.run import run_recipe

    cfg = load_training_config(args.config, args.checkpoint is not None)
    return run_recipe(cfg, args, pretrain, check_pretraining)


if __name__ == "__main__":
    run_command(main)
