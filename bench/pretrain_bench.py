"""One pretraining optimizer step per task: the reference path vs everything fast.

Reference (``UniterForPretraining(fast=False)``): the padded encoder forward, the ``"reference"`` losses and IPOT.
Fast (``fast=True``): the packed encoder (``forward_packed``), the ``"auto"`` losses (fused kernels) and the ``"auto"``
IPOT backend. Both run the same weights and the same AdamW (the original parameter groups), one step = forward +
backward + ``optimizer.step()``, on batches built by the real collates from UNITER-shaped random items (text 10-60
tokens incl. [CLS]/[SEP], 10-100 regions, 15% masking). Tasks: MLM, MRFR, MRC, MRC-kl, ITM+WRA (OT lambda 0.1).

    python bench/pretrain_bench.py                      # CPU: base, fp32, batch 4 (about 2 minutes on 2 cores)
    python bench/pretrain_bench.py --full               # CPU: batch 16, more repeats
    python bench/pretrain_bench.py --device cuda        # GPU: bf16 autocast, batch 80
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from typing import Any, Callable, Optional

import torch
from batches import PRETRAIN_TASKS, task_batch
from harness import (
    add_output_arguments,
    device_name,
    output_dir,
    peak_memory,
    plot_grouped_bars,
    print_table,
    run_meta,
    time_fn,
    write_json,
)
from tqdm import tqdm

from uniter_fast.config import UniterConfig
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.training.optim import param_groups


def make_step(
    model: UniterForPretraining,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    task: str,
    fast: bool,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Callable[[], None]:
    """One optimizer step of ``task`` on ``batch``, on the reference (``fast=False``) or the fast path."""

    def step() -> None:
        model.fast = fast
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = model(batch, task)["loss"]
        loss.backward()
        optimizer.step()

    return step


def autocast_for(device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    """bf16 autocast on CUDA (as DeepSpeed's bf16 training computes), no autocast (fp32) on CPU."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def measure_steps(
    config_name: str,
    batch_size: int,
    tasks: tuple[str, ...],
    device: torch.device,
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows (task × path, plus the whole mix ``all``) of the median step time, valid tokens/s, peak memory and the
    speedup of the fast path over the reference path, both timed in turn in the same rounds."""
    torch.manual_seed(seed)
    config = UniterConfig.preset(config_name)
    model = UniterForPretraining(config).to(device).train()
    model.uniter.check_values = False
    optimizer = torch.optim.AdamW(
        param_groups(model, 0.01), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, fused=device.type == "cuda"
    )
    autocast = autocast_for(device)
    batches = {t: task_batch(t, batch_size, config.vocab_size, seed + i, device) for i, t in enumerate(tasks)}
    steps = {
        (task, path): make_step(model, optimizer, batches[task], task, path == "fast", autocast)
        for task in tasks
        for path in ("reference", "fast")
    }
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for round_ in tqdm(range(warmup + repeats), desc=f"{config_name} step rounds", leave=False):
        for key, step in steps.items():  # paths in turn, so load changes on a shared machine hit both alike
            seconds = time_fn(step, device, warmup=0, repeats=1)
            if round_ >= warmup:
                samples[key].append(seconds)

    rows = []
    for (task, path), values in samples.items():
        seconds = statistics.median(values)
        batch = batches[task]
        tokens = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        reference = statistics.median(samples[(task, "reference")])
        rows.append(
            {
                "task": task,
                "path": path,
                "batch": batch_size,
                "valid_tokens": tokens,
                "padded_tokens": batch["attn_masks"].numel(),
                "ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                "peak_mem_mb": _mb(peak_memory(steps[(task, path)], device)),
                "speedup": reference / seconds,
            }
        )
    for path in ("reference", "fast"):  # the whole mix: one step of each task
        total = sum(statistics.median(samples[(t, path)]) for t in tasks)
        reference = sum(statistics.median(samples[(t, "reference")]) for t in tasks)
        tokens = sum(r["valid_tokens"] for r in rows if r["path"] == path)
        rows.append(
            {"task": "all", "path": path, "valid_tokens": tokens, "ms": total * 1e3, "tokens_per_s": tokens / total}
        )
        rows[-1]["speedup"] = reference / total
    return rows


COLUMNS = ["task", "path", "valid_tokens", "padded_tokens", "ms", "tokens_per_s", "peak_mem_mb", "speedup"]


def main(argv: Optional[list[str]] = None) -> None:
    """Parse arguments, time every task on both paths, print the table, write JSON + PNG."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: 4 CPU, 80 GPU)")
    parser.add_argument("--tasks", nargs="+", default=list(PRETRAIN_TASKS), choices=list(PRETRAIN_TASKS))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--full", action="store_true", help="CPU: batch 16 and 5 repeats (about 15 minutes)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (80 if gpu else 16 if args.full else 4)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats or (10 if gpu else 5 if args.full else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if gpu else torch.float32
    rows = measure_steps(args.config, args.batch_size, tuple(args.tasks), device, args.warmup, args.repeats, args.seed)

    print(f"\npretraining step, {args.config}, on {device_name(device)}, {dtype}, load {os.getloadavg()[0]}")
    print_table(rows, COLUMNS)
    meta = run_meta(args, dtype, config=args.config, step="zero_grad + forward + backward + AdamW step")
    out = output_dir(args)
    print(write_json("pretrain_bench", device, rows, meta, out))
    groups = [r["task"] for r in rows if r["path"] == "reference"]
    series = {p: [r["tokens_per_s"] for r in rows if r["path"] == p] for p in ("reference", "fast")}
    title = f"UNITER-{args.config} pretraining step: reference vs fast"
    print(plot_grouped_bars("pretrain_bench", device, groups, series, "valid tokens / s", title, False, out))


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 2**20


if __name__ == "__main__":
    main()
