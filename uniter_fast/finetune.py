"""Fine-tune UNITER on a downstream task with DeepSpeed:
``deepspeed uniter_fast/finetune.py --task vqa --ds_config ds.json [--config cfg.json]``.

Tasks: vqa, ve, nlvr2 (``"model"``: paired, triplet, paired-attn), re, vcr and vcr_pretrain (VCR's second-stage
pretraining). Without ``--config`` it runs ``configs/finetune-<task>-tiny.json``: the tiny model on the bundled
synthetic set of the task (built on first use), starting from the default pretraining run's export when there is
one, a few minutes on a CPU. Also runs as ``python uniter_fast/finetune.py ...`` and under ``torchrun``.
"""

import os
import sys

# Run as a script, this file's directory (uniter_fast/) is sys.path[0]; its ot/ and data/ would shadow top-level
# packages such as POT's ``ot``. Drop it before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")  # bit-exact resume on CPU (see pretrain.py)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from typing import Optional  # noqa: E402

REPO_ROOT = os.path.dirname(_HERE)
logger = logging.getLogger("uniter_fast.finetune")


def default_config(task: str) -> str:
    """``configs/finetune-<task>-tiny.json`` (``_`` in the task name becomes ``-``)."""
    return os.path.join(REPO_ROOT, "configs", f"finetune-{task.replace('_', '-')}-tiny.json")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (the DeepSpeed launcher adds ``--local_rank``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default=None, help="vqa, ve, nlvr2, re, vcr or vcr_pretrain (default: the config's)")
    parser.add_argument("--config", default=None, help="fine-tuning config JSON (default: the task's tiny config)")
    parser.add_argument("--ds_config", default=os.path.join(REPO_ROOT, "ds.json"), help="DeepSpeed config JSON")
    parser.add_argument("--checkpoint", default=None, help="override the config's checkpoint (a path, or 'none')")
    parser.add_argument("--output_dir", default=None, help="override output_dir of the config")
    parser.add_argument("--num_train_steps", type=int, default=None, help="override num_train_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--stop_after", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument("--reference", action="store_true", help="reference path (padded encoder)")
    parser.add_argument("--num_workers", type=int, default=None, help="data loader processes (default 0 CPU, 2 GPU)")
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.task is None and args.config is None:
        parser.error("give --task (its bundled tiny config is used) or --config")
    return args


def load_config(args: argparse.Namespace):
    """The config of ``args`` with the command-line overrides applied."""
    from uniter_fast.finetuning.config import load_finetune_config

    cfg = load_finetune_config(args.config or default_config(args.task))
    if args.task is not None and args.task != cfg.task:
        raise ValueError(f"--task {args.task} but the config {args.config!r} is for task {cfg.task!r}")
    if args.checkpoint is not None:
        cfg.checkpoint = None if args.checkpoint.lower() == "none" else args.checkpoint
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    if args.num_train_steps is not None:
        cfg.num_train_steps = args.num_train_steps
    if args.reference:
        cfg.fast = False
    if args.num_workers is not None:
        cfg.num_workers = args.num_workers
    return cfg


def main(argv: Optional[list[str]] = None) -> dict:
    """Fine-tune as configured; returns the final metrics ({split: {metric: value}})."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from uniter_fast.finetuning.config import finetune_ds_config
    from uniter_fast.pretraining.engine import complete_ds_config, init_ranks, setup_environment

    cfg = load_config(args)
    setup_environment()
    with open(args.ds_config, encoding="utf-8") as f:
        ds_config = complete_ds_config(finetune_ds_config(json.load(f), cfg), cfg, source=args.ds_config)
    rank, world, num_workers = init_ranks(cfg.seed, cfg.num_workers)

    from uniter_fast.finetuning.run import run

    results, summary = run(cfg, ds_config, rank, world, num_workers, args.resume, args.stop_after)
    if rank == 0:
        print(summary)
    return results


if __name__ == "__main__":
    main()
