"""The GPU proof in one command: correctness, host syncs and speed of every fast path, each goal met or not.

    python bench/gpu_suite.py --out DIR                  # on a CUDA GPU: the whole suite (≈ 5 minutes on an H100)
    python bench/gpu_suite.py --device cpu --quick       # the same code paths on a CPU (Triton interpreted), ≤ 3 min
    python bench/gpu_suite.py --parts correctness ipot   # some parts only

Parts (each runs in its own process under its own time cap, so a slow, failing or crashing part is reported and the
rest still runs; a part that times out keeps what it finished):

    correctness  every Triton kernel compiled natively against its reference path (values, gradients, poisoned
                 outputs), the packed encoder under each varlen backend against the eager padded encoder, one training
                 step of every task on the fast path against the reference path (bench/checks.py)
    syncs        host syncs of one training micro-step per task on the fast path (torch.cuda.set_sync_debug_mode)
    ipot         IPOT and WRA speed: the goal shape B=256 60x100, a B/shape sweep, the floor, OT's share of an ITM step
    losses       fused losses vs reference: time and peak memory
    encoder      padded vs packed encoder, base and large: valid tokens/s and MFU
    pretrain     one optimizer step per task, original vs reference vs fast path: tokens/s, padding bound
    villa        VILLA's adversarial fine-tuning step (K = 3) vs a plain step, original vs reference vs fast, VQA;
                 the adversarial pretraining step of every objective (fast path, with and without the shared pass)
    capture      the captured step (CUDA graphs on fixed-shape batches) vs the eager fast step: tokens/s, memory,
                 and the captured losses and gradients against the eager step's on the same batches
    deepspeed    a short DeepSpeed ZeRO-2 bf16 run of the bundled default (uniter_fast/pretrain.py)
    extract      the BUTD region-feature extractor: images/s against its floor, CPU vs device agreement
    retrieval    exact retrieval scoring (UNITER-base, COCO-shaped pairs): the device-resident gallery vs the task
                 collate vs the cross-encoder alone, pairs/s

Each part writes <part>.json (rows, goals, environment) and <part>.png to DIR (default output/bench/gpu_suite_<device>
for a real run, bench/results/gpu_suite_<device> with --refresh-results, which refreshes the committed figures; a
temporary folder for --quick). The last lines printed are one table with each goal, the target, the
figure and met / not met. Timing uses CUDA events after warm-up, medians of repeats (bench/harness.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: part -> (time cap in seconds on CUDA, cap with --quick on a CPU)
CAPS = {
    "correctness": (240, 75),
    "syncs": (60, 25),
    "encoder": (120, 25),  # + the fused-layer rows and their Triton compiles
    "pretrain": (120, 40),
    "villa": (120, 40),
    "capture": (180, 60),  # pretraining, then the fine-tuning heads
    "ipot": (100, 40),
    "losses": (90, 20),
    "deepspeed": (150, 75),
    "extract": (90, 45),
    "retrieval": (60, 30),
}
PARTS = tuple(CAPS)


# ------------------------------------------------------------------------------------------------------------ parent
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (``--part`` is internal: the parent runs each part as ``--part NAME`` in a child)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: output/bench/gpu_suite_<device>)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes and repeats (the CPU dry run)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--budget", type=float, default=None, help="total seconds (default: 480 CUDA, 240 quick)")
    parser.add_argument(
        "--cap-scale", type=float, default=1.0, help="multiply every part's time cap and the budget (a busy machine)"
    )
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    from harness import add_output_arguments

    add_output_arguments(parser)
    return parser.parse_args(argv)


def default_out(args: argparse.Namespace) -> str:
    """<output dir>/gpu_suite_<device slug> for a real run (output/bench, or bench/results with --refresh-results); a
    fresh temporary folder for --quick."""
    if args.quick:
        return tempfile.mkdtemp(prefix="gpu_suite_quick_")
    import torch
    from harness import device_slug, output_dir

    return os.path.join(output_dir(args), f"gpu_suite_{device_slug(torch.device(args.device))}")


def run_parts(args: argparse.Namespace) -> int:
    """Run each part in a child process under its cap, then print and write the summary; 0 if every part ran and
    every correctness check passed (speed goals not met do not fail the command: they are findings)."""
    quick = args.quick
    budget = (args.budget or (240.0 if quick else 480.0)) * args.cap_scale
    start = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"  # read when kernels are decorated: set before the child imports them
    if args.device == "cpu" and quick:
        # The dry run's models are tiny: one thread is as fast, and on a busy 2-core machine two OpenMP threads per
        # process made small ops 8x slower (spinning threads competing with other processes).
        env.setdefault("OMP_NUM_THREADS", "1")
    statuses = []
    for part in args.parts:
        remaining = budget - (time.monotonic() - start)
        cap = min(CAPS[part][1 if quick else 0] * args.cap_scale, max(remaining, 10.0))
        print(f"\n=== {part} (cap {cap:.0f} s) ===", flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", args.out, "--device", args.device]
        cmd += ["--quick"] if quick else []
        began = time.monotonic()
        code = run_capped(cmd, env, cap)
        seconds = time.monotonic() - began
        result = read_result(args.out, part)
        if code is None:
            status = f"timed out after {cap:.0f} s"
        elif code != 0 or result is None:
            status = f"crashed (exit code {code})" if result is None else result.get("status", f"exit code {code}")
        else:
            status = result.get("status", "ok")
        statuses.append({"part": part, "status": status, "seconds": round(seconds, 1)})
        if result is not None and code is None:
            result["status"] = status
            write_result(args.out, part, result)
    summary = summarise(args.out, statuses, time.monotonic() - start)
    print_summary(summary)
    return 0 if summary["ok"] else 1


def run_capped(cmd: list[str], env: dict[str, str], cap: float) -> Optional[int]:
    """Run ``cmd`` for at most ``cap`` seconds; its exit code, or None when it ran out of time. A child out of time
    gets SIGTERM first (it exits through its ``finally`` blocks, so e.g. a half-done JIT build releases its lock
    file, which a SIGKILL would leave behind for every later build to wait on), SIGKILL 20 s later."""
    child = subprocess.Popen(cmd, env=env, cwd=ROOT)
    try:
        return child.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        return None


def read_result(out: str, part: str) -> Optional[dict[str, Any]]:
    """The JSON a part wrote (possibly partial), or None."""
    path = os.path.join(out, f"{part}.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_result(out: str, part: str, result: dict[str, Any]) -> str:
    """Write a part's result JSON atomically; returns the path."""
    from uniter_fast.files import write_json_atomic

    path = os.path.join(out, f"{part}.json")
    write_json_atomic(path, result, indent=2, default=str)
    return path


def summarise(out: str, statuses: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Collect every part's goals into summary.json; ``ok`` when every part finished and every check passed."""
    goals, env = [], None
    for entry in statuses:
        result = read_result(out, entry["part"]) or {}
        env = env or result.get("environment")
        for goal in result.get("goals", []):
            goals.append({"part": entry["part"], **goal})
        if entry["status"] != "ok":
            goals.append({"part": entry["part"], "goal": "part finished", "target": "ok", "figure": entry["status"]})
            goals[-1]["met"] = False
    failed_checks = [g for g in goals if g.get("kind") == "correctness" and not g["met"]]
    finished = all(s["status"] == "ok" for s in statuses)
    summary = {
        "environment": env,
        "parts": statuses,
        "goals": goals,
        "seconds": round(seconds, 1),
        "ok": finished and not failed_checks,
    }
    write_result(out, "summary", summary)
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """The closing table: environment line, per-part status and time, then every goal."""
    from harness import print_table

    env = summary.get("environment") or {}
    keys = ("device", "driver_version", "torch", "cuda", "triton", "python", "clocks.sm", "clocks.max.sm", "clocks.mem")
    print("\n" + "; ".join(f"{k} {env[k]}" for k in keys if env.get(k) is not None))
    print_table(summary["parts"], ["part", "status", "seconds"])
    verdict = {True: "met", False: "NOT MET", None: "dry run"}
    rows = [{**g, "met": verdict[g["met"]]} for g in summary["goals"]]
    print()
    print_table(rows, ["part", "goal", "target", "figure", "met"])
    print(f"\nsuite {'passed' if summary['ok'] else 'FAILED'} in {summary['seconds']:.0f} s")


# ------------------------------------------------------------------------------------------------------------- child
def run_child(args: argparse.Namespace) -> int:
    """Run one part in this process; its result (rows, goals, status) goes to <out>/<part>.json."""
    import torch
    from harness import environment

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # out of time: unwind (finally blocks run), then exit
    device = torch.device(args.device)
    torch.manual_seed(0)
    result: dict[str, Any] = {"part": args.part, "status": "running", "environment": environment(device)}

    def save(**fields: Any) -> None:
        result.update(fields)
        write_result(args.out, args.part, result)

    save()
    began = time.monotonic()
    try:
        PART_FUNCTIONS[args.part](device, args.quick, args.out, save)
        result["status"] = "ok"
        if args.quick:  # a dry run measures small shapes on a CPU: its speed figures say nothing of the goals
            for entry in result.get("goals", []):
                if entry["kind"] == "speed":
                    entry["met"] = None
    except Exception as err:  # report and go on: the parent runs the other parts
        traceback.print_exc()
        result["status"] = f"failed: {type(err).__name__}: {str(err)[:300]}"
    save(seconds=round(time.monotonic() - began, 1))
    return 0 if result["status"] == "ok" else 1


def goal(goal: str, target: str, figure: str, met: bool, kind: str = "speed") -> dict[str, Any]:
    """One line of the summary table (``met`` becomes None, "dry run", for speed goals of a --quick run)."""
    return {"goal": goal, "target": target, "figure": figure, "met": bool(met), "kind": kind}


def part_correctness(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """Every check of bench/checks.py; rows saved after each check, so a timeout keeps the finished ones."""
    import dataclasses

    from checks import CHECKS
    from plots import plot_errors

    rows: list[dict[str, Any]] = []
    goals = []
    for name, check in CHECKS.items():
        began = time.monotonic()
        try:
            found = [dataclasses.asdict(r) for r in check(device, quick)]
        except Exception as err:
            traceback.print_exc()
            found = [{"check": name, "case": "-", "dtype": "-", "quantity": "raised", "error": float("inf")}]
            found[0].update(tol=0.0, passed=False, note=f"{type(err).__name__}: {str(err)[:300]}")
        rows += found
        compared = [r for r in found if r["quantity"] != "skipped"]
        failed = [r for r in compared if not r["passed"]]
        worst = max((r["error"] / r["tol"] for r in compared if r["tol"]), default=0.0)
        figure = f"{len(compared) - len(failed)}/{len(compared)} passed, worst error/tol {worst:.2g}"
        skips = [r["note"] for r in found if r["quantity"] == "skipped"]
        if skips:
            figure += f"; skipped: {'; '.join(sorted(set(skips)))}"
        goals.append(goal(f"{name} matches reference", "all pass", figure, not failed, kind="correctness"))
        print(f"{name}: {figure} ({time.monotonic() - began:.1f} s)", flush=True)
        for r in failed:
            print(f"  FAILED {r['case']} {r['dtype']} {r['quantity']}: {r['error']:.3g} > {r['tol']:.3g} {r['note']}")
        save(rows=rows, goals=goals)
    save(png=plot_errors(rows, os.path.join(out, "correctness.png"), device))


def part_syncs(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """Host syncs of one fast-path training micro-step (forward + backward) per task, counted by
    ``uniter_fast.pretraining.syncs.count_step_syncs`` (CUDA: set_sync_debug_mode; CPU: its emulation, an upper
    bound)."""
    import collections
    import os

    import torch
    from harness import plot_grouped_bars

    from uniter_fast.pretraining.syncs import count_step_syncs

    rows = []
    for task in ("mlm", "mrfr", "mrc", "mrckl", "itm"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        count, calls = count_step_syncs(task, device, fast=True, dtype=dtype)
        where = collections.Counter(os.path.relpath(c, ROOT) if os.path.isabs(c.split(":")[0]) else c for c in calls)
        rows.append({"task": task, "syncs": count, "where": dict(where.most_common())})
        print(f"{task}: {count} host syncs " + ", ".join(f"{k} x{v}" for k, v in where.most_common()), flush=True)
    how = "set_sync_debug_mode" if device.type == "cuda" else "CPU emulation (upper bound)"
    figure = ", ".join(f"{r['task']} {r['syncs']}" for r in rows) + f" ({how})"
    goals = [
        goal("host syncs per fast training micro-step", "0 (drive towards)", figure, all(r["syncs"] == 0 for r in rows))
    ]
    labels, series = [r["task"] for r in rows], {"host syncs": [r["syncs"] for r in rows]}
    title = f"host syncs per fast-path micro-step (forward + backward), {how}"
    plot_grouped_bars("syncs", device, labels, series, "syncs per micro-step", title, log_scale=False, directory=out)
    save(rows=rows, goals=goals)


def part_ipot(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """IPOT speed: peaks and floor, the goal shape, the sweep, and OT's share of an ITM step."""
    from speed import ipot_speed

    rows, goals, meta = ipot_speed(device, quick, out)
    save(rows=rows, goals=goals, meta=meta)


def part_losses(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """Fused losses: time and peak memory against the reference."""
    from speed import losses_speed

    rows, goals = losses_speed(device, quick, out)
    save(rows=rows, goals=goals)


def part_encoder(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """Encoder tokens/s and MFU, padded vs packed, base and large."""
    from speed import encoder_speed

    rows, goals = encoder_speed(device, quick, out)
    save(rows=rows, goals=goals)


def part_pretrain(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """Pretraining step tokens/s per task, original vs reference vs fast."""
    from speed import pretrain_speed

    rows, goals = pretrain_speed(device, quick, out)
    save(rows=rows, goals=goals)


def part_villa(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """VILLA's adversarial fine-tuning step against a plain step, three paths; the APT step per objective."""
    from speed import villa_aft_speed

    rows, goals = villa_aft_speed(device, quick, out)
    save(rows=rows, goals=goals)


def part_capture(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """The captured step (CUDA graphs on fixed-shape batches) vs the eager fast step: tokens/s, memory, equality."""
    from speed import capture_heads_speed, capture_speed

    rows, goals, meta = capture_speed(device, quick, out)
    save(rows=rows, goals=goals, meta=meta)  # kept if the heads below run past the part's cap
    head_rows, head_goals, head_meta = capture_heads_speed(device, quick)
    save(rows=rows + head_rows, goals=goals + head_goals, meta={**meta, **head_meta})


def part_deepspeed(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """A short DeepSpeed ZeRO-2 bf16 run of the bundled default."""
    from speed import deepspeed_run

    rows, goals = deepspeed_run(device, quick, out)
    save(rows=rows, goals=goals)


def part_extract(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """The BUTD extractor: throughput and agreement (random ResNet-101 weights)."""
    from speed import extract_speed

    rows, goals, meta = extract_speed(device, quick, out)
    save(rows=rows, goals=goals, meta=meta)


def part_retrieval(device: Any, quick: bool, out: str, save: Callable[..., None]) -> None:
    """Exact retrieval scoring: gallery vs task collate vs the cross-encoder alone."""
    from speed import retrieval_speed

    rows, goals = retrieval_speed(device, quick, out)
    save(rows=rows, goals=goals)


PART_FUNCTIONS: dict[str, Callable[..., None]] = {
    "correctness": part_correctness,
    "syncs": part_syncs,
    "ipot": part_ipot,
    "losses": part_losses,
    "encoder": part_encoder,
    "pretrain": part_pretrain,
    "villa": part_villa,
    "capture": part_capture,
    "deepspeed": part_deepspeed,
    "extract": part_extract,
    "retrieval": part_retrieval,
}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: the parent (all parts) or a child (``--part``)."""
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.part:
        return run_child(args)
    args.out = os.path.abspath(args.out or default_out(args))
    print(f"gpu_suite: device {args.device}{' (quick)' if args.quick else ''}, parts {args.parts}, out {args.out}")
    return run_parts(args)


if __name__ == "__main__":
    sys.exit(main())
