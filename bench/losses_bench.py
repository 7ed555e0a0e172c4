"""Benchmark of the fused masked-position losses (MLM, MRFR, MRC, MRC-kl): fast backend vs reference.

Times forward + backward (gradients for hidden, weight and bias) and measures peak memory at UNITER shapes
(M masked rows, H = 768 / 1024; V = 28996, 2048, 1601), prints a table and writes losses_<device>.json,
losses_<device>.png (time) and losses_memory_<device>.png to output/bench/ (bench/results/ with
``--refresh-results``). On CUDA the fast
backend is Triton and peak memory comes from the CUDA allocator; on CPU it is the chunked PyTorch path and peak
memory is the process's resident high-water mark over the call (VmHWM after resetting it, with glibc's malloc
returning large blocks to the OS).

    python bench/losses_bench.py          # CUDA: M 1000/4000/8000 x H 768/1024, bf16 + fp32; CPU: M 1000, H 768, fp32
    python bench/losses_bench.py --full   # the CUDA grid on a CPU too (about 40 minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
from typing import Callable, Optional

import torch
from harness import (
    add_output_arguments,
    device_name,
    output_dir,
    plot_grouped_bars,
    print_table,
    proc_status,
    time_fn,
    write_json,
)
from harness import peak_memory as cuda_peak_memory
from tqdm import tqdm

import uniter_fast.losses as losses

CLASSES = {"mlm": 28996, "mrfr": 2048, "mrc": 1601, "mrckl": 1601}
FUNCTIONS = {"mlm": losses.mlm_loss, "mrfr": losses.mrfr_loss, "mrc": losses.mrc_loss, "mrckl": losses.mrc_kl_loss}


def cpu_peak_memory(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident bytes above the start during one call of ``fn`` (Linux; None where the counters are missing)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as f:
            f.write("5")  # resets VmHWM to the current RSS
        base = proc_status("VmRSS")
    except OSError:
        return None
    fn()
    return max(0, proc_status("VmHWM") - base)


def return_freed_memory_to_os() -> None:
    """Make glibc serve every block ≥ 64 KiB by mmap and trim freed heap, so RSS follows live allocations."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also disables the dynamic threshold)
    libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


def make_inputs(task: str, rows: int, hidden: int, dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    """hidden [M,H], weight ([C,H] or [H,C] for MRFR), bias [C] (these three require grad) and the task's target."""
    classes = CLASSES[task]
    shape = (hidden, classes) if task == "mrfr" else (classes, hidden)
    leaves = [
        torch.randn(rows, hidden, device=device),
        torch.randn(shape, device=device) * hidden**-0.5,
        torch.randn(classes, device=device) * 0.1,
    ]
    leaves = [t.to(dtype).requires_grad_() for t in leaves]
    if task == "mlm":
        target = torch.randint(0, classes, (rows,), device=device)
    elif task == "mrfr":
        target = torch.randn(rows, classes, device=device)
    else:
        target = torch.randn(rows, classes, device=device).softmax(-1)
    return [*leaves, target]


def step(task: str, inputs: list[torch.Tensor], backend: str) -> Callable[[], None]:
    """One forward + backward of ``task``'s loss with ``backend``; gradients are dropped afterwards."""

    def run() -> None:
        FUNCTIONS[task](*inputs, backend=backend).backward()
        for t in inputs[:3]:
            t.grad = None

    return run


def floor(task: str, rows: int, hidden: int, itemsize: int) -> tuple[float, float]:
    """(FLOPs, bytes) no implementation can avoid: three GEMMs 2·M·H·C each; read inputs, write the gradients."""
    classes = CLASSES[task]
    flops = 3 * 2.0 * rows * hidden * classes
    target_bytes = rows * 8 if task == "mlm" else rows * classes * 4
    moved = 2 * (rows * hidden + hidden * classes + classes) * itemsize + target_bytes
    return flops, float(moved)


def measure(task: str, rows: int, hidden: int, dtype: torch.dtype, device: torch.device, args) -> dict:
    """One table row: times, peaks, speedup and memory ratio of the fast backend against the reference."""
    inputs = make_inputs(task, rows, hidden, dtype, device)
    row = {"loss": task, "M": rows, "H": hidden, "C": CLASSES[task], "dtype": str(dtype).replace("torch.", "")}
    backends = ("reference", "fast")
    times: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(args.rounds):  # alternate the backends so drifting machine load hits both alike
        for backend in backends:
            fn = step(task, inputs, backend)
            times[backend].append(time_fn(fn, device, warmup=args.warmup, repeats=args.repeats))
    for backend in backends:
        row[f"{backend}_ms"] = 1e3 * statistics.median(times[backend])
        fn = step(task, inputs, backend)
        peak = cuda_peak_memory(fn, device) if device.type == "cuda" else cpu_peak_memory(fn)
        row[f"{backend}_peak_mb"] = None if peak is None else peak / 2**20
    flops, moved = floor(task, rows, hidden, inputs[0].element_size())
    row["speedup"] = row["reference_ms"] / row["fast_ms"]
    if row["fast_peak_mb"] is not None and row["reference_peak_mb"]:
        row["mem_ratio"] = row["fast_peak_mb"] / row["reference_peak_mb"]
    row["floor_gflop"] = flops / 1e9
    row["floor_mb"] = moved / 2**20
    row["fast_tflops"] = flops / (row["fast_ms"] * 1e-3) / 1e12
    return row


def main(argv: Optional[list[str]] = None) -> None:
    """Parse arguments, run every (loss, M, H, dtype) case, print the table and write JSON + PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="default 1000 4000 8000 (CPU: 1000)")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, help="default 768 1024 (CPU: 768)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--warmup", type=int, default=None, help="default 3 on CUDA, 1 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 10 on CUDA, 2 on CPU (3 with --full)")
    parser.add_argument("--rounds", type=int, default=None, help="alternations of the backends; default 1 CUDA, 2 CPU")
    parser.add_argument("--full", action="store_true", help="on a CPU: the whole CUDA grid of M and H")
    parser.add_argument("--name", default="losses", help="result file prefix")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    out = output_dir(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    grid = cuda or args.full
    args.rows = args.rows or ([1000, 4000, 8000] if grid else [1000])
    args.hidden = args.hidden or ([768, 1024] if grid else [768])
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    args.repeats = args.repeats if args.repeats is not None else (10 if cuda else 3 if args.full else 2)
    args.rounds = args.rounds if args.rounds is not None else (1 if cuda else 3 if args.full else 2)
    dtypes = args.dtypes or (["bfloat16", "float32"] if cuda else ["float32"])
    if not cuda:
        return_freed_memory_to_os()
    print(f"device: {device_name(device)}; fast backend: {losses.resolve_backend('fast', device)}", file=sys.stderr)
    cases = [(t, m, h, d) for d in dtypes for t in args.losses for h in args.hidden for m in args.rows]
    rows = [measure(t, m, h, getattr(torch, d), device, args) for t, m, h, d in tqdm(cases, desc="loss cases")]
    columns = ["loss", "M", "H", "C", "dtype", "reference_ms", "fast_ms", "speedup"]
    columns += ["reference_peak_mb", "fast_peak_mb", "mem_ratio", "floor_gflop", "floor_mb", "fast_tflops"]
    print_table(rows, columns)
    meta = {
        "fast_backend": losses.resolve_backend("fast", device),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "timing": "median over rounds of the median wall time of forward+backward (grads of hidden, weight, bias)",
        "memory": "CUDA max_memory_allocated above start" if cuda else "VmHWM above VmRSS at start (process RSS)",
    }
    print("json:", write_json(args.name, device, rows, meta, out))
    labels = [f"{r['loss']} M{r['M']} H{r['H']} {r['dtype']}" for r in rows]
    print(
        "plot:",
        plot_grouped_bars(
            args.name,
            device,
            labels,
            {"reference ms": [r["reference_ms"] for r in rows], "fast ms": [r["fast_ms"] for r in rows]},
            ylabel="forward+backward time (ms)",
            title="fused masked-position losses vs reference",
            directory=out,
        ),
    )
    if all(r["fast_peak_mb"] is not None for r in rows):
        peaks = {f"{b} peak MiB": [r[f"{b}_peak_mb"] for r in rows] for b in ("reference", "fast")}
        title = "peak memory of the fused losses vs reference"
        name = f"{args.name}_memory"
        print("plot:", plot_grouped_bars(name, device, labels, peaks, "peak memory (MiB)", title, directory=out))


if __name__ == "__main__":
    main()
