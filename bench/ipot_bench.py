"""IPOT benchmark: every backend available here, plus torch.compile of the reference, against the eager reference.

    python bench/ipot_bench.py                 # the full sweep, 50 iterations
    python bench/ipot_bench.py --no-compile    # skip torch.compile (its first compile takes minutes on a CPU)

Sweeps B ∈ {32, 128, 512} × (text, regions) ∈ {(30, 36), (60, 100), (128, 128)} plus the goal point B=256, 60×100.
Pairs are full length (no padding). Each time is the median of repeats after warm-up (bench/harness.py) of one call
computing the plan and the distances. The floor is launch + max(bytes / bandwidth, flops / fp32 peak) with the
bandwidth and fp32 peak measured here (a large copy; a large fp32 matmul, TF32 off): bytes = cost read once + plan
written once, flops = 7 per plan entry per iteration. On CUDA the script also times an ITM training step of
UNITER-base with and without the OT term and reports OT's share. Writes bench/results/ipot_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from typing import Callable

import torch
from harness import device_name, plot_grouped_bars, print_table, time_fn, write_json
from tqdm import tqdm

from uniter_fast.ot import available_backends, cost_matrix_cosine
from uniter_fast.ot.backends import RUNNERS, run_reference

SWEEP = [(b, m, n) for b in (32, 128, 512) for m, n in ((30, 36), (60, 100), (128, 128))]
GOAL = (256, 60, 100)
FLOPS_PER_ENTRY_ITER = 7  # Q = A*T (1), column and row weighted sums (2 + 2), T = delta*Q*sigma (2)


def make_problem(batch: int, m: int, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Full-length cosine cost [B, m, n] fp32 from random 768-d embeddings, no pads, lengths m and n."""
    cost = cost_matrix_cosine(torch.randn(batch, m, 768, device=device), torch.randn(batch, n, 768, device=device))
    txt_pad = torch.zeros(batch, m, dtype=torch.bool, device=device)
    img_pad = torch.zeros(batch, n, dtype=torch.bool, device=device)
    lens = (torch.full((batch,), m, device=device), torch.full((batch,), n, device=device))
    return cost, txt_pad, img_pad, *lens


def measure_peaks(device: torch.device) -> dict[str, float]:
    """Achievable copy bandwidth (bytes/s, read + write counted), fp32 matmul rate (flop/s), launch latency (s)."""
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    copy_s = time_fn(lambda: x.clone(), device, warmup=2, repeats=5)
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    mm_s = time_fn(lambda: a @ a, device, warmup=2, repeats=5)
    torch.backends.cuda.matmul.allow_tf32 = allow
    tiny = torch.zeros(1, device=device)
    launch_s = time_fn(lambda: tiny.add_(1), device, warmup=10, repeats=50) if device.type == "cuda" else 0.0
    return {"bandwidth": 2 * x.numel() * 4 / copy_s, "flops": 2 * size**3 / mm_s, "launch_s": launch_s}


def floor_seconds(batch: int, m: int, n: int, iteration: int, peaks: dict[str, float]) -> float:
    """launch + max(bytes / bandwidth, flops / peak) for one batched IPOT call."""
    entries = batch * m * n
    bytes_moved = 2 * entries * 4 + batch * (4 + 16)
    flops = entries * (FLOPS_PER_ENTRY_ITER * iteration + 2)
    return peaks["launch_s"] + max(bytes_moved / peaks["bandwidth"], flops / peaks["flops"])


def time_interleaved(calls: dict[str, Callable], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per call after warm-up (``time_fn``, one repeat at a time), the backends taking turns in each
    round so that a load change on a shared machine hits all of them alike."""
    for call in calls.values():
        time_fn(call, device, warmup=2, repeats=1)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            samples[name].append(time_fn(call, device, warmup=0, repeats=1))
    return {name: statistics.median(values) for name, values in samples.items()}


def backends_to_time(device: torch.device, compile_reference: bool) -> dict[str, Callable]:
    """name → runner: the fast backends of this device (interpreted Triton excluded), eager and compiled reference."""
    runners = {name: RUNNERS[name] for name in available_backends(device) if name != "reference"}
    if device.type != "cuda":
        runners.pop("triton", None)
    runners["reference"] = run_reference
    if compile_reference:
        runners["reference+compile"] = torch.compile(run_reference, dynamic=True)
    return runners


def itm_ot_share(
    device: torch.device,
    preset: str = "base",
    batch: int = 128,
    m: int = 62,
    n: int = 100,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, float]:
    """Seconds of an ITM step (UNITER forward + backward, bf16 autocast) with and without OT, and OT's share."""
    from uniter_fast import Model, UniterConfig
    from uniter_fast.ot import optimal_transport_dist

    config = UniterConfig.preset(preset)
    model = Model(config).to(device)
    itm_head = torch.nn.Linear(config.hidden_size, 2).to(device)
    batch_in = {
        "input_ids": torch.randint(1, config.vocab_size, (batch, m), device=device),
        "position_ids": torch.arange(m, device=device)[None],
        "img_feat": torch.randn(batch, n, 2048, device=device),
        "img_pos_feat": torch.rand(batch, n, 7, device=device),
        "attention_mask": torch.ones(batch, m + n, dtype=torch.long, device=device),
        "gather_index": torch.arange(m + n, device=device)[None].expand(batch, -1).contiguous(),
    }
    targets = torch.randint(0, 2, (batch,), device=device)
    txt_pad = torch.zeros(batch, m, dtype=torch.bool, device=device)
    img_pad = torch.zeros(batch, n, dtype=torch.bool, device=device)

    def step(with_ot: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            seq = model(**batch_in, output_all_encoded_layers=False)
            loss = torch.nn.functional.cross_entropy(itm_head(model.pooler(seq)).float(), targets)
        if with_ot:
            dist = optimal_transport_dist(seq[:, :m].float(), seq[:, m:].float(), txt_pad, img_pad)
            loss = loss + 0.1 * (dist[targets == 1].sum() - dist[targets == 0].sum()) / batch
        loss.backward()

    with_ot = time_fn(lambda: step(True), device, warmup=warmup, repeats=repeats)
    without = time_fn(lambda: step(False), device, warmup=warmup, repeats=repeats)
    return {"step_with_ot_s": with_ot, "step_without_ot_s": without, "ot_share": (with_ot - without) / with_ot}


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table, write JSON + PNG; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iteration", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="do not time torch.compile of the reference")
    parser.add_argument("--threads", type=int, default=None, help="torch (and C++ kernel) CPU threads")
    parser.add_argument(
        "--goal-only", action="store_true", help="only B=256, 60x100; writes bench/results/ipot_goal_<device>.*"
    )
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # CPU timings on a shared machine are only as good as its load
    peaks = measure_peaks(device)
    runners = backends_to_time(device, not args.no_compile)
    rows = []
    shapes = [GOAL] if args.goal_only else SWEEP + [GOAL]
    result_name = "ipot_goal" if args.goal_only else "ipot"
    if args.threads is not None:
        result_name += f"_{args.threads}threads"
    for batch, m, n in tqdm(shapes, desc="shapes", file=sys.stderr):
        problem = make_problem(batch, m, n, device)
        floor = floor_seconds(batch, m, n, args.iteration, peaks)
        calls = {name: functools.partial(runner, *problem, 0.5, args.iteration, 1) for name, runner in runners.items()}
        times = time_interleaved(calls, device, args.repeats)
        for name, seconds in times.items():
            rows.append(
                {
                    "B": batch,
                    "text": m,
                    "regions": n,
                    "backend": name,
                    "ms": seconds * 1e3,
                    "x_eager": times["reference"] / seconds,
                    "floor_ms": floor * 1e3,
                    "x_floor": seconds / floor,
                }
            )
    print(f"device: {device_name(device)}; iterations {args.iteration}; peaks {peaks}")
    print(f"1-min load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print_table(rows, ["B", "text", "regions", "backend", "ms", "x_eager", "floor_ms", "x_floor"])

    meta = {
        "iteration": args.iteration,
        "repeats": args.repeats,
        "peaks": peaks,
        "goals": goal_lines(rows, device),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }
    if device.type == "cuda":
        meta["itm"] = itm_ot_share(device)
        print(f"ITM step (UNITER-base, B=128, 62+100): {meta['itm']}")
    for line in meta["goals"]:
        print(line)
    path = write_json(result_name, device, rows, meta)
    labels = [f"B{b} {m}x{n}" for b, m, n in shapes]
    series = {
        name: [
            next(r["ms"] for r in rows if (r["B"], r["text"], r["regions"], r["backend"]) == (*s, name)) for s in shapes
        ]
        for name in runners
    }
    png = plot_grouped_bars(result_name, device, labels, series, "ms (median)", f"IPOT, {args.iteration} iterations")
    print(f"wrote {os.path.relpath(path)} and {os.path.relpath(png)}")
    return 0


def goal_lines(rows: list[dict], device: torch.device) -> list[str]:
    """The issue's goals at B=256, 60×100, as measured in this run."""
    at_goal = {r["backend"]: r for r in rows if (r["B"], r["text"], r["regions"]) == GOAL}
    lines = []
    if "cpp" in at_goal:
        cpp = at_goal["cpp"]
        lines.append(f"goal C++ >= 15x eager at B=256 60x100: {cpp['x_eager']:.1f}x ({cpp['ms']:.2f} ms)")
        if "reference+compile" in at_goal:
            ratio = at_goal["reference+compile"]["ms"] / cpp["ms"]
            lines.append(f"goal C++ >= 5x torch.compile at B=256 60x100: {ratio:.1f}x")
    if "triton" in at_goal:
        tri = at_goal["triton"]
        lines.append(f"goal Triton >= 100x eager at B=256: {tri['x_eager']:.1f}x ({tri['ms'] * 1e3:.1f} us)")
        lines.append(f"goal Triton within 3x of the floor: {tri['x_floor']:.2f}x of {tri['floor_ms'] * 1e3:.1f} us")
    return lines


if __name__ == "__main__":
    sys.exit(main())
