"""One fine-tuning optimizer step per task head: the reference path (padded encoder) vs the fast path (packed
encoder), same weights, same AdamW, on batches built by the task collates from UNITER-shaped random rows (text 10-60
tokens incl. [CLS]/[SEP], 10-100 regions). Heads: VQA (3129 answers), NLVR2 paired-attn (two sequences per
example), RE (scores on every region, cls loss), VCR (four sequences per example, 4 type rows, 81 tag words).
VE is the VQA head with 3 outputs and is left out.

    python bench/finetune_bench.py                     # CPU: base, fp32, 2 examples per batch, 1 timed round
    python bench/finetune_bench.py --full              # CPU: 8 examples per batch, 3 timed rounds
    python bench/finetune_bench.py --device cuda       # GPU: bf16 autocast, 32 examples per batch
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
from typing import Any, Callable

import numpy as np
import torch
from harness import IMG_RANGE, TXT_RANGE, device_name, plot_grouped_bars, print_table, run_meta, time_fn, write_json
from tqdm import tqdm

from uniter_fast.config import IMG_DIM, IMG_POS_DIM, UniterConfig
from uniter_fast.data.loader import move_to_device
from uniter_fast.pretraining.optim import param_groups
from uniter_fast.tasks import get_task
from uniter_fast.tasks.data import collate_rows, row
from uniter_fast.tasks.nlvr2 import UniterForNlvr2PairedAttn
from uniter_fast.tasks.re import UniterForReferringExpressionComprehension
from uniter_fast.tasks.vcr import UniterForVisualCommonsenseReasoning, prepare_vcr_tables
from uniter_fast.tasks.vqa import UniterForVisualQuestionAnswering

TASKS = ("vqa", "nlvr2", "re", "vcr")
SEQUENCES = {"vqa": 1, "nlvr2": 2, "re": 1, "vcr": 4}
PATHS = ("reference", "fast")


def random_rows(task: str, size: int, vocab: int, rng: np.random.Generator) -> list[dict[str, Any]]:
    """The sequences of ``size`` examples (NLVR2: 2 per example, VCR: 4, sharing the example's regions)."""
    rows = []
    for _ in range(size):
        n = int(rng.integers(IMG_RANGE[0], IMG_RANGE[1] + 1))
        feat = torch.from_numpy(rng.standard_normal((n, IMG_DIM), dtype=np.float32)).relu()
        pos = torch.from_numpy(rng.random((n, IMG_POS_DIM), dtype=np.float32))
        for k in range(SEQUENCES[task]):
            t = int(rng.integers(TXT_RANGE[0], TXT_RANGE[1] + 1))
            ids = torch.from_numpy(rng.integers(5, vocab, t))
            types = torch.from_numpy(rng.integers(0, 4, t)) if task == "vcr" else None
            img_types = torch.full((n,), k + 1, dtype=torch.long) if task == "nlvr2" else None
            rows.append(row(ids, feat, pos, types, img_types))
    return rows


def make_batch(task: str, size: int, vocab: int, rng: np.random.Generator) -> dict[str, Any]:
    """A collated batch with the task's targets."""
    batch = collate_rows(random_rows(task, size, vocab, rng), task)
    rows = batch["input_ids"].size(0)
    if task == "vqa":
        batch["targets"] = torch.from_numpy(
            rng.random((rows, 3129), dtype=np.float32) * (rng.random((rows, 3129)) < 0.003)
        )
    elif task == "nlvr2":
        batch["targets"] = torch.from_numpy(rng.integers(0, 2, size))
    elif task == "re":
        batch["obj_masks"] = torch.arange(batch["img_feat"].size(1))[None, :] >= batch["num_bbs"][:, None]
        batch["targets"] = (torch.from_numpy(rng.random(rows)) * batch["num_bbs"]).long()
    else:
        batch["targets"] = torch.tensor([int(i % 4 == 0) for i in range(rows)])
    return batch


def build(task: str, config: UniterConfig) -> torch.nn.Module:
    """The task model (VCR with its grown tables)."""
    if task == "vqa":
        return UniterForVisualQuestionAnswering(config, 3129)
    if task == "nlvr2":
        model = UniterForNlvr2PairedAttn(config)
        get_task("nlvr2").prepare_model(model, {})
        return model
    if task == "re":
        return UniterForReferringExpressionComprehension(config)
    model = UniterForVisualCommonsenseReasoning(config)
    prepare_vcr_tables(model, config.vocab_size)
    return model


def make_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    fast: bool,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> Callable[[], None]:
    """One optimizer step on ``batch`` on the reference (``fast=False``) or the fast path."""

    def step() -> None:
        model.fast = fast
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = model(batch)["loss"]
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (CPU 2, --full 8; GPU 32)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="CPU: larger batches and more repeats")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
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

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else contextlib.nullcontext()

    samples: dict[tuple[str, str], list[float]] = {}
    batches = {}
    for task in tqdm(args.tasks, desc="tasks"):  # one model alive at a time (memory)
        model = build(task, config).to(device).train()
        model.uniter.check_values = False
        optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=5e-5, betas=(0.9, 0.98), eps=1e-6, fused=gpu)
        batches[task] = move_to_device(make_batch(task, args.batch_size, config.vocab_size, rng), device)
        steps = {(task, p): make_step(model, optimizer, batches[task], p == "fast", autocast) for p in PATHS}
        for round_ in range(args.warmup + args.repeats):
            for key, step in steps.items():  # paths in turn, so load changes on a shared machine hit both alike
                seconds = time_fn(step, device, warmup=0, repeats=1)
                if round_ >= args.warmup:
                    samples.setdefault(key, []).append(seconds)
        del model, optimizer, steps
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
                "speedup": statistics.median(samples[(task, "reference")]) / seconds,
            }
        )
    print(f"\nfine-tuning step, {args.config}, on {device_name(device)}, {dtype}, load {os.getloadavg()[0]}")
    print_table(rows, ["task", "path", "sequences", "valid_tokens", "padded_tokens", "ms", "tokens_per_s", "speedup"])
    meta = run_meta(args, dtype, config=args.config, step="zero_grad + forward + backward + AdamW step")
    print(write_json("finetune_bench", device, rows, meta))
    series = {p: [r["tokens_per_s"] for r in rows if r["path"] == p] for p in PATHS}
    title = f"UNITER-{args.config} fine-tuning step: reference vs fast"
    print(plot_grouped_bars("finetune_bench", device, list(args.tasks), series, "valid tokens / s", title, False))


if __name__ == "__main__":
    main()
