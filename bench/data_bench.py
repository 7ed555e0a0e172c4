"""Data-loader throughput on the bundled corpus: pairs/s per task with N DataLoader workers vs 0 (in-process).

    python bench/data_bench.py [--workers 2] [--batch-tokens 10240] [--batches 4] [--repeats 5]

Each measurement pulls ``--batches`` token-bucket batches from an endless TaskLoader (LMDB read, fp16 -> fp32,
masking, padded + packed collate); the median over ``--repeats`` after one warm-up is reported. The floor column is
the bytes each pair moves: stored bytes read from LMDB and float32 bytes of the batch (padded + packed) handed to
the model. The reference (0 workers) loads in the main process with one torch thread, as each worker does (torch
sets 1 thread in DataLoader workers; several threads on tiny copies only add contention).
Writes bench/results/data_bench_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np
import torch
from harness import device_name, plot_grouped_bars, print_table, time_fn, write_json

from uniter_fast.data import (
    DetectFeatLmdb,
    ItmDataset,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    TaskLoader,
    TxtTokLmdb,
    default_corpus,
)

TASKS = {"mlm": MlmDataset, "mrfr": MrfrDataset, "mrckl": MrcDataset, "itm": ItmDataset}


def stored_bytes_per_pair(dataset, soft_labels: bool) -> float:
    """Mean bytes read from the img_db per pair (fp16 features, boxes, conf, soft labels when used)."""
    per_box = 2 * (2048 + 6 + 1 + (1601 if soft_labels else 0))
    return float(np.mean(dataset.lens - dataset.txt_lens)) * per_box


def batch_bytes(batch: dict) -> int:
    """Bytes of every tensor in a (nested) batch."""
    total = 0
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, dict):
            total += batch_bytes(value)
    return total


def measure(dataset, workers: int, budget: int, n_batches: int, repeats: int) -> dict:
    """pairs/s of ``n_batches`` batches from a TaskLoader with ``workers`` processes (median of ``repeats``)."""
    threads = torch.get_num_threads()
    if workers == 0:
        torch.set_num_threads(1)
    loader = TaskLoader(dataset, budget, seed=0, num_workers=workers, droplast=True)
    it = iter(loader)
    sizes: list[int] = []
    nbytes: list[int] = []

    def pull() -> None:
        for batch in itertools.islice(it, n_batches):
            sizes.append(batch["input_ids"].size(0))
            nbytes.append(batch_bytes(batch))

    try:
        seconds = time_fn(pull, torch.device("cpu"), warmup=1, repeats=repeats)
    finally:
        torch.set_num_threads(threads)
    pairs = float(np.median(sizes)) * n_batches
    return {
        "pairs_per_batch": float(np.median(sizes)),
        "seconds": seconds,
        "pairs_per_s": pairs / seconds,
        "batch_MB": float(np.median(nbytes)) / 1e6,
    }


def main() -> None:
    """Run the benchmark and write the table, JSON and plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-tokens", type=int, default=10240, help="token budget per batch (original: 10240)")
    ap.add_argument("--batches", type=int, default=4, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    args = ap.parse_args()
    paths = default_corpus()
    txt, img = TxtTokLmdb(paths.txt_db), DetectFeatLmdb(paths.img_db)
    cpu = torch.device("cpu")
    rows = []
    for task in args.tasks:
        dataset = TASKS[task](txt, img)
        ref = measure(dataset, 0, args.batch_tokens, args.batches, args.repeats)
        par = measure(dataset, args.workers, args.batch_tokens, args.batches, args.repeats)
        stored = stored_bytes_per_pair(dataset, soft_labels=task in ("mrfr", "mrckl"))
        rows.append(
            {
                "task": task,
                "pairs/batch": par["pairs_per_batch"],
                "pairs/s (0 workers)": ref["pairs_per_s"],
                f"pairs/s ({args.workers} workers)": par["pairs_per_s"],
                "speedup": par["pairs_per_s"] / ref["pairs_per_s"],
                "stored KB/pair": stored / 1e3,
                "batch KB/pair": par["batch_MB"] * 1e3 / par["pairs_per_batch"],
                "read MB/s": par["pairs_per_s"] * stored / 1e6,
            }
        )
    columns = list(rows[0])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"device: {device_name(cpu)} ({os.cpu_count()} logical CPUs, load average {load}); corpus {paths.root}")
    print_table(rows, columns)
    meta = {
        "argv": sys.argv[1:],
        "workers": args.workers,
        "batch_tokens": args.batch_tokens,
        "batches_per_repeat": args.batches,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average_1min": load,
        "corpus": paths.root,
    }
    print("wrote", write_json("data_bench", cpu, rows, meta))
    series = {
        "0 workers": [r["pairs/s (0 workers)"] for r in rows],
        f"{args.workers} workers": [r[f"pairs/s ({args.workers} workers)"] for r in rows],
    }
    print(
        "wrote",
        plot_grouped_bars(
            "data_bench",
            cpu,
            [r["task"] for r in rows],
            series,
            "pairs / s",
            "Data loader throughput, bundled corpus",
            log_scale=False,
        ),
    )


if __name__ == "__main__":
    main()
