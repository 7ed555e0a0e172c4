"""What fixed-shape batches (``uniter_fast.data.buckets``, the captured step) cost in padding, on the batches the
token-bucket sampler draws from the bundled corpus: padded / valid tokens, padded / real masked rows, and how many
distinct shapes (graphs to capture) the batches need, for several bucket sizes and token budgets.

    python bench/capture_padding.py                         # budgets 1024 and 10240, every pretraining task
    python bench/capture_padding.py --budgets 10240 --multiples 512 1024 --batches 20
    python bench/capture_padding.py --heads --epochs 4      # RE and ITM fine-tuning, buckets before / after

``--heads``: the fine-tuning heads whose ``train_batch_size`` counts examples (RE, ITM), on every training batch of
``--epochs`` epochs of their bundled sets (the tiny configs' databases, seed and ``train_batch_size``, and the
base configs' ``train_batch_size``), padded with the buckets sized from ``train_batch_size`` itself (before: the
64-token floor) and from the tokens the batches hold (after: ``uniter_fast.finetuning.data.capture_tokens``).
"""

from __future__ import annotations

import argparse
import json
import os
import types
from collections.abc import Iterator
from typing import Any, Optional

import torch
from harness import BENCH_DIR, add_output_arguments, output_dir, print_table, write_json

from uniter_fast.data import (
    TokenBucketSampler,
)
from uniter_fast.data.buckets import Buckets, padding_cost
from uniter_fast.finetuning.data import capture_tokens
from uniter_fast.pretraining.data import bundled_batches
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled
from uniter_fast.tasks.data import DbCache, TaskDataset

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
HEADS = {
    "re": ("finetune-re-tiny.json", 128),
    "itm": ("finetune-itm-tiny.json", 40),
    "itm-tower-distill": ("finetune-itm-tower-tiny.json", 40),
}
"""The by-examples heads: their tiny config (bundled sets) and the ``train_batch_size`` of their base configs
(configs/finetune-refcoco-base.json, finetune-itm-flickr-base.json); ``itm-tower-distill`` is the distilled tower,
whose batches carry the teacher's grid."""


def measure(budgets: list[int], multiples: list[int], count: int) -> list[dict[str, Any]]:
    """One row per (budget, task, token_multiple) and per (budget, token_multiple) over all tasks (``all``)."""
    rows = []
    for budget in budgets:
        batches = {task: bundled_batches(task, budget, count, droplast=True) for task in TASKS}
        for multiple in multiples:
            buckets = Buckets(token_multiple=multiple)
            per_task = {task: padding_cost(group, buckets) for task, group in batches.items()}
            for task, cost in per_task.items():
                key = {"budget": budget, "token_multiple": multiple, "task": task}
                rows.append({**key, **cost, "batches": len(batches[task])})
            valid = sum(c["valid_tokens"] for c in per_task.values())
            padded = sum(c["padded_tokens"] for c in per_task.values())
            shapes = sum(c["shapes"] for c in per_task.values())
            rows.append(
                {
                    "budget": budget,
                    "token_multiple": multiple,
                    "task": "all",
                    "valid_tokens": valid,
                    "padded_tokens": padded,
                    "ratio": padded / valid,
                    "shapes": shapes,
                }
            )
    return rows


def head_dataset(config: dict[str, Any]) -> TaskDataset:
    """The training dataset of a fine-tuning ``config`` (a parsed config file), with its box settings and seed."""
    task = get_task(config["task"])
    dbs = DbCache(types.SimpleNamespace(**config))
    options = task.check_options({k: v for k, v in config.items() if k in task.options}, config["task"])
    txt, img = resolve_bundled(config["train_txt_db"]), resolve_bundled(config["train_img_db"])
    return task.train_dataset(dbs, txt, img, options, config["seed"])


def head_batches(dataset: TaskDataset, batch_size: int, seed: int, epochs: int) -> Iterator[dict[str, Any]]:
    """Every training batch of ``epochs`` epochs of ``dataset`` (the fine-tuning loader's sampler, one rank),
    collated by the dataset, one at a time."""
    sampler = TokenBucketSampler(dataset.lens, batch_size=batch_size, droplast=True, seed=seed)
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for indices in sampler.batches(epoch):
            yield dataset.collate([dataset[i] for i in indices])


def measure_heads(epochs: int) -> list[dict[str, Any]]:
    """One row per (head, ``train_batch_size``, buckets before / after): the tokens the buckets are sized from, the
    ``token_multiple``, batches, padded / valid tokens (ITM's first-stage layouts and distillation grid included)
    and shapes (graphs)."""
    rows = []
    for name, (file, base_size) in HEADS.items():
        with open(os.path.join(BENCH_DIR, os.pardir, "configs", file), encoding="utf-8") as f:
            config = json.load(f)
        dataset, seed = head_dataset(config), config["seed"]
        for size in (config["train_batch_size"], base_size):
            dataset.set_epoch(0)  # as the recipe measures it, before training
            tokens = {"before": size, "after": capture_tokens(get_task(config["task"]), [dataset], size, seed)}
            for when, budget in tokens.items():
                buckets = Buckets.for_run(config["max_txt_len"], config["max_bb"], config["num_bb"], budget)
                cost = padding_cost(head_batches(dataset, size, seed, epochs), buckets)
                key = {"task": name, "train_batch_size": size, "buckets": when, "tokens": budget}
                rows.append({**key, "token_multiple": buckets.token_multiple, **cost})
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    """Measure and print the padding cost; JSON into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 10240], help="token budgets per batch")
    parser.add_argument("--multiples", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="token_multiple")
    parser.add_argument("--batches", type=int, default=40, help="batches per task (the first of epoch 0)")
    parser.add_argument("--heads", action="store_true", help="the RE and ITM fine-tuning heads instead (module doc)")
    parser.add_argument("--epochs", type=int, default=4, help="--heads: epochs of each bundled training set")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.heads:
        rows = measure_heads(args.epochs)
        columns = ["task", "train_batch_size", "buckets", "tokens", "token_multiple", "batches", "ratio", "shapes"]
        print_table(rows, columns)
        meta = {"epochs": args.epochs, "configs": {name: file for name, (file, _) in HEADS.items()}}
        print(f"wrote {write_json('capture_padding_heads', torch.device('cpu'), rows, meta, output_dir(args))}")
        return
    rows = measure(args.budgets, args.multiples, args.batches)
    columns = ["budget", "token_multiple", "task", "batches", "valid_tokens", "padded_tokens", "ratio", "row_ratio"]
    print_table(rows, columns + ["shapes"])
    meta = {"budgets": args.budgets, "multiples": args.multiples, "batches_per_task": args.batches}
    print(f"wrote {write_json('capture_padding', torch.device('cpu'), rows, meta, output_dir(args))}")


if __name__ == "__main__":
    main()
