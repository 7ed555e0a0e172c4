"""The speed parts of the GPU suite, built on the measuring functions of the bench/*_bench.py scripts so each figure
is measured one way: IPOT, fused losses, encoder, pretraining step, and a short DeepSpeed run. Each function returns
table rows and the goals of issue 13 (``{"goal", "target", "figure", "met"}``) and writes its PNG into ``out``."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
import types
from typing import Any

import torch
from harness import peak_memory, plot_grouped_bars, time_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPOT_ITERATIONS = 50


def _goal(goal: str, target: str, figure: str, met: bool) -> dict[str, Any]:
    return {"goal": goal, "target": target, "figure": figure, "met": bool(met), "kind": "speed"}


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured matrix-product rate (FLOP/s) of a ``size``³ product in ``dtype`` on random data (TF32 off)."""
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        seconds = time_fn(lambda: a @ b, device, warmup=3, repeats=10)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return 2.0 * size**3 / seconds


# ------------------------------------------------------------------------------------------------------------- IPOT
def ipot_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """IPOT (50 iterations) on every backend of the device against the eager reference: the goal shape B=256 60×100
    and the B/shape sweep with the floor, then OT's share of an ITM step of UNITER-base."""
    from ipot_bench import GOAL, SWEEP, itm_ot_share, measure_peaks, time_ipot

    peaks = measure_peaks(device)
    shapes = [(4, 12, 20), (8, 30, 36)] if quick else [GOAL] + [s for s in SWEEP if s != GOAL]
    rows = time_ipot(shapes, device, IPOT_ITERATIONS, 3 if quick else 10, compile_reference=False, peaks=peaks)
    from ipot_bench import WRA_DIM, time_wra

    wra_shape = (4, 12, 20, 32) if quick else (*shapes[0], WRA_DIM)
    wra_rows = time_wra(*wra_shape, device, repeats=3 if quick else 10, peaks=peaks)
    for r in wra_rows:
        rows.append({"kernel": "wra", **r})
    sweep = launch_shape_sweep(device, shapes[0], wra_shape[3]) if device.type == "cuda" else []
    itm_shape = dict(preset="tiny", batch=4, m=12, n=20) if quick else dict(preset="base", batch=128, m=62, n=100)
    itm = itm_ot_share(device, **itm_shape, warmup=1 if quick else 3, repeats=3 if quick else 10)
    meta = {"peaks": peaks, "iteration": IPOT_ITERATIONS, "itm_ot_share": {**itm, **itm_shape}, "launch_sweep": sweep}
    shape = shapes[0]
    at = {r["backend"]: r for r in rows if "kernel" not in r and (r["B"], r["text"], r["regions"]) == shape}
    label = f"B={shape[0]} {shape[1]}x{shape[2]}"
    fast = "triton" if "triton" in at else next((b for b in at if b != "reference"), None)
    goals = []
    if fast is not None:
        r = at[fast]
        goals.append(
            _goal(f"IPOT {fast} vs eager reference, {label}", ">= 100x", f"{r['x_eager']:.1f}x", r["x_eager"] >= 100)
        )
        goals.append(
            _goal(
                f"IPOT {fast} vs hardware floor, {label}",
                "<= 3x floor",
                f"{r['x_floor']:.2f}x of {r['floor_ms'] * 1e3:.1f} us",
                r["x_floor"] <= 3,
            )
        )
    wra = {(r["mode"], r["backend"]): r for r in wra_rows}
    wra_label = f"B={wra_shape[0]} {wra_shape[1]}x{wra_shape[2]} D={wra_shape[3]}"
    for name in ("triton", "cpp"):
        if ("forward", name) not in wra:
            continue
        fwd, both = wra[("forward", name)], wra[("forward+backward", name)]
        figure = f"{fwd['x_original']:.1f}x ({fwd['ms']:.3f} ms); {fwd['x_floor']:.2f}x its floor"
        goals.append(
            _goal(f"WRA {name} forward vs the original maths, {wra_label}", ">= 10x", figure, fwd["x_original"] >= 10)
        )
        figure = f"{both['x_reference']:.1f}x ({both['ms']:.3f} ms)"
        goals.append(
            _goal(f"WRA {name} forward+backward vs reference, {wra_label}", ">= 5x", figure, both["x_reference"] >= 5)
        )
        if fwd["launches"] is not None:
            goals.append(_goal(f"WRA {name} forward launches", "1", str(fwd["launches"]), fwd["launches"] == 1))
    if sweep:
        from uniter_fast.kernels.ipot import SMALL_TILE_LAUNCH

        default = "{}/{}".format(*SMALL_TILE_LAUNCH)
        total = {r["config"]: r["ipot_ms"] + r["wra_forward_ms"] for r in sweep}
        best = min(total, key=total.get)
        figure = ", ".join(f"{r['config']}: IPOT {r['ipot_ms']:.3f} / WRA {r['wra_forward_ms']:.3f} ms" for r in sweep)
        figure += f"; best {best}"
        goals.append(
            _goal(
                "IPOT/WRA launch shape (elements per thread, programs per SM)",
                f"default {default} within 5% of the best",
                figure,
                total.get(default, float("inf")) <= 1.05 * total[best],
            )
        )
    goals.append(
        _goal(
            f"OT share of an ITM step ({itm_shape['preset']}, B={itm_shape['batch']})",
            "report",
            f"{100 * itm['ot_share']:.1f}% of {itm['step_with_ot_s'] * 1e3:.1f} ms",
            True,
        )
    )
    ipot_rows = [r for r in rows if "kernel" not in r]
    labels = [f"B{b} {m}x{n}" for b, m, n in shapes]
    series = {
        name: [
            next(r["ms"] for r in ipot_rows if (r["B"], r["text"], r["regions"], r["backend"]) == (*s, name))
            for s in shapes
        ]
        for name in dict.fromkeys(r["backend"] for r in ipot_rows)
    }
    plot_grouped_bars("ipot", device, labels, series, "ms (median)", "IPOT, 50 iterations", directory=out)
    return rows, goals, meta


LAUNCH_SHAPES = (
    (16, 1),
    (32, 1),
    (32, 2),
    (64, 2),
)  # (tile elements per thread, programs per SM); results are compared with the first


def launch_shape_sweep(device: torch.device, shape: tuple[int, int, int], dim: int) -> list[dict[str, Any]]:
    """The Triton IPOT kernel and the WRA forward at ``shape`` under each launch shape of :data:`LAUNCH_SHAPES`
    (``uniter_fast.kernels.ipot.SMALL_TILE_LAUNCH``; ``shape`` must fit UNITER's main tile): median ms, and the
    largest relative difference of the plan / distances from the first launch shape's (each must compute the same)."""
    from ipot_bench import make_problem, wra_problem
    from uniter_fast.kernels import ipot as kernel

    from uniter_fast.ot import optimal_transport_dist

    problem = make_problem(*shape, device)
    wra = wra_problem(*shape, dim, device)
    lengths = (problem[3], problem[4])
    block_m, block_n = kernel.block_sizes(*shape[1:])
    if block_m * block_n > kernel.SMALL_TILE:
        raise ValueError(f"shape must fit the {kernel.SMALL_TILE}-element main tile, got {shape}")
    default = kernel.SMALL_TILE_LAUNCH
    rows, reference = [], None
    for elements, programs in LAUNCH_SHAPES:
        kernel.SMALL_TILE_LAUNCH = (elements, programs)
        try:

            def ipot_call() -> tuple[torch.Tensor, torch.Tensor]:
                return kernel.ipot_triton(problem[0], *lengths, 0.5, IPOT_ITERATIONS, 1)

            def wra_call() -> torch.Tensor:
                with torch.no_grad():
                    args = (wra["txt_emb"], wra["img_emb"], wra["txt_pad"], wra["img_pad"])
                    return optimal_transport_dist(
                        *args, backend="triton", txt_lens=wra["txt_lens"], img_lens=wra["img_lens"]
                    )

            plan, dist = ipot_call()[0].clone(), wra_call().clone()
            reference = reference or (plan, dist)
            rows.append(
                {
                    "config": f"{elements}/{programs}",
                    "num_warps": kernel.num_warps_for(block_m, block_n),
                    "maxnreg": kernel.maxnreg_for(block_m, block_n),
                    "ipot_ms": time_fn(ipot_call, device, warmup=3, repeats=10) * 1e3,
                    "wra_forward_ms": time_fn(wra_call, device, warmup=3, repeats=10) * 1e3,
                    "plan_rel_diff": float((plan - reference[0]).abs().max() / reference[0].abs().max()),
                    "dist_rel_diff": float((dist - reference[1]).abs().max() / reference[1].abs().max()),
                }
            )
            print(f"launch shape {rows[-1]}", flush=True)
        finally:
            kernel.SMALL_TILE_LAUNCH = default
    return rows


# ----------------------------------------------------------------------------------------------------------- losses
def losses_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict]]:
    """Fused losses vs reference, forward + backward: time and peak memory (losses_bench.measure)."""
    from losses_bench import measure

    if quick:
        cases = [(task, 64, 64, "float32") for task in ("mlm", "mrfr", "mrc", "mrckl")]
        timing = types.SimpleNamespace(warmup=1, repeats=2, rounds=1)
    else:
        cases = [(task, m, 768, "bfloat16") for task in ("mlm", "mrfr", "mrc", "mrckl") for m in (1000, 4000, 8000)]
        cases += [(task, 4000, 1024, "bfloat16") for task in ("mlm", "mrckl")]
        cases += [(task, 4000, 768, "float32") for task in ("mlm", "mrckl")]
        timing = types.SimpleNamespace(warmup=3, repeats=10, rounds=1)
    from uniter_fast.losses import fused_linear

    default_floor = fused_linear.CHUNK_ELEMENTS[device.type]
    sweep = [] if quick else [(m, floor) for m in (1000, 4000, 8000) for floor in (1 << 22, 1 << 25)]
    rows = []
    for (task, m, h, dtype), floor in [(c, default_floor) for c in cases] + [
        (("mlm", m, 768, "bfloat16"), f) for m, f in sweep
    ]:
        fused_linear.CHUNK_ELEMENTS[device.type] = floor  # the chunk-size sweep: the fewest logits per chunk
        try:
            rows.append({**measure(task, m, h, getattr(torch, dtype), device, timing), "chunk_elements": floor})
        finally:
            fused_linear.CHUNK_ELEMENTS[device.type] = default_floor
        r = rows[-1]
        print(
            f"{task} M{m} H{h} {dtype} chunk floor {floor}: speedup {r['speedup']:.2f}x, memory ratio "
            f"{r.get('mem_ratio')}",
            flush=True,
        )
    goals = []
    mlm = [r for r in rows if r["loss"] == "mlm" and r["dtype"] == ("float32" if quick else "bfloat16")]
    mlm = [r for r in mlm if r["chunk_elements"] == default_floor]
    for r in mlm:
        ratio = r.get("mem_ratio")
        figure = f"{r['speedup']:.2f}x time, " + ("peak memory n/a on CPU" if ratio is None else f"{ratio:.3f}x memory")
        met = r["speedup"] >= 1.0 and ratio is not None and ratio <= 0.25
        target = "<= 0.25x peak memory, >= 1x speed"
        goals.append(_goal(f"fused MLM loss M={r['M']} H={r['H']} {r['dtype']}", target, figure, met))
    labels = [f"{r['loss']} M{r['M']} H{r['H']} {r['dtype']} c{r['chunk_elements'] >> 20}M" for r in rows]
    times = {"reference ms": [r["reference_ms"] for r in rows], "fast ms": [r["fast_ms"] for r in rows]}
    plot_grouped_bars(
        "losses", device, labels, times, "forward+backward ms", "fused losses vs reference", directory=out
    )
    if all(r["fast_peak_mb"] is not None for r in rows):
        peaks = {f"{b} peak MiB": [r[f"{b}_peak_mb"] for r in rows] for b in ("reference", "fast")}
        title = "peak memory of the fused losses vs reference"
        plot_grouped_bars("losses_memory", device, labels, peaks, "peak MiB", title, directory=out)
    return rows, goals


# ---------------------------------------------------------------------------------------------------------- encoder
def encoder_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict]]:
    """Padded vs packed encoder, forward and training step, base and large (tiny when quick): valid tokens/s and
    MFU against the datasheet peak and against the bf16 matrix-product rate measured here."""
    from encoder_bench import bench_config

    from uniter_fast import backends

    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    configs = ["tiny"] if quick else ["base", "large"]
    batch, warmup, repeats = (4, 1, 2) if quick else (80, 5, 20)
    measured_peak = matmul_peak(device, dtype, 512 if quick else 8192)
    rows = []
    for name in configs:
        generator = torch.Generator().manual_seed(0)
        # sdpa_nested left out: its training step ran at 0.19x the padded encoder on an H200 (first suite run)
        forced = ["reference", "sdpa_loop"] if quick else ["flash_torch", "sdpa_padded", "torch_varlen"]
        # the fused encoder layer (Triton) on/off, on CUDA only (the CPU interpreter takes ~10 s a step, no timing)
        fused = gpu and backends.triton_usable(device)
        modes = ["forward", "train"]
        for r in bench_config(name, batch, modes, warmup, repeats, device, dtype, generator, forced, fused):
            r["mfu_measured_peak"] = r["tflops"] * 1e12 / measured_peak
            rows.append(r)
            print(f"{name} {r['mode']} {r['path']}: {r['tokens_per_s']:.0f} tokens/s, MFU {r['mfu']}", flush=True)
    goals = []
    target = next((r for r in rows if (r["model"], r["mode"], r["path"]) == (configs[0], "train", "packed")), None)
    if target is not None:
        mfu = target["mfu"]
        figure = "no datasheet peak for this device" if mfu is None else f"{100 * mfu:.1f}% MFU"
        figure += f" ({100 * target['mfu_measured_peak']:.1f}% of the measured {measured_peak / 1e12:.3g} TFLOP/s)"
        goals.append(
            _goal(f"packed encoder MFU, UNITER-{configs[0]} training", ">= 40%", figure, mfu is not None and mfu >= 0.4)
        )
    for r in rows:
        if r["path"] == "packed":
            figure = f"{r['speedup']:.2f}x with {r['attention']} (padding bound {r['max_speedup']:.2f}x)"
            goals.append(_goal(f"packed vs padded, {r['model']} {r['mode']}", "report", figure, True))
        if r["path"] == "packed+fused":
            eager = next(e for e in rows if (e["model"], e["mode"], e["path"]) == (r["model"], r["mode"], "packed"))
            mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f}% (eager layer {100 * eager['mfu']:.1f}%)"
            figure = f"{r['tokens_per_s'] / eager['tokens_per_s']:.2f}x the eager layer's tokens/s{mfu}"
            goals.append(_goal(f"fused encoder layer on/off, {r['model']} {r['mode']}", "report", figure, True))
    groups = [f"{r['model']}/{r['mode']}" for r in rows if r["path"] == "padded"]
    paths = list(dict.fromkeys(r["path"] for r in rows))
    series = {
        p: [
            next((r["tokens_per_s"] for r in rows if (f"{r['model']}/{r['mode']}", r["path"]) == (g, p)), 0.0)
            for g in groups
        ]
        for p in paths
    }
    title = "UNITER encoder: padded vs packed"
    plot_grouped_bars("encoder", device, groups, series, "valid tokens / s", title, log_scale=False, directory=out)
    return rows, goals


# --------------------------------------------------------------------------------------------------------- pretrain
def pretrain_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict]]:
    """One optimizer step per task on the original, reference and fast paths (pretrain_bench.measure_steps), on
    token-bucket batches: the original's 10240-token budget and multiple of 8 on a GPU; then the fast path at the
    budget ``train_batch_size: "auto"`` chooses for the recipe's update (pretrain_bench.measure_auto: corpus batches,
    the estimate of the activation memory against the measured peak; on a CPU, quick: 512 tokens)."""
    from batches import PRETRAIN_TASKS
    from original_path import PATHS
    from pretrain_bench import measure_auto, measure_steps

    from uniter_fast.config import SIZE_MULTIPLE

    config, tokens, multiple, warmup, repeats = (
        ("tiny", 320, 2, 1, 1) if quick else ("base", 10240, SIZE_MULTIPLE, 3, 10)
    )
    rows = measure_steps(config, tokens, multiple, PRETRAIN_TASKS, device, warmup, repeats)
    mix = {r["path"]: r for r in rows if r["task"] == "all"}
    fast, reference = mix["fast"], mix["reference"]
    over = f"tokens/s over the {len(PRETRAIN_TASKS)} tasks"
    goals = [
        _goal(
            f"pretraining step, UNITER-{config}, fast vs reference",
            ">= 2x tokens/s",
            f"{fast['vs_reference']:.2f}x ({fast['tokens_per_s']:.0f} {over})",
            fast["vs_reference"] >= 2,
        ),
        _goal(
            f"pretraining step, UNITER-{config}, fast vs original",
            "within 10% of the padding bound",
            f"{fast['vs_original']:.2f}x, bound {fast['bound']:.3f} (padded / valid encoder FLOPs)",
            fast["vs_original"] >= 0.9 * fast["bound"],
        ),
        _goal(
            f"pretraining step, UNITER-{config}, reference vs original",
            "report",
            f"{reference['vs_original']:.2f}x ({mix['original']['tokens_per_s']:.0f} {over}, original)",
            True,
        ),
    ]
    for r in rows:
        if r["path"] == "fast" and r["task"] != "all":
            figure = f"{r['vs_reference']:.2f}x reference, {r['vs_original']:.2f}x original, bound {r['bound']:.3f}"
            goals.append(_goal(f"pretraining step {r['task']}", "report", figure, True))
    cpu_tokens = 512 if quick else tokens  # the quick 320 holds no batch of the bundled corpus's longest example
    auto_rows, choice = measure_auto(config, device, cpu_tokens, 1, 1 if quick else 3, PRETRAIN_TASKS)
    goals.append(_goal(f'UNITER-{config} micro-batch budget "auto"', "report", choice.line(), True))
    for r in auto_rows:
        peak = "not measured (CPU)" if r["peak_mem_mb"] is None else f"measured peak {r['peak_mem_mb']:.0f} MiB"
        figure = f"{r['tokens_per_s']:.0f} tokens/s; activation estimate {r['estimate_mb']:.0f} MiB, {peak}"
        goals.append(_goal(f"pretraining step {r['task']}, fast, {choice.budget} tokens", "report", figure, True))
    rows += auto_rows
    groups = [r["task"] for r in rows if r["path"] == "reference"]
    series = {p: [r["tokens_per_s"] for r in rows if r["path"] == p] for p in PATHS}
    title = f"UNITER-{config} pretraining step: original vs reference vs fast"
    plot_grouped_bars("pretrain", device, groups, series, "valid tokens / s", title, log_scale=False, directory=out)
    return rows, goals


# -------------------------------------------------------------------------------------------------------- villa
def villa_aft_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict]]:
    """VILLA's adversarial fine-tuning step (K = 3) against a plain step, VQA, on the three paths, with and without
    the shared clean pass (``reuse_clean_forward``; villa_bench.villa_speed); goals: AFT <= 3.5x a plain step on the
    fast path (the default step and the shared pass), fast >= 3x reference on a GPU."""
    from original_path import PATHS
    from villa_bench import villa_speed

    config, size, warmup, repeats = ("tiny", 2, 1, 1) if quick else ("base", 32, 3, 10)
    rows = villa_speed(device, ["vqa"], config, size, warmup, repeats, 0)
    aft = {r["path"]: r for r in rows if r["step"] == "aft"}
    fast, reuse = aft["fast"], next(r for r in rows if r["path"] == "fast" and r["step"] == "aft_reuse")
    peaks = ", ".join(f"{p} {aft[p]['peak_mib']:.0f} MiB" for p in PATHS if aft[p]["peak_mib"] is not None)
    goals = [
        _goal(
            f"AFT step, UNITER-{config} VQA, fast path, vs a plain step",
            "<= 3.5x",
            f"{fast['aft_vs_plain']:.2f}x ({fast['ms']:.1f} ms)",
            fast["aft_vs_plain"] <= 3.5,
        ),
        _goal(
            f"AFT step, shared clean pass (reuse_clean_forward), UNITER-{config} VQA, fast path, vs a plain step",
            "<= 3.5x",
            f"{reuse['aft_vs_plain']:.2f}x ({reuse['ms']:.1f} ms)",
            reuse["aft_vs_plain"] <= 3.5,
        ),
        _goal(
            f"AFT step, UNITER-{config} VQA, fast vs reference",
            ">= 3x",
            f"{fast['vs_reference']:.2f}x",
            fast["vs_reference"] >= 3,
        ),
        _goal(
            f"AFT step, UNITER-{config} VQA, fast vs original (the released loop's retain_graph)",
            "report",
            f"{fast['vs_original']:.2f}x; peak memory {peaks or 'n/a on CPU'}",
            True,
        ),
    ]
    series = {p: [aft[p]["ms"]] for p in PATHS}
    series["fast (shared clean pass)"] = [reuse["ms"]]
    title = f"UNITER-{config} AFT step (K=3): original vs reference vs fast"
    plot_grouped_bars("villa", device, ["vqa"], series, "ms per AFT step", title, log_scale=False, directory=out)
    apt_rows, apt_goals = villa_apt_speed(device, quick)
    return rows + apt_rows, goals + apt_goals


def villa_apt_speed(device: torch.device, quick: bool) -> tuple[list[dict], list[dict]]:
    """VILLA's adversarial pretraining (APT) step of each pretraining objective on the fast path, default and with
    the shared clean pass, against a plain step (villa_bench.apt_speed; reported, no goal of its own)."""
    from batches import PRETRAIN_TASKS
    from villa_bench import apt_speed

    config, tokens, warmup, repeats = ("tiny", 640, 1, 1) if quick else ("base", 10240, 2, 5)
    rows = [{**r, "part": "apt"} for r in apt_speed(device, config, tokens, warmup, repeats, 0)]
    fast = {(r["task"], r["step"]): r for r in rows if r["path"] == "fast" and r["step"] != "plain"}
    figure = "; ".join(
        f"{task} {fast[(task, 'aft')]['aft_vs_plain']:.2f}x / {fast[(task, 'aft_reuse')]['aft_vs_plain']:.2f}x"
        for task in PRETRAIN_TASKS
    )
    goal = _goal(
        f"APT step / plain step, UNITER-{config}, fast path: default / shared clean pass", "report", figure, True
    )
    return rows, [goal]


# ---------------------------------------------------------------------------------------------------------- capture
def capture_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The captured step (``uniter_fast.training.capture``: forward + backward replayed as CUDA graphs on
    fixed-shape batches, default buckets) against the eager fast step on the same token-bucket batches (the original's
    10240-token budget, UNITER-base, bf16 weights as DeepSpeed's bf16 holds them, fused AdamW, dropout on): one
    optimizer step per batch (zero_grad, the host batch padded and copied, forward, backward, step), valid tokens/s and
    peak memory each way. Then, dropout off, the captured losses and gradients against the eager step's on the same
    padded batches, replayed (not first-captured) graphs included, and the host syncs of a replayed micro-step."""
    from batches import PRETRAIN_TASKS, sampled_batches

    from uniter_fast.config import SIZE_MULTIPLE, UniterConfig
    from uniter_fast.data.buckets import Buckets, pad_batch
    from uniter_fast.data.loader import move_to_device
    from uniter_fast.pretraining.model import UniterForPretraining
    from uniter_fast.syncs import count_syncs
    from uniter_fast.training.capture import CapturedStep
    from uniter_fast.training.optim import param_groups

    name, tokens, multiple, count, warmup, repeats = (
        ("tiny", 320, 2, 2, 1, 1) if quick else ("base", 10240, SIZE_MULTIPLE, 3, 2, 5)
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    buckets = Buckets()
    cpu = torch.device("cpu")
    batches = {
        task: sampled_batches(task, count, tokens, multiple, UniterConfig.preset(name).vocab_size, i, cpu)
        for i, task in enumerate(PRETRAIN_TASKS)
    }

    def model_of(**overrides: Any) -> UniterForPretraining:
        torch.manual_seed(0)
        config = UniterConfig.from_dict({**UniterConfig.preset(name).to_dict(), **overrides})
        return UniterForPretraining(config, fast=True).to(device=device, dtype=dtype).train()

    model = model_of()
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5, fused=device.type == "cuda")
    captured = CapturedStep(model, device, buckets)

    def eager_step(batch: dict, task: str) -> None:
        optimizer.zero_grad()
        model(move_to_device(batch, device), task)["loss"].backward()
        optimizer.step()

    def captured_step(batch: dict, task: str) -> None:
        optimizer.zero_grad()
        captured(batch, task)["loss"].backward()
        optimizer.step()

    rows = []
    for task, group in batches.items():
        valid = sum(int(b["txt_lens"].sum() + b["num_bbs"].sum()) for b in group)
        padded = sum(int(pad_batch(b, buckets)["packed"]["txt_ids"].numel()) for b in group)
        padded += sum(int(pad_batch(b, buckets)["packed"]["img_feat"].size(0)) for b in group)
        for mode, fn in (("eager", eager_step), ("captured", captured_step)):
            run = lambda fn=fn, group=group, task=task: [fn(b, task) for b in group]  # noqa: E731
            seconds = time_fn(run, device, warmup=warmup, repeats=repeats)
            memory = peak_memory(run, device)
            rows.append(
                {
                    "task": task,
                    "mode": mode,
                    "batches": len(group),
                    "valid_tokens": valid,
                    "padded_tokens": padded if mode == "captured" and captured.blocker is None else valid,
                    "ms_per_step": seconds * 1e3 / len(group),
                    "tokens_per_s": valid / seconds,
                    "peak_mem_mb": None if memory is None else memory / 2**20,
                }
            )
    for mode in ("eager", "captured"):
        mine = [r for r in rows if r["mode"] == mode]
        seconds = sum(r["ms_per_step"] * r["batches"] for r in mine) / 1e3
        tokens = sum(r["valid_tokens"] for r in mine)
        rows.append({"task": "all", "mode": mode, "valid_tokens": tokens, "tokens_per_s": tokens / seconds})

    exact = model_of(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    exact_captured = CapturedStep(exact, device, buckets)
    errors = [replay_errors(exact, exact_captured, group, task, buckets, device) for task, group in batches.items()]
    loss_err, grad_err = (max(column) for column in zip(*errors))
    syncs = {  # one replayed micro-step per task (padding, copies, replay, backward): what it asks of the host
        task: count_syncs(lambda t=task, g=group: exact_captured(g[0], t)["loss"].backward(), device)[0]
        for task, group in batches.items()
    }
    mix = {r["mode"]: r for r in rows if r["task"] == "all"}
    speedup = mix["captured"]["tokens_per_s"] / mix["eager"]["tokens_per_s"]
    state = "on" if captured.blocker is None else f"off: {captured.blocker}"
    goals = [
        _goal(
            f"captured step, UNITER-{name}, vs the eager fast step",
            "report (launch-bound: the graphs remove the host's launches)",
            f"{speedup:.2f}x tokens/s over the {len(PRETRAIN_TASKS)} tasks ({len(captured.graphs)} graphs; {state})",
            True,
        ),
        {
            "goal": "captured step: losses equal the eager step's on the same padded batches",
            "target": "relative error <= 1e-5",
            "figure": f"{loss_err:.2e}",
            "met": loss_err <= 1e-5,
            "kind": "correctness",
        },
        _goal(
            "captured step: host syncs per micro-step",
            "0 (CUDA: torch.cuda.set_sync_debug_mode; CPU: the counter's upper bound)",
            ", ".join(f"{task} {count}" for task, count in syncs.items()),
            device.type != "cuda" or not any(syncs.values()),
        ),
        {
            "goal": "captured step: gradients equal the eager step's on the same padded batches",
            "target": "relative error <= 1e-2 (bf16; flash attention's backward is not deterministic)",
            "figure": f"{grad_err:.2e}",
            "met": grad_err <= 1e-2,
            "kind": "correctness",
        },
    ]
    groups = [r["task"] for r in rows if r["mode"] == "eager"]
    series = {m: [r["tokens_per_s"] for r in rows if r["mode"] == m] for m in ("eager", "captured")}
    title = f"UNITER-{name} pretraining step: eager vs captured (CUDA graphs)"
    plot_grouped_bars("capture", device, groups, series, "valid tokens / s", title, log_scale=False, directory=out)
    meta = {"capture": state, "graphs": len(captured.graphs), "buckets": vars(buckets), "dtype": str(dtype)}
    return rows, goals, meta


def replay_errors(
    model: Any, captured: Any, batches: list[dict], task: str, buckets: Any, device: torch.device
) -> tuple[float, float]:
    """The captured step (``captured``, a ``CapturedStep`` of ``model``) against the eager step of ``model`` on the
    same padded host ``batches`` and the first batch again (a replay of its graph): the largest relative loss error
    and the largest relative error of all parameter gradients (2-norm)."""
    from uniter_fast.data.buckets import pad_batch
    from uniter_fast.data.loader import move_to_device

    def loss_and_grads(step: Any) -> tuple[float, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        loss = step()["loss"]
        loss.backward()
        return float(loss.detach()), torch.cat(
            [p.grad.float().flatten() for p in model.parameters() if p.grad is not None]
        )

    loss_err = grad_err = 0.0
    for batch in batches + batches[:1]:
        eager, reference = loss_and_grads(lambda b=batch: model(move_to_device(pad_batch(b, buckets), device), task))
        replayed, mine = loss_and_grads(lambda b=batch: captured(b, task))
        loss_err = max(loss_err, abs(replayed - eager) / abs(eager))
        grad_err = max(grad_err, float((mine - reference).norm() / reference.norm()))
    return loss_err, grad_err


def _head_capture(task_name: str, device: torch.device, quick: bool, buckets: Any) -> Any:
    """One head of :func:`capture_heads_speed`: (rows, capture state, loss error, gradient error), or None when the
    head's model cannot be captured."""
    import numpy as np
    from harness import IMG_RANGE, TXT_RANGE

    from uniter_fast.config import UniterConfig
    from uniter_fast.data.loader import move_to_device
    from uniter_fast.tasks import get_task
    from uniter_fast.training.capture import CapturedStep

    name, size, count, warmup, repeats = ("tiny", 2, 2, 1, 1) if quick else ("base", 32, 2, 1, 3)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    task, config, rng = get_task(task_name), UniterConfig.preset(name), np.random.default_rng(0)
    drawn = [task.example(config, size, rng, TXT_RANGE, IMG_RANGE) for _ in range(count)]
    options, batches = drawn[0][0], [batch for _, batch in drawn]

    def model_of(dropout: bool) -> Any:
        torch.manual_seed(0)
        fields = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
        model = task.build_model(UniterConfig.from_dict({**config.to_dict(), **fields}), options, True)
        task.prepare_model(model, options)
        return model.to(device=device, dtype=dtype).train()

    model = model_of(True)
    if not model.captures:
        return None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    captured = CapturedStep(model, device, buckets)
    valid = sum(int(b["packed"]["txt_ids"].numel() + b["packed"]["img_feat"].size(0)) for b in batches)
    rows = []
    for mode in ("eager", "captured"):

        def run(mode: str = mode) -> None:
            for batch in batches:
                optimizer.zero_grad()
                out = captured(batch, task_name) if mode == "captured" else model(move_to_device(batch, device))
                out["loss"].backward()
                optimizer.step()

        seconds = time_fn(run, device, warmup=warmup, repeats=repeats)
        rows.append(
            {
                "task": task_name,
                "mode": mode,
                "batches": count,
                "valid_tokens": valid,
                "ms_per_step": seconds * 1e3 / count,
                "tokens_per_s": valid / seconds,
            }
        )
    state = "on" if captured.blocker is None else f"off: {captured.blocker}"
    exact = model_of(False)
    exact_captured = CapturedStep(exact, device, buckets)
    loss_err, grad_err = replay_errors(exact, exact_captured, batches, task_name, buckets, device)
    return rows, state, loss_err, grad_err


def capture_heads_speed(device: torch.device, quick: bool) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The captured step of every fine-tuning head that can be captured and has example batches (``Task.example``
    at the bench ranges; UNITER-base, bf16, 2 batches of 32 examples) against its eager fast step, as
    :func:`capture_speed` does for pretraining: ms per optimizer step and valid tokens/s each way over the same
    batches, then, dropout off, the captured losses and gradients against the eager step's on the same padded
    batches (a replay included)."""
    from harness import IMG_RANGE, TXT_RANGE

    from uniter_fast.data.buckets import Buckets
    from uniter_fast.tasks import TASKS

    buckets = Buckets(max_txt_len=TXT_RANGE[1] + 2, max_bb=IMG_RANGE[1])
    rows: list[dict] = []
    states, loss_err, grad_err = {}, 0.0, 0.0
    for task_name, task in TASKS.items():
        result = _head_capture(task_name, device, quick, buckets) if task.has_example else None
        if result is None:
            continue
        head_rows, states[task_name], head_loss_err, head_grad_err = result
        rows += head_rows
        loss_err, grad_err = max(loss_err, head_loss_err), max(grad_err, head_grad_err)
    speed = {r["task"]: {} for r in rows}
    for r in rows:
        speed[r["task"]][r["mode"]] = r["tokens_per_s"]
    figure = ", ".join(f"{t} {x['captured'] / x['eager']:.2f}x" for t, x in speed.items())
    figure += f" tokens/s; capture {'; '.join(sorted(set(states.values())))}"
    goals = [
        _goal("captured step of the fine-tuning heads vs the eager fast step", "report", figure, True),
        {
            "goal": "captured fine-tuning heads: losses and gradients equal the eager step's on the same batches",
            "target": "losses <= 1e-5, gradients <= 1e-2 relative (bf16)",
            "figure": f"losses {loss_err:.2e}, gradients {grad_err:.2e}",
            "met": loss_err <= 1e-5 and grad_err <= 1e-2,
            "kind": "correctness",
        },
    ]
    return rows, goals, {"heads": states, "head_buckets": vars(buckets)}


# -------------------------------------------------------------------------------------------------------- deepspeed
def deepspeed_run(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict]]:
    """The bundled default (configs/pretrain-tiny.json) through ``uniter_fast/pretrain.py`` with ds.json (ZeRO-2,
    bf16) for a few steps on this device; rows: the final metrics per task; goals: it finished with finite losses
    on ZeRO-2 bf16 and the MLM loss went down."""
    from plots import plot_curves

    from uniter_fast.pretrain import main as pretrain_main

    steps = 10 if quick else 200
    with tempfile.TemporaryDirectory() as run_dir:
        argv = ["--ds_config", os.path.join(ROOT, "ds.json"), "--output_dir", run_dir]
        argv += ["--num_train_steps", str(steps)]
        began = time.monotonic()
        results = pretrain_main(argv)
        seconds = time.monotonic() - began
        with open(os.path.join(run_dir, "train_steps.jsonl"), encoding="utf-8") as f:
            log = [json.loads(line) for line in f]
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for entry in log:
        steps_, losses = curves.setdefault(entry["task"], ([], []))
        steps_.append(entry["step"])
        losses.append(entry["loss"])
    rows = [{"task": task, **metrics} for task, metrics in results.items()]
    finite = all(math.isfinite(e["loss"]) for e in log)
    mlm_losses = next((v[1] for t, v in curves.items() if t.startswith("mlm")), [])
    quarter = len(mlm_losses) // 4
    fell = quarter > 0 and _mean(mlm_losses[-quarter:]) < _mean(mlm_losses[:quarter])
    import deepspeed

    figure = f"{len(log)} steps in {seconds:.0f} s (DeepSpeed {deepspeed.__version__}), finite losses: {finite}"
    target = "finishes, losses finite" + ("" if quick else ", MLM falls")
    if not quick:  # a dry run is too short to see a trend
        figure += f", MLM loss fell: {fell}"
    goals = [_goal("DeepSpeed ZeRO-2 bf16 run of the bundled default", target, figure, finite and (fell or quick))]
    goals[0]["kind"] = "correctness"
    title = f"deepspeed uniter_fast/pretrain.py --ds_config ds.json --num_train_steps {steps} on {device}"
    plot_curves(curves, os.path.join(out, "deepspeed.png"), title)
    return rows, goals


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


# -------------------------------------------------------------------------------------------------------- retrieval
def retrieval_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict]]:
    """Exact retrieval scoring, UNITER-base (tiny when quick) on COCO-shaped random pairs: the cross-encoder on
    batches built beforehand (the ceiling), on batches of the task collate (as before the device-resident gallery)
    and through ``itm_eval.score_pairs`` (the gallery) (retrieval_bench.scoring_speed); goal: the gallery's
    pairs/s within 20 % of the ceiling (scoring bound by the cross-encoder, not by the host)."""
    from retrieval_bench import scoring_speed

    config, texts, images, repeats = ("tiny", 2, 24, 1) if quick else ("base", 8, 256, 2)
    rows = scoring_speed(device, config, texts, images, repeats=repeats)
    ways = {r["way"]: r for r in rows}
    gallery, collate = ways["gallery"], ways["task collate"]
    figure = (
        f"gallery {gallery['pairs_per_s']:.0f} pairs/s = {gallery['vs_model_only']:.2f} of the model-only "
        f"{ways['model only']['pairs_per_s']:.0f}; task collate {collate['pairs_per_s']:.0f} pairs/s "
        f"({gallery['pairs_per_s'] / collate['pairs_per_s']:.1f}x less than the gallery)"
    )
    goals = [
        _goal(f"exact retrieval scoring, UNITER-{config}, {texts} x {images} pairs", ">= 0.8 of the ceiling", figure,
              gallery["vs_model_only"] >= 0.8)
    ]  # fmt: skip
    series = {"pairs / s": [r["pairs_per_s"] for r in rows]}
    title = f"UNITER-{config} exact scoring of {texts} x {images} COCO-shaped pairs"
    plot_grouped_bars("retrieval", device, [r["way"] for r in rows], series, "pairs / s", title, False, out)
    return rows, goals


# ---------------------------------------------------------------------------------------------------------- extract
def extract_speed(device: torch.device, quick: bool, out: str) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """The BUTD extractor (random ResNet-101 weights, Caffe settings; the TINY detector when quick): images/s at
    batch 1 and 8 in fp32 and bf16 against the floor (FLOPs / measured matrix rate), CPU-vs-device agreement and the
    bf16 drift (extract_bench.gpu_check)."""
    from extract_bench import gpu_check

    from uniter_fast.extract import random_state_dict
    from uniter_fast.extract.config import TINY

    if quick:
        tiny = {"weights": random_state_dict("milvlg", TINY, 0), "config": TINY, "matmul_size": 256, "chunk": 8}
        result = gpu_check(str(device), batch_sizes=(1, 2), dtypes=("fp32",), num_images=2, warmup=0, repeats=1, **tiny)
    else:
        result = gpu_check(str(device), batch_sizes=(1, 8), num_images=16, warmup=1, repeats=2)
    rows = result["rows"]
    same = result["agreement"].get("cpu_vs_device_fp32", {})
    figure = ", ".join(f"{k} {v:.4g}" for k, v in same.items() if isinstance(v, (int, float)))
    goals = [
        {
            "goal": "extractor: CPU vs device detections (fp32)",
            "target": "roi_match > 0.9, feature_cosine_min > 0.999",
            "figure": figure or "not measured",
            "met": same.get("roi_match", 0) > 0.9 and same.get("feature_cosine_min", 0) > 0.999,
            "kind": "correctness",
        }
    ]
    for r in rows:
        if r["path"] == "fast":
            floor = r["floor_images_per_s"]
            figure = f"{r['images_per_s']:.2f} images/s ({r['images_per_s'] / floor:.0%} of the floor {floor:.1f})"
            goals.append(_goal(f"extractor {r['dtype']} batch {r['batch']}", "report", figure, True))
    labels = [f"{r['path']} {r['dtype']} b{r['batch']}" for r in rows]
    series = {"images/s": [r["images_per_s"] for r in rows]}
    plot_grouped_bars("extract", device, labels, series, "images / s", "BUTD extractor", log_scale=False, directory=out)
    return rows, goals, {"agreement": result["agreement"], **result["meta"]}
