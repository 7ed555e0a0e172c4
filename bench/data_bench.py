"""Data-loader throughput per task on the bundled corpus: the original UNITER loader vs this project's, and where the
time of the fast path goes.

    python bench/data_bench.py              # <= 3 min on 2 CPU cores
    python bench/data_bench.py --full       # more batches and repeats, a second (small) batch size, 1-2 workers,
                                            # and 8x task batches

Paths, each timed on the same token-bucket batches (``--batch-tokens`` per batch, the original's 10240 by default),
in one process with one torch thread (= the work of one DataLoader worker), interleaved, median over ``--repeats``
after one warm-up, CPU time (user + system, so page faults count) and wall time:

- ``original``: the original UNITER read -> mask -> collate (``bench/original_loader.py``), the reference column;
- ``reference``: this project's reference path (``dataset.reference_batch``: per-example items, numpy fp16 -> fp32,
  today's collates building both layouts);
- ``fast padded`` / ``fast packed``: ``dataset.batch(..., layout=...)``, region features in float32;
- ``fast packed fp16``: the same with the features as stored (float16), what training on the fast path builds (the
  device casts them). The fast batches equal the reference ones (tests/test_data_collate.py).

Stages of the fast path (µs per pair, CPU time): ``read`` (LMDB get of the text and image records, in place),
``decompress`` (lz4 of the text record), ``decode`` (msgpack of the text record, locating the image arrays),
``records`` (the three plus checks: ``dataset[i]``), ``mask``, ``features fp16`` / ``features fp32`` (the stored
features copied / converted into a new batch tensor, page faults of the fresh memory included), ``collate packed
fp16`` / ``collate packed`` / ``collate padded`` (features included), and on CUDA ``pin`` + ``to device``
(non-blocking copy, synchronised). The floor is the stored bytes read plus the bytes of the fp16 packed batch
written, per pair, at the memory bandwidth measured here (one large copy). ``--workers N`` adds the pairs/s of the
fast path through a DataLoader with N worker processes. Writes data_bench_<device>.json and .png (throughput) and
data_bench_stages_<device>.png to output/bench/ (bench/results/ with ``--refresh-results``).

Task collates: every downstream task (and each VCR second-stage pretraining task) collates the rows of its first
``--batches`` training batches of its tiny config (``finetune.py --task X``, bundled sets; ``--task-scale`` times
the config's batch size), read once: ``reference`` (``uniter_fast.data.reference.reference_rows``: the original
collates' padding, then ``pack_batch``) vs ``fast`` (``uniter_fast.data.collate.collate_rows``), both layouts, the
same batches, interleaved, median CPU time over ``--repeats`` after one warm-up; µs per row (one text-image
sequence) and the speed-up. Writes data_bench_tasks_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

import lz4.frame
import msgpack
import numpy as np
import torch
from batches import task_datasets
from harness import (
    add_output_arguments,
    batch_bytes,
    device_name,
    device_slug,
    output_dir,
    plot_grouped_bars,
    print_table,
    synchronize,
    write_json,
)
from original_loader import OriginalLoader

from uniter_fast.data import (
    DetectFeatLmdb,
    ItmDataset,
    MlmDataset,
    MrcDataset,
    MrfrDataset,
    TaskLoader,
    TokenBucketSampler,
    TxtTokLmdb,
    default_corpus,
    draw,
    move_to_device,
)
from uniter_fast.data.assemble import fill_rows
from uniter_fast.data.collate import collate, collate_rows
from uniter_fast.data.datasets import batch_generator
from uniter_fast.data.record_views import array_views
from uniter_fast.data.reference import reference_rows
from uniter_fast.files import atomic_write
from uniter_fast.tasks import TASKS as DOWNSTREAM

TASKS = {"mlm": MlmDataset, "mrfr": MrfrDataset, "mrckl": MrcDataset, "itm": ItmDataset}
PATHS = ("original", "reference", "fast padded", "fast packed", "fast packed fp16")
TASK_PATHS = {"reference": reference_rows, "fast": collate_rows}


def clocked(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    cpu, wall = [], []
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return statistics.median(cpu), statistics.median(wall)


def memory_bandwidth() -> float:
    """Bytes per second of one large in-memory copy (read + write counted), median of 5."""
    src = torch.ones(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    _, wall = clocked(lambda: dst.copy_(src), 1, 5)
    return 2 * src.numel() * 4 / wall


def path_functions(task: str, dataset: Any, original: OriginalLoader) -> dict[str, Callable[[list[int], int], Any]]:
    """One batch builder per column of the table: (indices, position) -> batch."""
    return {
        "original": lambda idx, pos: original.batch(idx),
        "reference": lambda idx, pos: dataset.reference_batch(idx, pos),
        "fast padded": lambda idx, pos: dataset.batch(idx, pos, layout="padded"),
        "fast packed": lambda idx, pos: dataset.batch(idx, pos, layout="packed"),
        "fast packed fp16": lambda idx, pos: dataset.batch(idx, pos, feat_dtype=torch.float16),
    }


def stage_functions(task: str, dataset: Any, indices: list[int], device: torch.device) -> dict[str, Callable]:
    """The stages of the fast packed path on one batch, each runnable on its own (inputs prepared once)."""
    txt, img = dataset.txt_db, dataset.img_db
    ids = [dataset.ids[i] for i in indices]
    fnames = [dataset.image_of(i) for i in indices]
    raw_txt = [bytes(txt.db.view(i)) for i in ids]
    raw_img = [img.db.view(f) for f in fnames]
    plain = [lz4.frame.decompress(r) for r in raw_txt]
    records = [dataset[i] for i in indices]
    draws = draw(task, records, batch_generator(0, 0, 0, 0), dataset.token_ids, dataset.mask_prob)
    counts = np.array([r.features.shape[0] for r in records])
    starts, rows = np.cumsum(counts) - counts, int(counts.sum())
    stages = {
        "read": lambda: [(txt.db.view(i), img.db.view(f)) for i, f in zip(ids, fnames)],
        "decompress": lambda: [lz4.frame.decompress(r) for r in raw_txt],
        "decode": lambda: [(msgpack.unpackb(t), array_views(i, dataset.fields)) for t, i in zip(plain, raw_img)],
        "records": lambda: [dataset[i] for i in indices],
        "mask": lambda: draw(task, records, batch_generator(0, 0, 0, 1), dataset.token_ids, dataset.mask_prob),
        "features fp16": lambda: fill_rows([r.features for r in records], starts, rows, dtype=torch.float16),
        "features fp32": lambda: fill_rows([r.features for r in records], starts, rows),
        "collate packed fp16": lambda: collate(task, records, draws, dataset.token_ids, "packed", torch.float16),
        "collate packed": lambda: collate(task, records, draws, dataset.token_ids, "packed"),
        "collate padded": lambda: collate(task, records, draws, dataset.token_ids, "padded"),
    }
    if device.type == "cuda":  # what the DataLoader's pin thread and the trainer's move do
        batch = collate(task, records, draws, dataset.token_ids, "packed", torch.float16)
        pinned = _pin(batch)
        stages["pin"] = lambda: _pin(batch)

        def to_device() -> None:
            move_to_device(pinned, device)
            synchronize(device)

        stages["to device"] = to_device
    return stages


def _pin(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: _pin(v) for k, v in batch.items()}
    return batch


def stored_bytes(dataset: Any) -> float:
    """Mean stored bytes per pair of the image fields the task reads (fp16)."""
    widths = {"features": 2048, "norm_bb": 6, "soft_labels": 1601}
    per_region = 2 * sum(widths[f] for f in dataset.fields)
    return float(np.mean(dataset.lens - dataset.txt_lens)) * per_region


def workers_rate(dataset: Any, budget: int, workers: int, n_batches: int) -> float:
    """Pairs/s of the fast path (packed, fp16 features) through a TaskLoader with ``workers`` processes (after its
    first batch)."""
    stream = iter(TaskLoader(dataset, budget, seed=0, num_workers=workers, feat_dtype=torch.float16))
    next(stream)
    start, pairs = time.perf_counter(), 0
    for _ in range(n_batches):
        pairs += next(stream)["txt_lens"].numel()
    return pairs / (time.perf_counter() - start)


def measure(
    task: str,
    txt: TxtTokLmdb,
    img: DetectFeatLmdb,
    batch_tokens: int,
    n_batches: int,
    repeats: int,
    workers: int,
    device: torch.device,
    bandwidth: float,
) -> dict[str, Any]:
    """One table row: pairs/s of every path, the fast path's stages and floor, for ``task``."""
    dataset = TASKS[task](txt, img)
    batches = TokenBucketSampler(dataset.lens, batch_size=batch_tokens, droplast=True).batches(0)[:n_batches]
    pairs = sum(len(b) for b in batches)
    builders = path_functions(task, dataset, OriginalLoader(task, dataset))
    cpu: dict[str, list[float]] = {p: [] for p in PATHS}
    wall: dict[str, list[float]] = {p: [] for p in PATHS}

    def run(build: Callable[[list[int], int], Any]) -> None:
        for position, indices in enumerate(batches):  # one batch alive at a time, as in a training loop
            build(indices, position)

    for repeat in range(repeats + 1):  # interleaved: every path once per repeat; repeat 0 is the warm-up
        for name in PATHS:
            c, w = clocked(lambda b=builders[name]: run(b), 0, 1)
            if repeat:
                cpu[name].append(c)
                wall[name].append(w)
    row: dict[str, Any] = {"task": task, "pairs/batch": pairs / len(batches)}
    for name in PATHS:
        row[f"{name} pairs/s"] = pairs / statistics.median(cpu[name])
        row[f"{name} pairs/s (wall)"] = pairs / statistics.median(wall[name])
    row["fast/original"] = row["fast packed fp16 pairs/s"] / row["original pairs/s"]
    row["fast fp32/original"] = row["fast packed pairs/s"] / row["original pairs/s"]
    row["fast/reference"] = row["fast packed fp16 pairs/s"] / row["reference pairs/s"]
    for name, fn in stage_functions(task, dataset, batches[0], device).items():
        cpu_s, wall_s = clocked(fn, 1, repeats)
        row[f"{name} µs/pair"] = (wall_s if name == "to device" else cpu_s) / len(batches[0]) * 1e6
    written = batch_bytes(dataset.batch(batches[0], 0, feat_dtype=torch.float16)) / len(batches[0])
    row["stored KB/pair"] = stored_bytes(dataset) / 1e3
    row["batch KB/pair"] = written / 1e3
    row["floor µs/pair"] = (stored_bytes(dataset) + written) / bandwidth * 1e6
    if workers:
        row[f"fast {workers} workers pairs/s (wall)"] = workers_rate(dataset, batch_tokens, workers, n_batches)
    return row


def task_batches(name: str, n_batches: int, scale: int) -> list[tuple[str, str, list[list[dict[str, Any]]]]]:
    """(label, batch task name, the rows of each batch) of the first ``n_batches`` training batches of every training
    dataset of downstream task ``name`` (``scale`` x its tiny config's batch size)."""
    cfg, datasets = task_datasets(name)
    out = []
    for split, dataset in datasets.items():
        if split.startswith("train"):
            sampler = TokenBucketSampler(dataset.lens, batch_size=scale * cfg.train_batch_size, droplast=True)
            items = [[dataset[i] for i in indices] for indices in sampler.batches(0)[:n_batches]]
            rows = [[r for it in batch for r in it.get("rows", [it])] for batch in items]
            out.append((name + split[len("train") :], dataset.task, rows))
    return out


def time_task_collates(task: str, batches: list[list[dict[str, Any]]], repeats: int) -> dict[str, float]:
    """{path: median CPU seconds} of collating every batch of rows by each of :data:`TASK_PATHS`, interleaved (every
    path once per repeat), after one warm-up repeat."""
    cpu: dict[str, list[float]] = {p: [] for p in TASK_PATHS}
    for repeat in range(repeats + 1):
        for path, fn in TASK_PATHS.items():
            c, _ = clocked(lambda f=fn: [f(rows, task) for rows in batches], 0, 1)
            if repeat:
                cpu[path].append(c)
    return {path: statistics.median(times) for path, times in cpu.items()}


def measure_task_collates(names: list[str], n_batches: int, repeats: int, scales: list[int]) -> list[dict[str, Any]]:
    """One table row per (scale, training dataset): µs per row of the reference and the fast task collate."""
    table = []
    for scale in scales:
        for name in names:
            for label, task, batches in task_batches(name, n_batches, scale):
                seconds = time_task_collates(task, batches, repeats)
                n_rows = sum(len(rows) for rows in batches)
                row: dict[str, Any] = {"batch scale": scale, "task": label, "rows/batch": n_rows / len(batches)}
                row.update({f"{path} µs/row": seconds[path] / n_rows * 1e6 for path in TASK_PATHS})
                row["fast/reference"] = seconds["reference"] / seconds["fast"]
                table.append(row)
    return table


def workers_needed(step_pairs_per_s: float, worker_pairs_per_s: float) -> int:
    """Loader processes a GPU needs to keep up: the pairs/s its training step consumes over one worker's pairs/s."""
    return max(1, int(np.ceil(step_pairs_per_s / worker_pairs_per_s)))


def main() -> None:
    """Run the benchmark and write the table, JSON and plots."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-tokens", type=int, nargs="+", default=None, help="token budget(s) per batch")
    ap.add_argument("--batches", type=int, default=None, help="batches per timed repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="also time the fast path through N DataLoader workers")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for the to-device stage")
    ap.add_argument(
        "--finetune-tasks", nargs="+", default=sorted(DOWNSTREAM), choices=sorted(DOWNSTREAM), help="task collates"
    )
    ap.add_argument("--task-scale", type=int, nargs="+", default=None, help="x the tiny configs' batch sizes")
    ap.add_argument("--full", action="store_true", help="more batches/repeats, a small batch size too, 2 workers")
    add_output_arguments(ap)
    args = ap.parse_args()
    out = output_dir(args)
    budgets = args.batch_tokens or ([10240, 1024] if args.full else [10240])
    n_batches = args.batches or (6 if args.full else 2)
    repeats = args.repeats or (7 if args.full else 5)
    workers = args.workers if args.workers is not None else (2 if args.full else 0)
    scales = args.task_scale or ([1, 8] if args.full else [1])
    torch.set_num_threads(1)  # as in a DataLoader worker
    device = torch.device(args.device)
    paths = default_corpus()
    txt, img = TxtTokLmdb(paths.txt_db), DetectFeatLmdb(paths.img_db)
    bandwidth = memory_bandwidth()
    rows = []
    for budget in budgets:
        for task in args.tasks:
            row = measure(task, txt, img, budget, n_batches, repeats, workers, device, bandwidth)
            rows.append({"batch tokens": budget, **row})
    load = os.getloadavg()[0]
    print(
        f"device: {device_name(torch.device('cpu'))}, {os.cpu_count()} logical CPUs, load average {load:.2f}; "
        f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; corpus {paths.root}"
    )
    main_cols = [
        "batch tokens",
        "task",
        "pairs/batch",
        *(f"{p} pairs/s" for p in PATHS),
        "fast/original",
        "fast fp32/original",
        "fast/reference",
    ]
    print_table(rows, main_cols)
    stage_cols = [
        "batch tokens",
        "task",
        *(k for k in rows[0] if k.endswith("µs/pair")),
        "stored KB/pair",
        "batch KB/pair",
    ]
    print_table(rows, stage_cols)
    if workers:
        print_table(rows, ["batch tokens", "task", f"fast {workers} workers pairs/s (wall)"])
    meta = {
        "argv": sys.argv[1:],
        "batch_tokens": budgets,
        "batches_per_repeat": n_batches,
        "repeats": repeats,
        "workers": workers,
        "clock": "pairs/s from CPU time (user + system) of one process with one torch thread; '(wall)' from wall time",
        "cpu_count": os.cpu_count(),
        "load_average_1min": load,
        "memory_bandwidth_GBps": bandwidth / 1e9,
        "corpus": paths.root,
    }
    cpu = torch.device("cpu")
    print("wrote", write_json("data_bench", cpu, rows, meta, out))
    first = [r for r in rows if r["batch tokens"] == budgets[0]]
    groups = [r["task"] for r in first]
    series = {p: [r[f"{p} pairs/s"] for r in first] for p in PATHS}
    title = f"Loader throughput, one process, bundled corpus, {budgets[0]}-token batches"
    print("wrote", plot_grouped_bars("data_bench", cpu, groups, series, "pairs / s (CPU time)", title, directory=out))
    print("wrote", plot_stages(first, cpu, budgets[0], out))
    task_table = measure_task_collates(args.finetune_tasks, n_batches, repeats, scales)
    print_table(task_table, list(task_table[0]))
    print("wrote", write_json("data_bench_tasks", cpu, task_table, {**meta, "task_scales": scales}, out))
    first = [r for r in task_table if r["batch scale"] == scales[0]]
    series = {p: [r[f"{p} µs/row"] for r in first] for p in TASK_PATHS}
    title = f"Task collates (both layouts), one process, tiny-config batches x{scales[0]}"
    tasks = [r["task"] for r in first]
    print("wrote", plot_grouped_bars("data_bench_tasks", cpu, tasks, series, "µs per row", title, directory=out))


def plot_stages(rows: list[dict[str, Any]], device: torch.device, budget: int, directory: str) -> str:
    """Stacked bars of the fast path's time per pair by stage, per task, with the bytes floor marked; saved as
    <directory>/data_bench_stages_<device>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = {
        "LMDB read": lambda r: r["read µs/pair"],
        "lz4": lambda r: r["decompress µs/pair"],
        "decode": lambda r: r["decode µs/pair"],
        "record checks": lambda r: max(
            0.0, r["records µs/pair"] - r["read µs/pair"] - r["decompress µs/pair"] - r["decode µs/pair"]
        ),
        "mask": lambda r: r["mask µs/pair"],
        "collate (packed, fp16)": lambda r: r["collate packed fp16 µs/pair"],
    }
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    tasks = [r["task"] for r in rows]
    left = np.zeros(len(rows))
    for label, part in parts.items():
        widths = np.array([part(r) for r in rows])
        ax.barh(tasks, widths, left=left, label=label)
        left += widths
    ax.scatter([r["floor µs/pair"] for r in rows], tasks, marker="|", s=400, color="black", label="floor (bytes)")
    ax.set_xlabel("µs per pair (CPU time, one thread)")
    ax.invert_yaxis()
    ax.set_title(f"Fast path, where the time goes ({budget}-token batches)\n{device_name(device)}", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4)
    fig.tight_layout()
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"data_bench_stages_{device_slug(device)}.png")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
