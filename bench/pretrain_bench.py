"""One pretraining optimizer step per task on three paths of the same model: the original UNITER's step, the
reference path and everything fast, on batches the token-bucket sampler draws from a UNITER-shaped corpus.

Paths (bench/original_path.py): ``original`` (the original's maths and habits: padded encoder, eager attention, the
written-out erf GELU, plain losses and IPOT, the per-parameter AdamW loop of its optim/adamw.py, clipping at 2.0; on
CUDA fp16 autocast with dynamic loss scaling as apex O2, on CPU fp32), ``reference`` (``UniterForPretraining
(fast=False)``: padded encoder with SDPA attention, one-kernel GELU, the ``"reference"`` losses and IPOT,
``torch.optim.AdamW``, fused on CUDA, bf16 autocast on CUDA) and ``fast`` (``fast=True``: the packed encoder, the
``"auto"`` losses and IPOT backends, same optimizer and autocast as ``reference``). One step = zero_grad + forward +
backward (+ clipping) + optimizer step, the three paths in turn each round; the table holds medians after warm-up.

Batches: a corpus of 8192 examples with UNITER-shaped lengths (the original's config/pretrain-*.json: text 10-60
tokens incl. [CLS]/[SEP], 10-100 regions, drawn uniformly), batched by the token-bucket sampler
(``uniter_fast.data.sampler``, the original's algorithm) with a token budget; each task times the first batch of
its own epoch (seed + task index), collated from random items of those lengths (15% masking). ``bound`` is the
batch's padded encoder FLOPs / valid encoder FLOPs: what packing alone can gain over a padded path.
Tasks: MLM, MRFR, MRC, MRC-kl, ITM+WRA (OT lambda 0.1).

    python bench/pretrain_bench.py                      # CPU: base, fp32, 640-token batches (about 3 minutes)
    python bench/pretrain_bench.py --full               # CPU: the original's multiple of 8, 2048 tokens, 5 repeats
    python bench/pretrain_bench.py --device cuda        # GPU: 10240-token batches (the original's), multiple of 8
    python bench/pretrain_bench.py --auto               # + the fast path at the budget "auto" chooses (see below)

``--auto`` adds rows (``path`` ``fast@auto``) of the fast path's step at the micro-batch budget that
``train_batch_size: "auto"`` chooses for the recipe's tokens per update (``uniter_fast.training.budget``; on a CPU its
fallback is replaced by this bench's CPU budget), on batches a pretraining run draws from the bundled corpus (the
real datasets, collates and token-bucket sampler: ``batches.corpus_batches``), with the estimate of the step's
activation memory (``estimate_mb``: saved tensors + transient, per task) next to the measured peak over the resident
weights and optimizer state (``peak_mem_mb``, CUDA).
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Any, Optional

import torch
from batches import PRETRAIN_TASKS, corpus_batches, sampled_batches
from encoder_bench import encoder_flops
from harness import (
    add_output_arguments,
    device_name,
    interleaved_times,
    mib,
    output_dir,
    peak_memory,
    plot_grouped_bars,
    print_table,
    run_meta,
    time_fn,
    write_json,
)
from original_path import PATHS, make_optimizer, make_step
from tqdm import tqdm

from uniter_fast.config import SIZE_MULTIPLE, UniterConfig
from uniter_fast.data import move_to_device
from uniter_fast.pretraining.model import UniterForPretraining, pretraining_model_size
from uniter_fast.training import budget
from uniter_fast.training.optim import param_groups

#: the recipes' tokens per update (configs/pretrain-*.json): UNITER-base in-domain, UNITER-large all data; tiny: base's
RECIPE_TOKENS_PER_UPDATE = {"tiny": 163840, "base": 163840, "large": 393216}


def padded_and_valid_flops(config: UniterConfig, batch: dict[str, Any]) -> tuple[float, float]:
    """Encoder forward FLOPs of a collated batch (``txt_lens``/``num_bbs`` [B], ``attn_masks`` [B, L]) padded (every
    sequence at the joint length L, every image at the longest region count) and valid (each at its own length);
    their ratio is the batch's padding bound."""
    size, joint = batch["attn_masks"].shape
    padded = encoder_flops(config, size * int(batch["num_bbs"].max()), torch.full((size,), joint))
    valid = encoder_flops(config, int(batch["num_bbs"].sum()), batch["txt_lens"] + batch["num_bbs"])
    return padded, valid


def ratio_columns(samples: dict[tuple[str, str], list[float]], task: str, path: str) -> dict[str, float]:
    """``vs_original`` / ``vs_reference``: the original's / the reference's median time over ``path``'s (speedups)."""
    seconds = statistics.median(samples[(task, path)])
    return {
        "vs_original": statistics.median(samples[(task, "original")]) / seconds,
        "vs_reference": statistics.median(samples[(task, "reference")]) / seconds,
    }


def measure_steps(
    config_name: str,
    batch_tokens: int,
    size_multiple: int,
    tasks: tuple[str, ...],
    device: torch.device,
    warmup: int,
    repeats: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows (task × path, plus the whole mix ``all``) of the median step time, valid tokens/s, peak memory (CUDA),
    the batch's padding bound and the speedups over the original and the reference paths, all three paths timed in
    turn in the same rounds on the same sampled batch and weights."""
    torch.manual_seed(seed)
    config = UniterConfig.preset(config_name)
    model = UniterForPretraining(config).to(device).train()
    model.uniter.check_values = False
    optimizers = {path: make_optimizer(path, param_groups(model, 0.01), device) for path in PATHS}
    batches = {}
    for i, task in enumerate(tasks):
        batches[task] = sampled_batches(task, 1, batch_tokens, size_multiple, config.vocab_size, seed + i, device)[0]
    flops = {task: padded_and_valid_flops(config, batch) for task, batch in batches.items()}  # counted first
    steps = {
        (task, path): make_step(
            model, optimizers[path], path, lambda b=batches[task], t=task: model(b, t)["loss"], device
        )
        for task in tasks
        for path in PATHS
    }
    rounds = lambda r: tqdm(r, desc=f"{config_name} step rounds", leave=False)
    samples = interleaved_times(steps, device, warmup, repeats, rounds)

    rows = []
    for (task, path), values in samples.items():
        seconds = statistics.median(values)
        batch = batches[task]
        tokens = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        rows.append(
            {
                "task": task,
                "path": path,
                "sequences": batch["attn_masks"].size(0),
                "valid_tokens": tokens,
                "padded_tokens": batch["attn_masks"].numel(),
                "bound": flops[task][0] / flops[task][1],
                "ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                "peak_mem_mb": mib(peak_memory(steps[(task, path)], device)),
                **ratio_columns(samples, task, path),
            }
        )
    totals = {path: sum(statistics.median(samples[(t, path)]) for t in tasks) for path in PATHS}
    padded, valid = (sum(f[i] for f in flops.values()) for i in (0, 1))
    for path in PATHS:  # the whole mix: one step of each task
        tokens = sum(r["valid_tokens"] for r in rows if r["path"] == path)
        rows.append(
            {
                "task": "all",
                "path": path,
                "valid_tokens": tokens,
                "padded_tokens": sum(r["padded_tokens"] for r in rows if r["path"] == path),
                "bound": padded / valid,
                "ms": totals[path] * 1e3,
                "tokens_per_s": tokens / totals[path],
                "vs_original": totals["original"] / totals[path],
                "vs_reference": totals["reference"] / totals[path],
            }
        )
    return rows


def measure_auto(
    config_name: str, device: torch.device, cpu_tokens: int, warmup: int, repeats: int, tasks: tuple[str, ...]
) -> tuple[list[dict[str, Any]], budget.BudgetChoice]:
    """Rows (task, path ``fast@auto``) of the fast path's step at the budget ``"auto"`` chooses for the recipe's
    tokens per update on ``device`` (on a CPU: ``cpu_tokens``), on the first corpus batch of each task, with the
    activation estimate (``estimate_mb``) and, on CUDA, the measured peak over the resident state; and the choice."""
    config = UniterConfig.preset(config_name)
    memory = budget.cuda_memory_bytes() if device.type == "cuda" else None
    kinds = sorted({"mrckl" if t == "mrc" else t for t in tasks})
    tokens = RECIPE_TOKENS_PER_UPDATE[config_name]
    choice = budget.choose_budget(
        budget.AUTO, tokens, 1, cpu_tokens, (config, kinds, pretraining_model_size(config)), memory
    )
    torch.manual_seed(0)
    model = UniterForPretraining(config).to(device).train()
    model.uniter.check_values = False
    optimizer = make_optimizer("fast", param_groups(model, 0.01), device)
    size = pretraining_model_size(config)
    rows = []
    for task in tasks:
        batch = move_to_device(corpus_batches(task, choice.budget, 1)[0], device)
        step = make_step(model, optimizer, "fast", lambda b=batch, t=task: model(b, t)["loss"], device)
        seconds = time_fn(step, device, warmup=warmup, repeats=repeats)
        valid = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        estimate = budget.training_memory(config, [task], valid, size)
        rows.append(
            {
                "task": task,
                "path": "fast@auto",
                "sequences": int(batch["txt_lens"].numel()),
                "valid_tokens": valid,
                "ms": seconds * 1e3,
                "tokens_per_s": valid / seconds,
                "peak_mem_mb": mib(peak_memory(step, device)),
                "estimate_mb": (estimate.saved + estimate.transient) / 2**20,
            }
        )
    return rows, choice


COLUMNS = ["task", "path", "sequences", "valid_tokens", "padded_tokens", "bound", "ms", "tokens_per_s", "peak_mem_mb"]
COLUMNS += ["vs_original", "vs_reference"]
AUTO_COLUMNS = ["task", "path", "sequences", "valid_tokens", "ms", "tokens_per_s", "peak_mem_mb", "estimate_mb"]


def summary_line(rows: list[dict[str, Any]]) -> str:
    """The three ratios of the task mix (fast/original, fast/reference, reference/original) and its padding bound."""
    mix = {r["path"]: r for r in rows if r["task"] == "all"}
    fast, reference = mix["fast"], mix["reference"]
    return (
        f"task mix: fast/original {fast['vs_original']:.2f}x, fast/reference {fast['vs_reference']:.2f}x, "
        f"reference/original {reference['vs_original']:.2f}x; padding bound {fast['bound']:.3f} "
        f"(fast/original at {fast['vs_original'] / fast['bound']:.2f} of it)"
    )


def main(argv: Optional[list[str]] = None) -> None:
    """Parse arguments, time every task on the three paths, print the table, write JSON + PNG."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="base", choices=["tiny", "base", "large"])
    parser.add_argument(
        "--batch-tokens",
        type=int,
        default=None,
        help="token budget per batch (default: 640 CPU, 2048 --full, 10240 GPU)",
    )
    parser.add_argument(
        "--size-multiple",
        type=int,
        default=None,
        help=f"examples per batch are a multiple of it (CPU 4, else {SIZE_MULTIPLE})",
    )
    parser.add_argument("--tasks", nargs="+", default=list(PRETRAIN_TASKS), choices=list(PRETRAIN_TASKS))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--full", action="store_true", help="CPU: 2048-token batches, multiple of 8, 5 repeats")
    parser.add_argument(
        "--auto", action="store_true", help='also the fast path at the budget "auto" chooses (CPU: --batch-tokens)'
    )
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_tokens = args.batch_tokens or (10240 if gpu else 2048 if args.full else 640)
    args.size_multiple = args.size_multiple or (SIZE_MULTIPLE if gpu or args.full else 4)
    args.batch_size = None  # examples per batch: the sampler's (the table's "sequences")
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats or (10 if gpu else 5 if args.full else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure_steps(
        args.config,
        args.batch_tokens,
        args.size_multiple,
        tuple(args.tasks),
        device,
        args.warmup,
        args.repeats,
        args.seed,
    )

    dtypes = "original fp16 autocast + loss scaling, others bf16 autocast" if gpu else "fp32 (every path)"
    print(f"\npretraining step, {args.config}, on {device_name(device)}, {dtypes}, load {os.getloadavg()[0]}")
    print_table(rows, COLUMNS)
    print(summary_line(rows))
    extra: dict[str, Any] = {}
    if args.auto:
        auto_rows, choice = measure_auto(
            args.config, device, args.batch_tokens, args.warmup, args.repeats, tuple(args.tasks)
        )
        print(f"\n{choice.line()}")
        print_table(auto_rows, AUTO_COLUMNS)
        rows += auto_rows
        extra = {"auto": {"line": choice.line(), "budget": choice.budget, "device_memory": choice.device_memory}}
    meta = run_meta(
        args,
        torch.bfloat16 if gpu else torch.float32,
        config=args.config,
        precision=dtypes,
        batch_tokens=args.batch_tokens,
        size_multiple=args.size_multiple,
        step="zero_grad + forward + backward (+ clip at 2.0, original) + optimizer step",
        **extra,
    )
    out = output_dir(args)
    print(write_json("pretrain_bench", device, rows, meta, out))
    groups = [r["task"] for r in rows if r["path"] == "reference"]
    series = {p: [r["tokens_per_s"] for r in rows if r["path"] == p] for p in PATHS}
    title = f"UNITER-{args.config} pretraining step: original vs reference vs fast"
    print(plot_grouped_bars("pretrain_bench", device, groups, series, "valid tokens / s", title, False, out))


if __name__ == "__main__":
    main()
