"""Pictures of the GPU suite's results that have no bar chart in bench/harness.py: check errors against tolerances,
and training-loss curves."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from harness import device_name

from uniter_fast.files import atomic_write


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str) -> str:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return path


def plot_errors(rows: Sequence[dict[str, Any]], path: str, device: torch.device) -> str:
    """One horizontal bar per compared quantity: error / tolerance on a log scale (≤ 1 passes), green when passed,
    red when not; skipped rows are left out. Saved to ``path``; returns it."""
    plt = _pyplot()
    shown = [r for r in rows if r["quantity"] != "skipped"]
    ratios = [max(r["error"] / r["tol"], 1e-6) if r["tol"] and math.isfinite(r["error"]) else 1e3 for r in shown]
    labels = [f"{r['check']}: {r['case']} {r['dtype']} {r['quantity']}" for r in shown]
    fig, ax = plt.subplots(figsize=(10, max(3.0, 0.17 * len(shown) + 1.2)))
    ax.barh(range(len(shown)), ratios, color=["tab:green" if r["passed"] else "tab:red" for r in shown])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(range(len(shown)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("relative error / tolerance (≤ 1 passes)")
    failed = sum(not r["passed"] for r in shown)
    ax.set_title(f"fast paths vs reference: {len(shown) - failed}/{len(shown)} pass\n{device_name(device)}", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path


def plot_curves(curves: dict[str, tuple[list[int], list[float]]], path: str, title: str) -> str:
    """Training loss against step, one line per task (``curves``: task -> (steps, losses)). Returns ``path``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for task, (steps, values) in sorted(curves.items()):
        ax.plot(steps, values, label=task, linewidth=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return path
