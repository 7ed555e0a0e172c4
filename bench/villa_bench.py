"""VILLA's adversarial fine-tuning (AFT) step against a plain fine-tuning step, on the three paths of the same weights
(bench/finetune_bench.py's ``original``, ``reference``, ``fast``; bench/original_path.py).

Each step is one optimizer step on one batch of ``Task.example`` rows (UNITER-shaped: text 10-60 tokens, 10-100
regions): ``plain`` = zero_grad, forward, backward, optimizer step; ``aft`` = zero_grad, the AFT micro-step with the
released settings (K = 3, L2, zero init, ``text+image`` so both perturbations ascend), optimizer step; ``aft_reuse``
(``fast`` and ``reference`` only) = the same with ``reuse_clean_forward`` (step 1 shares the clean forward: K
forwards, K backwards and one input-only backward). On ``fast`` and ``reference`` the AFT micro-step is
``uniter_fast.training.adversarial.AdversarialStep`` (the clean-logit gradients summed over the K steps, one backward
through the clean graph); on ``original`` it is the released loop's habits
(:func:`original_path.original_adversarial_step`: ``retain_graph=True`` on every backward, so the clean graph is
back-propagated K times). Columns: ms per step (median after warm-up), ``aft_vs_plain`` (the AFT step's time over
the plain step's on the same path; goal <= 3.5 on ``fast``), ``vs_original`` / ``vs_reference`` (AFT speedups
measured in the same rounds, against the original's AFT and the reference path's step of the same kind),
``graph_peak_mib`` (the peak of the tensors autograd graphs hold during the step, on any device:
``uniter_fast.training.budget.saved_tensor_bytes``) and, on CUDA, the AFT steps' allocator peak ``peak_mib``.

    python bench/villa_bench.py                        # CPU: VQA, tiny, 8 examples, 1 warm-up + 9 rounds (< 1 min)
    python bench/villa_bench.py --config base          # CPU: UNITER-base, 2 examples, 3 rounds (about 4 min)
    python bench/villa_bench.py --tasks vqa nlvr2 vcr  # more heads
    python bench/villa_bench.py --device cuda          # GPU: UNITER-base, bf16 autocast, 32 examples
    python bench/villa_bench.py --pretraining          # APT: each pretraining objective, fast and reference

``--pretraining``: VILLA's adversarial pretraining (APT) step, the same three kinds of step (``plain``, ``aft``,
``aft_reuse``) on ``UniterForPretraining`` for MLM, MRFR, MRC, MRC-kl and ITM + WRA, on the ``reference`` and
``fast`` paths (APT's code was never released: there is no ``original``), one token-bucket batch per objective
(bench/batches.py ``sampled_batches``: CPU 640 tokens and a multiple of 4 examples, GPU 10240 and 8, as
bench/pretrain_bench.py samples).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
from typing import Any, Callable, Sequence

import numpy as np
import torch
from batches import PRETRAIN_TASKS, sampled_batches
from harness import (
    IMG_RANGE,
    TXT_RANGE,
    add_output_arguments,
    device_name,
    interleaved_times,
    mib,
    output_dir,
    peak_memory,
    plot_grouped_bars,
    print_table,
    run_meta,
    write_json,
)
from original_path import PATHS, autocast_for, make_optimizer, original_adversarial_step, use_path

from uniter_fast.config import UniterConfig
from uniter_fast.data.loader import move_to_device
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.tasks import TASKS, get_task
from uniter_fast.training.adversarial import AdversarialConfig, AdversarialStep
from uniter_fast.training.budget import saved_tensor_bytes
from uniter_fast.training.optim import param_groups

BENCHED = [name for name, task in TASKS.items() if task.has_example and task.adversarial]
SETTINGS = AdversarialConfig(adv_modality="text+image")  # the released K, norm, init; both deltas ascend
REUSE = dataclasses.replace(SETTINGS, reuse_clean_forward=True)
AFT_KINDS = ("aft", "aft_reuse")


class ModelEngine:
    """The engine interface of the AFT step over a bare model: forward under the path's autocast, plain backward."""

    def __init__(self, model: torch.nn.Module, autocast: Callable[[], Any]) -> None:
        self.model, self.autocast = model, autocast

    def __call__(self, batch: dict, task: str, **kwargs: Any) -> dict:
        with self.autocast():
            return self.model(batch, task, **kwargs)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = False, retain_graph: bool = False) -> None:
        loss.backward(retain_graph=retain_graph)


def make_steps(model: torch.nn.Module, batch: dict, task: str, path: str, device: torch.device) -> dict[str, Any]:
    """{"plain": step, "aft": step, "aft_reuse": step (not on ``original``)} of ``path`` (fp32 on CPU; bf16 autocast
    on CUDA, also for ``original`` here, since the released AFT code's fp16 loss scaling is not what is compared)."""
    optimizer = make_optimizer("reference" if path == "original" else path, param_groups(model, 0.01), device)
    engine = ModelEngine(model, autocast_for("reference", device))
    aft = AdversarialStep(SETTINGS, model)
    reuse = AdversarialStep(REUSE, model)

    def plain() -> None:
        use_path(model, path)
        optimizer.zero_grad()
        engine.backward(engine(batch, task)["loss"])
        optimizer.step()

    def adversarial() -> None:
        use_path(model, path)
        optimizer.zero_grad()
        if path == "original":
            original_adversarial_step(engine, batch, task, SETTINGS, model.config.hidden_size)
        else:
            aft(engine, batch, task)
        optimizer.step()

    def adversarial_reuse() -> None:
        use_path(model, path)
        optimizer.zero_grad()
        reuse(engine, batch, task)
        optimizer.step()

    steps = {"plain": plain, "aft": adversarial}
    return steps if path == "original" else {**steps, "aft_reuse": adversarial_reuse}


def villa_speed(device: torch.device, tasks: list[str], config: str, size: int, warmup: int, repeats: int, seed: int):
    """Rows {task, path, step, ms, ...} of the plain and AFT steps of every path, timed in turns (see module doc)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model_config = UniterConfig.preset(config)
    samples: dict[tuple[str, str, str], list[float]] = {}
    memory: dict[tuple[str, str], Any] = {}
    graphs: dict[tuple[str, str, str], int] = {}
    sizes = {}
    for name in tasks:
        task = get_task(name)
        options, batch = task.example(model_config, size, rng, TXT_RANGE, IMG_RANGE)
        model = task.build_model(model_config, options, fast=False)
        task.prepare_model(model, options)
        model = model.to(device).train()
        model.uniter.check_values = False
        batch = move_to_device(batch, device)
        sizes[name] = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        steps = {(name, p, kind): fn for p in PATHS for kind, fn in make_steps(model, batch, name, p, device).items()}
        samples.update(interleaved_times(steps, device, warmup, repeats))
        for (_, p, kind), step in steps.items():
            if kind != "plain":
                memory[(name, p, kind)] = peak_memory(step, device)
            graphs[(name, p, kind)] = saved_tensor_bytes(step, model)
        del model, steps
    return step_rows(samples, sizes, graphs, memory)


def step_rows(
    samples: dict[tuple[str, str, str], list[float]],
    sizes: dict[str, int],
    graphs: dict[tuple[str, str, str], int],
    memory: dict[tuple[str, str, str], Any],
) -> list[dict]:
    """One row per (task, path, step) of the timed ``samples`` (seconds): the median ms, the valid tokens, the graph
    memory and, for the AFT kinds, the ratio to the plain step, the speedups over the original path's AFT step (where
    it ran) and the reference path's, and the allocator peak (``memory``: CUDA; None elsewhere)."""
    median = {key: statistics.median(values) for key, values in samples.items()}
    rows = []
    for (name, path, kind), seconds in median.items():
        row = {"task": name, "path": path, "step": kind, "valid_tokens": sizes[name], "ms": seconds * 1e3}
        row["graph_peak_mib"] = graphs[(name, path, kind)] / 2**20
        if kind in AFT_KINDS:
            row["aft_vs_plain"] = seconds / median[(name, path, "plain")]
            if (name, "original", "aft") in median:
                row["vs_original"] = median[(name, "original", "aft")] / seconds
            row["vs_reference"] = median[(name, "reference", kind)] / seconds
            row["peak_mib"] = mib(memory[(name, path, kind)])
        rows.append(row)
    return rows


def apt_speed(device: torch.device, config: str, batch_tokens: int, warmup: int, repeats: int, seed: int):
    """Rows {task, path, step, ms, ...} of the plain and APT steps of every pretraining objective on the reference and
    fast paths, timed in turns (module doc, ``--pretraining``)."""
    torch.manual_seed(seed)
    model_config = UniterConfig.preset(config)
    model = UniterForPretraining(model_config).to(device).train()
    model.uniter.check_values = False
    paths = [p for p in PATHS if p != "original"]
    samples: dict[tuple[str, str, str], list[float]] = {}
    memory: dict[tuple[str, str, str], Any] = {}
    graphs: dict[tuple[str, str, str], int] = {}
    sizes = {}
    for i, name in enumerate(PRETRAIN_TASKS):
        multiple = 8 if device.type == "cuda" else 4  # as bench/pretrain_bench.py samples
        batch = sampled_batches(name, 1, batch_tokens, multiple, model_config.vocab_size, seed + i, device)[0]
        sizes[name] = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        steps = {(name, p, kind): fn for p in paths for kind, fn in make_steps(model, batch, name, p, device).items()}
        samples.update(interleaved_times(steps, device, warmup, repeats))
        for key, step in steps.items():
            if key[2] != "plain":
                memory[key] = peak_memory(step, device)
            graphs[key] = saved_tensor_bytes(step, model)
    return step_rows(samples, sizes, graphs, memory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default=None, choices=["tiny", "base", "large"], help="CPU tiny, GPU base")
    parser.add_argument("--tasks", nargs="+", default=["vqa"], choices=BENCHED)
    parser.add_argument("--batch-size", type=int, default=None, help="examples per batch (CPU tiny 8, base 2; GPU 32)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--pretraining", action="store_true", help="APT: the pretraining objectives (module doc)")
    add_output_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.config = args.config or ("base" if gpu else "tiny")
    args.batch_size = args.batch_size or (32 if gpu else 8 if args.config == "tiny" else 2)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.repeats = args.repeats or (10 if gpu or args.config == "tiny" else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.pretraining:
        apt_main(args, device)
        return
    rows = villa_speed(device, args.tasks, args.config, args.batch_size, args.warmup, args.repeats, args.seed)
    precision = "bf16 autocast (every path)" if gpu else "fp32 (every path)"
    print(f"\nAFT vs plain step, {args.config}, on {device_name(device)}, {precision}, load {os.getloadavg()[0]}")
    columns = ["task", "path", "step", "valid_tokens", "ms", "aft_vs_plain", "vs_original", "vs_reference"]
    columns.append("graph_peak_mib")
    print_table(rows, columns + (["peak_mib"] if gpu else []))
    title = f"UNITER-{args.config} AFT step (K=3): original vs reference vs fast, with and without the shared pass"
    write_report(args, device, "villa_bench", rows, list(args.tasks), PATHS, "ms", title, precision=precision)


def apt_main(args: argparse.Namespace, device: torch.device) -> None:
    """``--pretraining``: measure, print, write JSON and a PNG (module doc)."""
    gpu = device.type == "cuda"
    batch_tokens = 10240 if gpu else 640
    rows = apt_speed(device, args.config, batch_tokens, args.warmup, args.repeats, args.seed)
    precision = "bf16 autocast" if gpu else "fp32"
    print(
        f"\nAPT vs plain pretraining step, {args.config}, {batch_tokens}-token batches, on {device_name(device)}, ",
        end="",
    )
    print(f"{precision}, load {os.getloadavg()[0]}")
    columns = ["task", "path", "step", "valid_tokens", "ms", "aft_vs_plain", "vs_reference", "graph_peak_mib"]
    print_table(rows, columns + (["peak_mib"] if gpu else []))
    title = f"UNITER-{args.config} APT step (K=3) over a plain pretraining step, with and without the shared pass"
    groups, paths = list(PRETRAIN_TASKS), ("reference", "fast")
    write_report(
        args,
        device,
        "villa_bench_apt",
        rows,
        groups,
        paths,
        "aft_vs_plain",
        title,
        precision=precision,
        batch_tokens=batch_tokens,
    )


def write_report(
    args: argparse.Namespace,
    device: torch.device,
    name: str,
    rows: list[dict],
    groups: list[str],
    paths: Sequence[str],
    value: str,
    title: str,
    **meta: Any,
) -> None:
    """Write ``rows`` as ``name``'s JSON (the run's metadata, the AFT settings and ``meta``) and a PNG of ``value``
    (``ms``: ms per AFT step; ``aft_vs_plain``: AFT / plain) per group, path and AFT kind."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    info = run_meta(args, dtype, config=args.config, adversarial=vars(SETTINGS), adversarial_reuse=vars(REUSE), **meta)
    out = output_dir(args)
    print(write_json(name, device, rows, info, out))
    series = {
        p + (" (shared clean pass)" if kind == "aft_reuse" else ""): [
            r[value] for r in rows if r["path"] == p and r["step"] == kind
        ]
        for p in paths
        for kind in AFT_KINDS
        if p != "original" or kind == "aft"
    }
    ylabel = "ms per AFT step" if value == "ms" else "APT / plain"
    print(plot_grouped_bars(name, device, groups, series, ylabel, title, False, out))


if __name__ == "__main__":
    main()
