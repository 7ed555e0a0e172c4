"""Evaluate a fine-tuned UNITER on a task's databases and write predictions in the original's format:
``python -m uniter_fast.evaluate --task vqa --checkpoint output/finetune-vqa-tiny/finetuned``.

The checkpoint is a ``finetune.py`` export directory or a file saved by the original ``train_<task>.py``
(``model_step_N.pt``; options such as the NLVR2 variant are read off its keys). By default the evaluation splits of
``configs/finetune-<task>-tiny.json`` are used (the bundled set's val / test); ``--txt_db`` / ``--img_db`` evaluate
any database instead, ``--config`` takes the splits and box settings of another fine-tuning config. Prints a table
of the task's metrics; predictions go to ``--output_dir`` (default: ``results_eval/`` beside the checkpoint).
Runs on one process, or on several under ``torchrun`` (each rank a shard, metrics and predictions gathered).

``--benchmark DIR`` evaluates every benchmark of the UNITER paper whose checkpoint and databases ``DIR`` holds (the
layout is in ``uniter_fast/benchmark.py`` and ``docs/datasets.md``) and prints the paper's base / large figures
beside the measured ones, "-" where the folder lacks the data; predictions go to ``DIR/results`` (or
``--output_dir``), in the evaluation servers' formats for VQA test and VCR test.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import TYPE_CHECKING, Optional

from uniter_fast.entry import CommandParser, parse_key_values, run_command
from uniter_fast.errors import ConfigError
from uniter_fast.files import read_json
from uniter_fast.tasks import TASKS

if TYPE_CHECKING:
    from uniter_fast.finetuning.config import FinetuneConfig

logger = logging.getLogger("uniter_fast.evaluate")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options."""
    parser = CommandParser(
        prog="python -m uniter_fast.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", help="finetune.py export dir or original model_step_N.pt")
    parser.add_argument(
        "--benchmark",
        default=None,
        help="a benchmark folder: evaluate every task of the UNITER paper's table it holds, print the table",
    )
    parser.add_argument(
        "--task", default=None, choices=sorted(TASKS), help="the task (default: the export's task.json)"
    )
    parser.add_argument("--config", default=None, help="fine-tuning config whose eval splits and settings to use")
    parser.add_argument("--txt_db", default=None, help="evaluate this txt_db (with --img_db) instead of the config's")
    parser.add_argument("--img_db", default=None, help="img_db of --txt_db (VCR: 'gt_dir;det_dir')")
    parser.add_argument("--split", default="eval", help="name of the --txt_db split in the table and files")
    parser.add_argument(
        "--model_config",
        default=None,
        help="model config (preset tiny/base/large or JSON, as the original's --model_config); default: the one "
        "saved with the checkpoint, else read off the weights",
    )
    parser.add_argument("--batch_size", type=int, default=None, help="override val_batch_size (tokens; RE: examples)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a task option for original checkpoints, e.g. --option mlp=2 (repeatable)",
    )
    parser.add_argument(
        "--eval-mode",
        dest="eval_mode",
        choices=("exact", "fast"),
        default=None,
        help="itm / itm-hn: score every pair (exact) or re-rank the first stage's top k (fast)",
    )
    parser.add_argument(
        "--top-k",
        dest="top_k",
        type=int,
        default=None,
        help="itm / itm-hn fast mode: candidates per text and per image (default: the task option)",
    )
    parser.add_argument("--output_dir", default=None, help="where predictions go (default: beside the checkpoint)")
    parser.add_argument("--reference", action="store_true", help="reference path (padded encoder)")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.benchmark is None):
        parser.error("give --checkpoint (one task) or --benchmark (the paper's table), not both or neither")
    if args.benchmark is not None:
        single = [f"--{name}" for name in ("task", "config", "txt_db", "img_db", "option") if getattr(args, name)]
        if single:
            parser.error(f"--benchmark takes the tasks, splits and checkpoints from its folder; drop {single}")
    return args


def _task_name(args: argparse.Namespace) -> str:
    """The task to evaluate: ``--task``, else the export's task.json; a ``ConfigError`` when both are given and
    differ (the other task's head would be initialised at random and its scores meaningless)."""
    meta = os.path.join(args.checkpoint, "task.json")
    saved = None
    if os.path.isfile(meta):
        saved = read_json(meta, "task file").get("task")
        if saved not in TASKS:
            raise ValueError(f"{meta}: 'task' must be one of {sorted(TASKS)}, got {saved!r}")
    if args.task and saved and args.task != saved:
        raise ConfigError(f"--task {args.task}: {meta} says the checkpoint is a {saved!r} model; drop --task")
    if args.task or saved:
        return args.task or saved
    raise ValueError(f"--task is needed: {args.checkpoint!r} has no task.json (an original checkpoint?)")


def settings_config(args: argparse.Namespace, task_name: str, databases: str) -> FinetuneConfig:
    """The fine-tuning config whose settings an evaluation takes: ``--config``, or ``task_name``'s default;
    ``databases`` as ``load_finetune_config`` checks them ("eval": its evaluation sets; "none")."""
    from uniter_fast.finetuning.config import default_config, load_finetune_config

    return load_finetune_config(args.config or default_config(task_name), checkpoint_given=True, databases=databases)


def evaluate_splits(
    args: argparse.Namespace,
    cfg: FinetuneConfig,
    task_name: str,
    checkpoint: str,
    splits: dict[str, tuple[str, str]],
    out_dir: str,
    stem_prefix: str = "",
) -> dict[str, tuple[dict[str, float], list[str]]]:
    """Evaluate ``checkpoint`` as ``task_name`` on ``splits`` ({split: (txt_db, img_db)}) with the settings of
    ``cfg`` (``settings_config``) and ``args`` (``--option``, ``--model_config``, ``--batch_size``, ``--eval-mode``,
    ``--top-k``, ``--reference``); rank 0 writes each split's predictions under ``out_dir`` as
    ``<stem_prefix><split>_results.*``. Returns {split: (metrics, files)}
    (files: rank 0's). Under ``torchrun`` the process group starts after every check of the input."""
    import torch

    from uniter_fast.checkpoint import read_checkpoint
    from uniter_fast.data.loader import move_to_device
    from uniter_fast.tasks import get_task
    from uniter_fast.tasks.checkpoint import check_evaluable, load_task_model
    from uniter_fast.tasks.data import DbCache
    from uniter_fast.training.distributed import init_launched_process_group

    task = get_task(task_name)
    dbs = DbCache(cfg)
    options = {**task.check_options(parse_key_values(args.option, "--option"), "--option")}
    options.update(task.data_options(dbs, [txt for txt, _ in splits.values()], options))
    ckpt = read_checkpoint(checkpoint)
    check_evaluable(task, ckpt)
    model, options = load_task_model(task, ckpt, options, args.model_config, fast=not args.reference)
    if args.eval_mode is not None or args.top_k is not None:  # evaluation settings, not fixed by the checkpoint
        options = task.check_options(
            {**options, **{k: v for k, v in (("eval_mode", args.eval_mode), ("top_k", args.top_k)) if v is not None}},
            "--eval-mode / --top-k",
        )
    rank, world = init_launched_process_group()  # after every check of the input
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    model.to(device)
    batch_size = args.batch_size or cfg.val_batch_size
    results = {}
    for split, (txt_path, img_path) in splits.items():
        dataset = task.eval_dataset(dbs, txt_path, img_path, options, split, cfg.seed)
        metrics, predictions = task.evaluate_split(
            model, dataset, batch_size, options, rank, world, lambda b: move_to_device(b, device), desc=split
        )
        files: list[str] = []
        if rank == 0:
            os.makedirs(out_dir, exist_ok=True)
            meta = {"task": task.name, "split": split, "checkpoint": os.path.abspath(checkpoint)}
            files = task.write_predictions(predictions, out_dir, f"{stem_prefix}{split}_results", meta)
            logger.info("%s: %d predictions written to %s", split, len(predictions), files)
        results[split] = (metrics, files)
    return results


def run_benchmark(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``--benchmark``: evaluate every row of the paper's table the folder holds (each checkpoint and split once)
    and print the table (rank 0); returns {"<evaluation name>_<split>": metrics}."""
    from uniter_fast.benchmark import PAPER_TABLE, measured_cell, paper_cell, row_evaluation
    from uniter_fast.training.distributed import rank_and_world
    from uniter_fast.training.logs import format_table

    root = args.benchmark
    if not os.path.isdir(root):
        raise NotADirectoryError(f"--benchmark {root!r} is not a directory")
    out_dir = args.output_dir or os.path.join(root, "results")
    planned = {row.label: row_evaluation(root, row) for row in PAPER_TABLE}
    done: dict[tuple[str, str], tuple[dict[str, float], list[str]]] = {}
    for evaluation in planned.values():
        if evaluation is None or (evaluation.name, evaluation.split) in done:
            continue
        logger.info("benchmark: %s (%s, %s)", evaluation.name, evaluation.task, evaluation.checkpoint)
        splits = {evaluation.split: (evaluation.txt_db, evaluation.img_db)}
        prefix = evaluation.name + "_"  # several rows share a split name: one file name per evaluation
        # the config gives the settings; the splits' databases are checked as they open
        cfg = settings_config(args, evaluation.task, databases="none")
        out = evaluate_splits(args, cfg, evaluation.task, evaluation.checkpoint, splits, out_dir, prefix)
        done[evaluation.name, evaluation.split] = out[evaluation.split]
    if not done:
        nlvr2 = os.path.join(root, "nlvr2")  # root as given, e.g. "benchmark/": no doubled separator
        raise FileNotFoundError(
            f"--benchmark {root!r}: no benchmark of the paper's table is there (e.g. "
            f"{os.path.join(nlvr2, 'checkpoint')} with {os.path.join(nlvr2, 'dev', 'txt')} and img; see "
            "docs/datasets.md)"
        )
    if rank_and_world()[0] == 0:
        rows = []
        for row in PAPER_TABLE:
            evaluation = planned[row.label]
            metrics, files = done[evaluation.name, evaluation.split] if evaluation else (None, None)
            rows.append([row.label, paper_cell(row.base), paper_cell(row.large), measured_cell(row, metrics, files)])
        print(f"\nUNITER paper (Table 3) and {root}:")
        print(format_table(rows, ["benchmark", "paper base", "paper large", "measured"]))
    return {f"{name}_{split}": metrics for (name, split), (metrics, _) in done.items()}


def main(argv: Optional[list[str]] = None) -> dict[str, dict[str, float]]:
    """Evaluate; returns {split: {metric: value}} (``--benchmark``: {evaluation: {metric: value}})."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from uniter_fast.tasks import get_task
    from uniter_fast.tasks.bundled import resolve_bundled
    from uniter_fast.training.distributed import rank_and_world
    from uniter_fast.training.logs import format_table

    if args.batch_size is not None and args.batch_size <= 0:
        raise ValueError(f"--batch_size must be > 0, got {args.batch_size}")
    if args.benchmark is not None:
        return run_benchmark(args)
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"--checkpoint {args.checkpoint!r} does not exist")
    if args.txt_db and not args.img_db:
        raise ValueError("--txt_db needs --img_db")
    task_name = _task_name(args)
    if args.txt_db:  # the config gives the settings only: none of its databases is read
        cfg = settings_config(args, task_name, databases="none")
        splits = {args.split: (resolve_bundled(args.txt_db), resolve_bundled(args.img_db))}
    else:
        cfg = settings_config(args, task_name, databases="eval")
        splits = cfg.eval_sets()
    out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "results_eval")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"--output_dir: {out_dir!r} is a file; give a folder for the predictions")
    evaluated = evaluate_splits(args, cfg, task_name, args.checkpoint, splits, out_dir)
    results = {split: metrics for split, (metrics, _) in evaluated.items()}
    if rank_and_world()[0] == 0:
        headline = get_task(task_name).headline
        keys = sorted({k for m in results.values() for k in m}, key=lambda k: (k != headline, k))
        rows = [[split, *(f"{m[k]:.4f}" for k in keys)] for split, m in results.items()]
        print(f"\n{task_name} evaluation of {args.checkpoint}:")
        print(format_table(rows, ["split", *keys]))
    return results


if __name__ == "__main__":
    run_command(main)
