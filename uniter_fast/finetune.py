"""Fine-tune UNITER on a downstream task with DeepSpeed:
``deepspeed uniter_fast/finetune.py --task vqa --ds_config ds.json [--config cfg.json]``.

Tasks: those of ``uniter_fast.tasks.TASKS`` (``--help`` lists them; NLVR2's ``"model"`` option picks paired,
triplet or paired-attn; vcr_pretrain is VCR's second-stage pretraining). Without ``--config`` it runs
``configs/finetune-<task>-tiny.json``: the tiny model on the bundled synthetic set of the task (built on first use),
starting from the default pretraining run's export when there is one, a few minutes on a CPU. Also runs as
``python uniter_fast/finetune.py ...`` and under ``torchrun``.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # bit-exact resume on CPU (see pretrain.py)

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Optional  # noqa: E402

from uniter_fast.entry import CommandParser, run_command  # noqa: E402
from uniter_fast.training.cli import add_run_arguments  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (the DeepSpeed launcher adds ``--local_rank``)."""
    from uniter_fast.tasks import TASKS

    parser = CommandParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--task", default=None, choices=sorted(TASKS), help="the task (default: the config's); its tiny config is used"
    )
    parser.add_argument("--config", default=None, help="fine-tuning config JSON (default: the task's tiny config)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    if args.task is None and args.config is None:
        parser.error("give --task (its bundled tiny config is used) or --config")
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    """Fine-tune as configured; returns the final metrics ({split: {metric: value}})."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from uniter_fast.finetuning.config import default_config, load_finetune_config
    from uniter_fast.finetuning.run import check_finetuning, finetune
    from uniter_fast.training.run import run_recipe

    cfg = load_finetune_config(args.config or default_config(args.task), args.checkpoint is not None)
    if args.task is not None and args.task != cfg.task:
        raise ValueError(f"--task {args.task} but the config {args.config!r} is for task {cfg.task!r}")
    return run_recipe(cfg, args, finetune, check_finetuning)


if __name__ == "__main__":
    run_command(main)
