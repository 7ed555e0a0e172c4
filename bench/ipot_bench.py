"""OT benchmark: the IPOT plan and the whole WRA distance, every backend available here, against the references.

    python bench/ipot_bench.py                    # the goal points: IPOT and WRA at B=256, 60x100 (WRA: D=768)
    python bench/ipot_bench.py --threads 2        # fix the CPU threads (torch and the C++ kernels)
    python bench/ipot_bench.py --full             # sweeps: IPOT over B x shapes, WRA over B x shapes, fp32 and bf16
    python bench/ipot_bench.py --compile          # also torch.compile of the reference IPOT (minutes on a CPU)
    python bench/ipot_bench.py --goal-only        # the goal points only (no ITM step on CUDA) -> ipot_goal_<device>

IPOT rows time one call computing the plan and the distances from a cost (``uniter_fast.ot.backends`` runners).
WRA rows time ``optimal_transport_dist`` from the embeddings, forward (no grad) and forward + backward, for:
``original`` (the original model/ot.py maths: F.normalize copies, IPOT, trace(C @ T); the anchor of the goals),
``reference`` (this library's reference path), ``cpp`` (fused, CPU) and ``triton`` (fused, CUDA). Pairs are full
length (no padding). Each time is a median of repeats after warm-up (bench/harness.py), the backends taking turns
in every round so that a load change on a shared machine hits all of them alike; the 1-minute load average before
and after is stored (CPU figures on a busy shared machine are only indicative).

Floors, from the peaks measured here (read bandwidth: a large sum; copy bandwidth: a large clone, read + write
counted; fp32 peak: a large matmul, TF32 off): IPOT = launch + max(cost read + plan written at the copy bandwidth,
7 flops per plan entry per iteration at the peak); WRA forward = launch + max(embeddings read once at the read
bandwidth, its flops at the peak); WRA backward = launch + max(embeddings read and gradients written at the copy
bandwidth, its flops at the peak). On CUDA the script also counts the kernel launches of the fused forward and times
an ITM training step of UNITER-base with and without the OT term. Writes ipot[_goal|_full]_<device>.json and .png
(IPOT) and ..._wra_<device>.png (WRA) to output/bench/ (bench/results/ with ``--refresh-results``).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from typing import Callable, Optional

import torch
from harness import add_output_arguments, device_name, output_dir, plot_grouped_bars, print_table, time_fn, write_json
from tqdm import tqdm

from uniter_fast.ot import available_backends, cost_matrix_cosine, optimal_transport_dist
from uniter_fast.ot.backends import RUNNERS, run_reference
from uniter_fast.ot.reference import original_optimal_transport_dist

SWEEP = [(b, m, n) for b in (32, 128, 512) for m, n in ((30, 36), (60, 100), (128, 128))]
WRA_SWEEP = [(b, m, n) for b in (32, 256) for m, n in ((30, 36), (60, 100), (128, 128))]
GOAL = (256, 60, 100)
WRA_DIM = 768
FLOPS_PER_ENTRY_ITER = 7  # Q = A*T (1), column and row weighted sums (2 + 2), T = delta*Q*sigma (2)
WRA_MODES = ("forward", "forward+backward")


def make_problem(batch: int, m: int, n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Full-length cosine cost [B, m, n] fp32 from random 768-d embeddings, no pads, lengths m and n."""
    cost = cost_matrix_cosine(torch.randn(batch, m, 768, device=device), torch.randn(batch, n, 768, device=device))
    txt_pad = torch.zeros(batch, m, dtype=torch.bool, device=device)
    img_pad = torch.zeros(batch, n, dtype=torch.bool, device=device)
    lens = (torch.full((batch,), m, device=device), torch.full((batch,), n, device=device))
    return cost, txt_pad, img_pad, *lens


def measure_peaks(device: torch.device) -> dict[str, float]:
    """Achievable copy bandwidth (bytes/s, read + write counted), read bandwidth (bytes/s, a sum), fp32 matmul rate
    (flop/s) and launch latency (s, 0 on CPU)."""
    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device).uniform_()
    copy_s = time_fn(lambda: x.clone(), device, warmup=2, repeats=5)
    read_s = time_fn(lambda: x.sum(), device, warmup=2, repeats=5)
    size = 4096 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device)
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    mm_s = time_fn(lambda: a @ a, device, warmup=2, repeats=5)
    torch.backends.cuda.matmul.allow_tf32 = allow
    tiny = torch.zeros(1, device=device)
    launch_s = time_fn(lambda: tiny.add_(1), device, warmup=10, repeats=50) if device.type == "cuda" else 0.0
    return {
        "bandwidth": 2 * x.numel() * 4 / copy_s,
        "read_bandwidth": x.numel() * 4 / read_s,
        "flops": 2 * size**3 / mm_s,
        "launch_s": launch_s,
    }


def floor_seconds(batch: int, m: int, n: int, iteration: int, peaks: dict[str, float]) -> float:
    """launch + max(bytes / bandwidth, flops / peak) for one batched IPOT call."""
    entries = batch * m * n
    bytes_moved = 2 * entries * 4 + batch * (4 + 16)
    flops = entries * (FLOPS_PER_ENTRY_ITER * iteration + 2)
    return peaks["launch_s"] + max(bytes_moved / peaks["bandwidth"], flops / peaks["flops"])


def wra_floor_seconds(
    batch: int, m: int, n: int, dim: int, iteration: int, element_bytes: int, backward: bool, peaks: dict[str, float]
) -> float:
    """The WRA floor: forward = launch + max(embeddings read once / read bandwidth, flops / peak); with ``backward``
    plus launch + max(embeddings read + gradients written / copy bandwidth, backward flops / peak)."""
    embedding_bytes = batch * (m + n) * dim * element_bytes
    entries = batch * m * n
    forward_flops = 2 * entries * dim + 2 * batch * (m + n) * dim + entries * (FLOPS_PER_ENTRY_ITER * iteration + 4)
    seconds = peaks["launch_s"] + max(embedding_bytes / peaks["read_bandwidth"], forward_flops / peaks["flops"])
    if backward:
        backward_flops = 4 * entries * dim + 2 * batch * (m + n) * dim
        seconds += peaks["launch_s"] + max(2 * embedding_bytes / peaks["bandwidth"], backward_flops / peaks["flops"])
    return seconds


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
    """name → IPOT runner: the fast backends of this device (interpreted Triton excluded), eager and (optionally)
    compiled reference."""
    runners = {name: RUNNERS[name] for name in available_backends(device) if name != "reference"}
    if device.type != "cuda":
        runners.pop("triton", None)
    runners["reference"] = run_reference
    if compile_reference:
        runners["reference+compile"] = torch.compile(run_reference, dynamic=True)
    return runners


def wra_problem(
    batch: int, m: int, n: int, dim: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Full-length WRA inputs: random embeddings [B, m, dim] / [B, n, dim] of ``dtype``, no pads, CPU lengths (as
    the collate gives them)."""
    return {
        "txt_emb": torch.randn(batch, m, dim, device=device).to(dtype),
        "img_emb": torch.randn(batch, n, dim, device=device).to(dtype),
        "txt_pad": torch.zeros(batch, m, dtype=torch.bool, device=device),
        "img_pad": torch.zeros(batch, n, dtype=torch.bool, device=device),
        "txt_lens": torch.full((batch,), m, dtype=torch.int64),
        "img_lens": torch.full((batch,), n, dtype=torch.int64),
    }


def wra_backends_to_time(device: torch.device) -> dict[str, Callable]:
    """name → ``fn(problem, iteration) -> dist [B]``: the original maths, the reference path and the fused backends
    of this device (interpreted Triton excluded)."""

    def original(p: dict, iteration: int) -> torch.Tensor:
        txt, img = p["txt_emb"].float(), p["img_emb"].float()  # the original runs OT in fp32
        return original_optimal_transport_dist(txt, img, p["txt_pad"], p["img_pad"], iteration=iteration)

    def library(backend: str, p: dict, iteration: int) -> torch.Tensor:
        lengths = {} if backend == "reference" else {"txt_lens": p["txt_lens"], "img_lens": p["img_lens"]}
        args = (p["txt_emb"], p["img_emb"], p["txt_pad"], p["img_pad"])
        return optimal_transport_dist(*args, iteration=iteration, backend=backend, **lengths)

    fns: dict[str, Callable] = {"original": original, "reference": functools.partial(library, "reference")}
    for name in available_backends(device):
        if name != "reference" and (name != "triton" or device.type == "cuda"):
            fns[name] = functools.partial(library, name)
    return fns


def _wra_call(fn: Callable, problem: dict, iteration: int, backward: bool) -> Callable[[], None]:
    """A no-argument call of ``fn``: the forward under no_grad, or forward + backward of Σ dist (fresh grads)."""
    if not backward:

        def forward() -> None:
            with torch.no_grad():
                fn(problem, iteration)

        return forward
    leaves = {k: v.detach().requires_grad_(True) if k.endswith("_emb") else v for k, v in problem.items()}

    def forward_backward() -> None:
        leaves["txt_emb"].grad = leaves["img_emb"].grad = None
        fn(leaves, iteration).sum().backward()

    return forward_backward


def count_launches(call: Callable[[], None], device: torch.device) -> Optional[int]:
    """Number of GPU kernels (not memory copies or sets) one ``call()`` launches (torch.profiler); None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize(device)
    gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(1 for e in gpu if not e.name.startswith(("Memcpy", "Memset")))


def time_wra(
    batch: int,
    m: int,
    n: int,
    dim: int,
    device: torch.device,
    iteration: int = 50,
    repeats: int = 7,
    dtype: torch.dtype = torch.float32,
    peaks: Optional[dict[str, float]] = None,
) -> list[dict]:
    """Rows (one per backend and mode: "forward" without grad, "forward+backward") timing the WRA distance at one
    shape for every backend available on ``device``, with speed-ups over the original maths and the reference path,
    the floor, and on CUDA the kernel launches of each forward."""
    peaks = measure_peaks(device) if peaks is None else peaks
    problem = wra_problem(batch, m, n, dim, device, dtype)
    fns = wra_backends_to_time(device)
    rows = []
    for mode in WRA_MODES:
        backward = mode == "forward+backward"
        calls = {name: _wra_call(fn, problem, iteration, backward) for name, fn in fns.items()}
        times = time_interleaved(calls, device, repeats)
        floor = wra_floor_seconds(batch, m, n, dim, iteration, problem["txt_emb"].element_size(), backward, peaks)
        for name, seconds in times.items():
            rows.append(
                {
                    "B": batch,
                    "text": m,
                    "regions": n,
                    "dim": dim,
                    "dtype": str(dtype).replace("torch.", ""),
                    "mode": mode,
                    "backend": name,
                    "ms": seconds * 1e3,
                    "x_original": times["original"] / seconds,
                    "x_reference": times["reference"] / seconds,
                    "floor_ms": floor * 1e3,
                    "x_floor": seconds / floor,
                    "launches": count_launches(calls[name], device) if not backward else None,
                }
            )
    return rows


def time_ipot(
    shapes: list[tuple[int, int, int]],
    device: torch.device,
    iteration: int,
    repeats: int,
    compile_reference: bool,
    peaks: dict[str, float],
) -> list[dict]:
    """Rows timing the IPOT runners at each (B, text, regions) shape."""
    runners = backends_to_time(device, compile_reference)
    rows = []
    for batch, m, n in tqdm(shapes, desc="IPOT shapes", file=sys.stderr):
        problem = make_problem(batch, m, n, device)
        floor = floor_seconds(batch, m, n, iteration, peaks)
        calls = {name: functools.partial(runner, *problem, 0.5, iteration, 1) for name, runner in runners.items()}
        times = time_interleaved(calls, device, repeats)
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
    return rows


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
    lengths = {"txt_lens": torch.full((batch,), m), "img_lens": torch.full((batch,), n)}

    def step(with_ot: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            seq = model(**batch_in, output_all_encoded_layers=False)
            loss = torch.nn.functional.cross_entropy(itm_head(model.pooler(seq)).float(), targets)
        if with_ot:
            dist = optimal_transport_dist(seq[:, :m], seq[:, m:], txt_pad, img_pad, **lengths)
            loss = loss + 0.1 * (dist[targets == 1].sum() - dist[targets == 0].sum()) / batch
        loss.backward()

    with_ot = time_fn(lambda: step(True), device, warmup=warmup, repeats=repeats)
    without = time_fn(lambda: step(False), device, warmup=warmup, repeats=repeats)
    return {"step_with_ot_s": with_ot, "step_without_ot_s": without, "ot_share": (with_ot - without) / with_ot}


def goal_lines(ipot_rows: list[dict], wra_rows: list[dict], peaks: dict[str, float]) -> list[str]:
    """The goals at B=256, 60×100 (WRA: D=768, fp32), as measured in this run."""
    lines = []
    ipot = {r["backend"]: r for r in ipot_rows if (r["B"], r["text"], r["regions"]) == GOAL}
    if "cpp" in ipot:
        lines.append(f"IPOT goal C++ >= 15x eager: {ipot['cpp']['x_eager']:.1f}x ({ipot['cpp']['ms']:.2f} ms)")
        if "reference+compile" in ipot:
            ratio = ipot["reference+compile"]["ms"] / ipot["cpp"]["ms"]
            lines.append(f"IPOT goal C++ >= 5x torch.compile: {ratio:.1f}x")
    if "triton" in ipot:
        tri = ipot["triton"]
        lines.append(f"IPOT goal Triton >= 100x eager: {tri['x_eager']:.1f}x ({tri['ms'] * 1e3:.1f} us)")
        lines.append(
            f"IPOT goal Triton within 3x of the floor: {tri['x_floor']:.2f}x of {tri['floor_ms'] * 1e3:.1f} us"
        )
    wra = {
        (r["mode"], r["backend"]): r
        for r in wra_rows
        if (r["B"], r["text"], r["regions"], r["dim"], r["dtype"]) == (*GOAL, WRA_DIM, "float32")
    }
    read_gbs = peaks["read_bandwidth"] / 1e9
    for name in ("cpp", "triton"):
        if ("forward", name) not in wra:
            continue
        fwd, both = wra[("forward", name)], wra[("forward+backward", name)]
        lines.append(
            f"WRA goal {name} forward >= 10x the original: {fwd['x_original']:.1f}x "
            f"({fwd['ms']:.2f} ms vs {wra[('forward', 'original')]['ms']:.1f} ms)"
        )
        read_ms = fwd["B"] * (fwd["text"] + fwd["regions"]) * fwd["dim"] * 4 / peaks["read_bandwidth"] * 1e3
        lines.append(
            f"WRA goal {name} forward within 2x of the floor of reading the embeddings once ({read_ms:.2f} ms at "
            f"{read_gbs:.1f} GB/s): {fwd['ms'] / read_ms:.2f}x (roofline floor incl. flops: {fwd['x_floor']:.2f}x of "
            f"{fwd['floor_ms']:.2f} ms)"
        )
        lines.append(
            f"WRA goal {name} forward+backward >= 5x the reference path: {both['x_reference']:.1f}x "
            f"({both['ms']:.2f} ms vs {wra[('forward+backward', 'reference')]['ms']:.1f} ms)"
        )
        if fwd["launches"] is not None:
            lines.append(f"WRA goal {name} forward in one launch: {fwd['launches']} kernel launch(es)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the tables and goals, write JSON + PNGs; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iteration", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch (and C++ kernel) CPU threads")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the reference IPOT")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--full", action="store_true", help="sweep shapes (and bf16 for the WRA)")
    scope.add_argument("--goal-only", action="store_true", help="only the goal points, no ITM step on CUDA")
    add_output_arguments(parser)
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]  # CPU timings on a shared machine are only as good as its load
    peaks = measure_peaks(device)
    ipot_shapes = SWEEP + [GOAL] if args.full else [GOAL]
    if args.full:
        wra_points = [(shape, torch.float32) for shape in WRA_SWEEP] + [(GOAL, torch.bfloat16)]
    else:
        wra_points = [(GOAL, torch.float32)]
    ipot_rows = time_ipot(ipot_shapes, device, args.iteration, args.repeats, args.compile, peaks)
    wra_rows = []
    for (batch, m, n), dtype in tqdm(wra_points, desc="WRA shapes", file=sys.stderr):
        wra_rows += time_wra(batch, m, n, WRA_DIM, device, args.iteration, args.repeats, dtype, peaks)

    print(f"device: {device_name(device)}; iterations {args.iteration}; peaks {peaks}")
    print(f"1-min load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print_table(ipot_rows, ["B", "text", "regions", "backend", "ms", "x_eager", "floor_ms", "x_floor"])
    wra_columns = ["B", "text", "regions", "dim", "dtype", "mode", "backend", "ms", "x_original", "x_reference"]
    print_table(wra_rows, wra_columns + ["floor_ms", "x_floor", "launches"])
    meta = {
        "iteration": args.iteration,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "peaks": peaks,
        "goals": goal_lines(ipot_rows, wra_rows, peaks),
        "load_avg_1min": [load_before, os.getloadavg()[0]],
    }
    if device.type == "cuda" and not args.goal_only:
        meta["itm"] = itm_ot_share(device)
        print(f"ITM step (UNITER-base, B=128, 62+100): {meta['itm']}")
    for line in meta["goals"]:
        print(line)

    name = "ipot_full" if args.full else "ipot_goal" if args.goal_only else "ipot"
    if args.threads is not None:
        name += f"_{args.threads}threads"
    out = output_dir(args)
    rows = [{"section": "ipot", **r} for r in ipot_rows] + [{"section": "wra", **r} for r in wra_rows]
    path = write_json(name, device, rows, meta, out)
    pngs = [
        _plot_ipot(name, device, ipot_rows, ipot_shapes, args.iteration, out),
        _plot_wra(name, device, wra_rows, out),
    ]
    print(f"wrote {os.path.relpath(path)}, " + ", ".join(os.path.relpath(p) for p in pngs))
    return 0


def _plot_ipot(name: str, device: torch.device, rows: list[dict], shapes: list, iteration: int, out: str) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    at = {(r["B"], r["text"], r["regions"], r["backend"]): r["ms"] for r in rows}
    series = {b: [at[(*s, b)] for s in shapes] for b in backends}
    labels = [f"B{b} {m}x{n}" for b, m, n in shapes]
    title = f"IPOT plan, {iteration} iterations"
    return plot_grouped_bars(name, device, labels, series, "ms (median)", title, directory=out)


def _plot_wra(name: str, device: torch.device, rows: list[dict], out: str) -> str:
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    groups = list(dict.fromkeys((r["B"], r["text"], r["regions"], r["dtype"], r["mode"]) for r in rows))
    at = {(r["B"], r["text"], r["regions"], r["dtype"], r["mode"], r["backend"]): r["ms"] for r in rows}
    series = {b: [at[(*g, b)] for g in groups] for b in backends}
    labels = [f"{mode} B{b} {m}x{n} {dtype}" for b, m, n, dtype, mode in groups]
    title = f"WRA distance from {WRA_DIM}-d embeddings"
    return plot_grouped_bars(f"{name}_wra", device, labels, series, "ms (median)", title, directory=out)


if __name__ == "__main__":
    sys.exit(main())
