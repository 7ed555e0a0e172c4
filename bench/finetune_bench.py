"""One fine-tuning optimizer step per task head on three paths of the same weights: ``original`` (the original
UNITER step's maths and habits, bench/original_path.py: eager attention, the written-out erf GELU, the per-parameter
AdamW loop, clipping at 2.0 as the original train-*.json recipes, fp16 autocast + dynamic loss scaling on CUDA, fp32 on
CPU), ``reference`` (padded encoder, SDPA attention, torch AdamW, bf16 autocast on CUDA) and ``fast`` (packed encoder,
same optimizer and autocast as ``reference``), on batches built by the task collates from UNITER-shaped random rows
(text 10-60 tokens incl. [CLS]/[SEP], 10-100 regions): every task that provides ``Task.example`` batches. The columns
``vs_original`` / ``vs_reference`` are speedups measured in the same rounds. Heads: VQA (3129
answers), VE (the VQA head with 3), NLVR2 paired-attn (two sequences per example), RE (scores on every region, cls
loss), VCR (four sequences per example, 4 type rows, 81 tag words).

    python bench/finetune_bench.py                     # CPU: base, fp32, 2 examples per batch, 1 timed round
    python bench/finetune_bench.py --full              # CPU: 8 examples per batch, 3 timed rounds
    python bench/finetune_bench.py --device cuda       # GPU: bf16 autocast, 32 examples per batch
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np
import torch
from harness import (
    IMG_RANGE,
    TXT_RANGE,
    add_output_arguments,
    device_name,
    interleaved_times,
    output_dir,
    plot_grouped_bars,
    print_table,
    run_meta,
    write_json,
)
from original_path import PATHS, make_optimizer, make_step
from pretrain_bench import ratio_columns
from tqdm import tqdm

from uniter_fast.config import UniterConfig
from uniter_fast.data.loader import move_to_device
from uniter_fast.tasks import TASKS, get_task
from uniter_fast.training.optim import param_groups

BENCHED = [name for name, task in TASKS.items() if task.has_example]  # the tasks that provide example batches


def build(name: str, config: UniterConfig, rng: np.random.Generator, size: int) -> tuple[torch.nn.Module, dict]:
    """The task model (tables grown as the task's) and a batch of ``size`` examples (``Task.example``)."""
    task = get_task(name)
    options, batch = task.example(config, size, rng, TXT_RANGE, IMG_RANGE)
    model = task.build_model(config, options, fast=False)
    task.prepare_model(model, options)
    return model, batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (CPU 2, --full 8; GPU 32)")
    parser.add_argument("--tasks", nargs="+", default=BENCHED, choices=BENCHED)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="CPU: larger batches and more repeats")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    add_output_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (32 if gpu else 8 if args.full else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats or (10 if gpu else 3 if args.full else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    config = UniterConfig.preset(args.config)
    dtype = torch.bfloat16 if gpu else torch.float32

    samples: dict[tuple[str, str], list[float]] = {}
    batches = {}
    for task in tqdm(args.tasks, desc="tasks"):  # one model alive at a time (memory)
        model, batch = build(task, config, rng, args.batch_size)
        model = model.to(device).train()
        model.uniter.check_values = False
        optimizers = {p: make_optimizer(p, param_groups(model, 0.01), device) for p in PATHS}
        batches[task] = move_to_device(batch, device)
        steps = {
            (task, p): make_step(model, optimizers[p], p, lambda m=model, b=batches[task]: m(b)["loss"], device)
            for p in PATHS
        }
        samples.update(interleaved_times(steps, device, args.warmup, args.repeats))
        del model, optimizers, steps
        if gpu:
            torch.cuda.empty_cache()

    rows = []
    for (task, path), values in samples.items():
        seconds = statistics.median(values)
        batch = batches[task]
        tokens = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        rows.append(
            {
                "task": task,
                "path": path,
                "sequences": batch["input_ids"].size(0),
                "valid_tokens": tokens,
                "padded_tokens": batch["attn_masks"].numel(),
                "ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                **ratio_columns(samples, task, path),
            }
        )
    precision = "original fp16 autocast + loss scaling, others bf16 autocast" if gpu else "fp32 (every path)"
    print(f"\nfine-tuning step, {args.config}, on {device_name(device)}, {precision}, load {os.getloadavg()[0]}")
    columns = ["task", "path", "sequences", "valid_tokens", "padded_tokens", "ms", "tokens_per_s"]
    print_table(rows, columns + ["vs_original", "vs_reference"])
    total = {p: sum(r["ms"] for r in rows if r["path"] == p) for p in PATHS}
    print(
        f"all tasks: fast/original {total['original'] / total['fast']:.2f}x, fast/reference "
        f"{total['reference'] / total['fast']:.2f}x, reference/original {total['original'] / total['reference']:.2f}x"
    )
    step = "zero_grad + forward + backward (+ clip at 2.0, original) + optimizer step"
    meta = run_meta(args, dtype, config=args.config, precision=precision, step=step)
    out = output_dir(args)
    print(write_json("finetune_bench", device, rows, meta, out))
    series = {p: [r["tokens_per_s"] for r in rows if r["path"] == p] for p in PATHS}
    title = f"UNITER-{args.config} fine-tuning step: original vs reference vs fast"
    tasks = list(args.tasks)
    print(plot_grouped_bars("finetune_bench", device, tasks, series, "valid tokens / s", title, False, out))


if __name__ == "__main__":
    main()
