"""What fixed-shape batches (``uniter_fast.data.buckets``, the captured step) cost in padding, on the batches the
token-bucket sampler draws from the bundled corpus: padded / valid tokens, padded / real masked rows, and how many
distinct shapes (graphs to capture) the batches need, for several bucket sizes and token budgets.

    python bench/capture_padding.py                         # budgets 1024 and 10240, every pretraining task
    python bench/capture_padding.py --budgets 10240 --multiples 512 1024 --batches 20
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
from harness import add_output_arguments, output_dir, print_table, write_json

from uniter_fast.data import (
    DetectFeatLmdb,
    ItmDataset,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    TokenBucketSampler,
    TxtTokLmdb,
    batch_loader,
    default_corpus,
)
from uniter_fast.data.buckets import Buckets, padding_cost

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


def sampler_batches(kind: str, budget: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` training batches of epoch 0 of the bundled corpus's ``kind`` loader (fast collate)."""
    paths = default_corpus()
    txt, img = TxtTokLmdb(paths.txt_db), DetectFeatLmdb(paths.img_db)
    datasets = {"mlm": MlmDataset, "mrfr": MrfrDataset, "itm": ItmDataset}
    dataset = datasets[kind](txt, img) if kind in datasets else MrcDataset(txt, img, task=kind)
    indices = TokenBucketSampler(dataset.lens, batch_size=budget, droplast=True).batches(0)[:count]
    return list(batch_loader(dataset, indices, layout="packed", feat_dtype=torch.float16))


def measure(budgets: list[int], multiples: list[int], count: int) -> list[dict[str, Any]]:
    """One row per (budget, task, token_multiple) and per (budget, token_multiple) over all tasks (``all``)."""
    rows = []
    for budget in budgets:
        batches = {task: sampler_batches(task, budget, count) for task in TASKS}
        for multiple in multiples:
            buckets = Buckets(token_multiple=multiple)
            per_task = {task: padding_cost(group, buckets) for task, group in batches.items()}
            for task, cost in per_task.items():
                key = {"budget": budget, "token_multiple": multiple, "task": task}
                rows.append({**key, "batches": len(batches[task]), **cost})
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


def main(argv: Optional[list[str]] = None) -> None:
    """Measure and print the padding cost; JSON into the output folder."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[1024, 10240], help="token budgets per batch")
    parser.add_argument("--multiples", type=int, nargs="+", default=[64, 128, 256, 512, 1024], help="token_multiple")
    parser.add_argument("--batches", type=int, default=40, help="batches per task (the first of epoch 0)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    rows = measure(args.budgets, args.multiples, args.batches)
    columns = ["budget", "token_multiple", "task", "batches", "valid_tokens", "padded_tokens", "ratio", "row_ratio"]
    print_table(rows, columns + ["shapes"])
    meta = {"budgets": args.budgets, "multiples": args.multiples, "batches_per_task": args.batches}
    print(f"wrote {write_json('capture_padding', torch.device('cpu'), rows, meta, output_dir(args))}")


if __name__ == "__main__":
    main()
