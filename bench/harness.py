"""Shared benchmark plumbing: timing (median after warm-up), device naming, table printing, JSON + PNG output.

Every benchmark in bench/ uses these so that results are measured and reported the same way. Results go to
``output/bench/`` (untracked) by default; ``bench/results/`` holds the committed figures, which a script writes only
with ``--refresh-results`` (:func:`add_output_arguments`), used by whoever refreshes them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import torch

from uniter_fast.files import atomic_write, write_json_atomic

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(BENCH_DIR, "results")  # the committed figures: written only with --refresh-results
OUTPUT_DIR = os.path.join(os.path.dirname(BENCH_DIR), "output", "bench")  # the default, untracked (output/)
# UNITER-shaped lengths (the original's config/pretrain-*.json: max_txt_len 60, min_bb 10, max_bb 100): text 10-60
# tokens incl. [CLS]/[SEP], 10-100 regions per image.
TXT_RANGE = (10, 60)
IMG_RANGE = (10, 100)
K = TypeVar("K")


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """``--refresh-results``: write into bench/results/ (the committed figures) instead of output/bench/."""
    parser.add_argument(
        "--refresh-results",
        dest="refresh_results",
        action="store_true",
        help="write into bench/results/, over the committed figures (default: output/bench/, untracked)",
    )


def output_dir(args: argparse.Namespace) -> str:
    """Where a script's results go: bench/results/ with ``--refresh-results``, else output/bench/."""
    return RESULTS_DIR if args.refresh_results else OUTPUT_DIR


def device_name(device: torch.device) -> str:
    """A human-readable name of ``device``: the GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A short file-name tag for ``device``: 'cpu', or the GPU name in lower case ('nvidia_h100_80gb_hbm3')."""
    if device.type != "cuda":
        return "cpu"
    return "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name(device).lower()).strip("_")


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def proc_status(key: str) -> int:
    """A byte count of this process from /proc/self/status (``VmRSS``, ``VmHWM``: Linux)."""
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int = 3, repeats: int = 10) -> float:
    """Median time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs.

    On CUDA each run is bracketed by CUDA events (recorded on the current stream, the device idle before the first),
    so the figure is device time from the first queued kernel to the last, host launch gaps included; on CPU it is
    wall time (``time.perf_counter``).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def interleaved_times(
    steps: dict[K, Callable[[], Any]],
    device: torch.device,
    warmup: int,
    repeats: int,
    rounds: Callable[[range], Iterable[int]] = iter,
) -> dict[K, list[float]]:
    """Seconds of each of ``steps`` in each of ``repeats`` rounds (a list of floats per key), the steps run in turn
    (A B A B ...) so that load changes on a shared machine hit every path alike; ``warmup`` rounds first are
    discarded. ``rounds`` wraps the range of rounds (a progress bar)."""
    samples: dict[K, list[float]] = {key: [] for key in steps}
    for round_ in rounds(range(warmup + repeats)):
        for key, step in steps.items():
            seconds = time_fn(step, device, warmup=0, repeats=1)
            if round_ >= warmup:
                samples[key].append(seconds)
    return samples


def batch_bytes(batch: Any) -> int:
    """Bytes of every tensor in a (nested) batch: what it hands the device."""
    if isinstance(batch, torch.Tensor):
        return batch.numel() * batch.element_size()
    if isinstance(batch, dict):
        return sum(batch_bytes(v) for v in batch.values())
    return 0


def mib(size: Optional[int]) -> Optional[float]:
    """``size`` bytes in MiB (None stays None: a peak not measured)."""
    return None if size is None else size / 2**20


def peak_memory(fn: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak allocated bytes during one call of ``fn`` on CUDA; None on CPU (no allocator statistics there)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def run_meta(args: Any, dtype: torch.dtype, **extra: Any) -> dict[str, Any]:
    """The settings every encoder/step benchmark records: dtype, batch size, length ranges, warm-up, repeats, seed,
    threads and the 1-minute load average at the end, plus ``extra``."""
    meta = {
        "dtype": str(dtype),
        "batch_size": args.batch_size,
        "txt_range": TXT_RANGE,
        "img_range": IMG_RANGE,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    meta.update(extra)
    return meta


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Print ``rows`` (dicts) as an aligned text table with the given ``columns``."""

    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def write_json(
    name: str, device: torch.device, rows: Sequence[dict[str, Any]], meta: dict[str, Any], directory: str = OUTPUT_DIR
) -> str:
    """Write ``{device, meta, rows}`` to <directory>/<name>_<device slug>.json atomically (``directory`` defaults to
    output/bench; the committed bench/results only when the caller passes it, see :func:`output_dir`); returns the
    path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}_{device_slug(device)}.json")
    payload = {
        "device": device_name(device),
        "torch": torch.__version__,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "meta": meta,
        "rows": list(rows),
    }
    write_json_atomic(path, payload, indent=2)
    return path


def plot_grouped_bars(
    name: str,
    device: torch.device,
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    ylabel: str,
    title: str,
    log_scale: bool = True,
    directory: str = OUTPUT_DIR,
) -> str:
    """A grouped bar chart (one group per shape, one bar per series) saved as <directory>/<name>_<slug>.png
    (``directory`` defaults to output/bench, as :func:`write_json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}_{device_slug(device)}.png")
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) / 2), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log_scale:
        ax.set_yscale("log")
    ax.set_title(f"{title}\n{device_name(device)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def environment(device: torch.device) -> dict[str, Any]:
    """What produced a figure: device name, torch / Triton / CUDA / Python versions, and on CUDA the driver, SM count,
    memory and clocks as ``nvidia-smi`` reports them (None where a tool is missing)."""
    info: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type != "cuda":
        return info
    props = torch.cuda.get_device_properties(device)
    info.update(
        cuda=torch.version.cuda,
        capability=f"{props.major}.{props.minor}",
        sm_count=props.multi_processor_count,
        memory_gib=round(props.total_memory / 2**30, 1),
    )
    fields = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem,power.draw,power.limit,temperature.gpu"
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader", f"--id={device.index or 0}"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.strip()
        info.update(dict(zip(fields.split(","), (v.strip() for v in out.split(",")))))
    except (OSError, subprocess.SubprocessError):
        info["driver_version"] = None
    return info
