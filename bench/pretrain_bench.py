"""One pretraining optimizer step per task: the reference path vs everything fast.

Reference (``UniterForPretraining(fast=False)``): the padded encoder forward, the ``"reference"`` losses and IPOT.
Fast (``fast=True``): the packed encoder (``forward_packed``), the ``"auto"`` losses (fused kernels) and the ``"auto"``
IPOT backend. Both run the same weights and the same AdamW (the original parameter groups), one step = forward +
backward + ``optimizer.step()``, on batches built by the real collates from UNITER-shaped random items (text 10-60
tokens incl. [CLS]/[SEP], 10-100 regions, 15% masking). Tasks: MLM, MRFR, MRC-kl, ITM+WRA (OT lambda 0.1).

    python bench/pretrain_bench.py                      # CPU: base, fp32, batch 16
    python bench/pretrain_bench.py --device cuda        # GPU: bf16 autocast, batch 80
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from typing import Any, Callable, Optional

import numpy as np
import torch
from harness import (
    IMG_RANGE,
    TXT_RANGE,
    device_name,
    peak_memory,
    plot_grouped_bars,
    print_table,
    run_meta,
    time_fn,
    write_json,
)
from tqdm import tqdm

from uniter_fast.config import IMG_DIM, IMG_LABEL_DIM, IMG_POS_DIM, UniterConfig
from uniter_fast.data.collate import itm_collate, mlm_collate, mrm_collate
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.pretraining.optim import param_groups

TASKS = ("mlm", "mrfr", "mrckl", "itm")
MASK_PROB = 0.15


def random_items(task: str, size: int, vocab: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Dataset items in the collate format of ``uniter_fast.data.collate`` with uniformly drawn lengths."""
    items = []
    for i in range(size):
        t = int(rng.integers(TXT_RANGE[0], TXT_RANGE[1] + 1))
        n = int(rng.integers(IMG_RANGE[0], IMG_RANGE[1] + 1))
        item = {
            "input_ids": torch.from_numpy(rng.integers(5, vocab, t)),
            "img_feat": torch.from_numpy(rng.standard_normal((n, IMG_DIM), dtype=np.float32)).relu(),
            "img_pos_feat": torch.from_numpy(rng.random((n, IMG_POS_DIM), dtype=np.float32)),
        }
        if task == "mlm":
            chosen = rng.random(t) < MASK_PROB
            chosen[[0, -1]] = False
            chosen[int(rng.integers(1, t - 1))] = True
            item["txt_labels"] = torch.where(torch.from_numpy(chosen), item["input_ids"], -1)
            item["input_ids"] = item["input_ids"].masked_fill(torch.from_numpy(chosen), 103)
        elif task in ("mrfr", "mrckl"):
            mask = rng.random(n) < MASK_PROB
            mask[int(rng.integers(n))] = True
            item["img_mask"] = torch.from_numpy(mask)
            logits = torch.from_numpy(3 * rng.standard_normal((n, IMG_LABEL_DIM), dtype=np.float32))
            item["soft_labels"] = torch.softmax(logits, dim=-1)
        else:
            item["target"] = i % 2
        items.append(item)
    return items


def collate(task: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The real collate of ``task``."""
    if task == "mlm":
        return mlm_collate(items)
    if task == "itm":
        return itm_collate(items)
    return mrm_collate(items, task)


def to_device(value: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (default: 16 CPU, 80 GPU)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch_size = args.batch_size or (80 if gpu else 16)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats or (10 if gpu else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    config = UniterConfig.preset(args.config)
    model = UniterForPretraining(config).to(device).train()
    model.uniter.check_inputs = False
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, fused=gpu)
    dtype = torch.bfloat16 if gpu else torch.float32

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    batches = {
        t: to_device(collate(t, random_items(t, args.batch_size, config.vocab_size, rng)), device) for t in args.tasks
    }
    steps = {
        (task, path): make_step(model, optimizer, batches[task], task, path == "fast", autocast)
        for task in args.tasks
        for path in ("reference", "fast")
    }
    samples: dict[tuple[str, str], list[float]] = {key: [] for key in steps}
    for round_ in tqdm(range(args.warmup + args.repeats), desc="rounds"):
        for key, step in steps.items():  # paths in turn, so load changes on a shared machine hit both alike
            seconds = time_fn(step, device, warmup=0, repeats=1)
            if round_ >= args.warmup:
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
                "batch": args.batch_size,
                "valid_tokens": tokens,
                "padded_tokens": batch["attn_masks"].numel(),
                "ms": seconds * 1e3,
                "tokens_per_s": tokens / seconds,
                "peak_mem_mb": _mb(peak_memory(steps[(task, path)], device)),
                "speedup": reference / seconds,
            }
        )
    for path in ("reference", "fast"):  # the whole mix: one step of each task
        total = sum(statistics.median(samples[(t, path)]) for t in args.tasks)
        reference = sum(statistics.median(samples[(t, "reference")]) for t in args.tasks)
        tokens = sum(r["valid_tokens"] for r in rows if r["path"] == path)
        rows.append(
            {"task": "all", "path": path, "valid_tokens": tokens, "ms": total * 1e3, "tokens_per_s": tokens / total}
        )
        rows[-1]["speedup"] = reference / total

    print(f"\npretraining step, {args.config}, on {device_name(device)}, {dtype}, load {os.getloadavg()[0]}")
    print_table(rows, ["task", "path", "valid_tokens", "padded_tokens", "ms", "tokens_per_s", "peak_mem_mb", "speedup"])
    meta = run_meta(args, dtype, config=args.config, step="zero_grad + forward + backward + AdamW step")
    print(write_json("pretrain_bench", device, rows, meta))
    groups = [r["task"] for r in rows if r["path"] == "reference"]
    series = {p: [r["tokens_per_s"] for r in rows if r["path"] == p] for p in ("reference", "fast")}
    title = f"UNITER-{args.config} pretraining step: reference vs fast"
    print(plot_grouped_bars("pretrain_bench", device, groups, series, "valid tokens / s", title, log_scale=False))


def _mb(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / 2**20


if __name__ == "__main__":
    main()
