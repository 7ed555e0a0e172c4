"""Fit the activation constants of ``uniter_fast.training.budget`` (``A_H``, ``A_I``, ``E_H``, ``E_0``, ``ITM_H``,
``ITM_0``) from measurements: the bytes autograd saves in a pretraining forward (bf16 autocast, the fast path;
``budget.forward_saved_bytes``) on the bundled corpus's token-bucket batches (``batches.corpus_batches``), for the
tiny, base and large widths at 1 and 2 layers and each task kind. Each measurement, less the bf16 weight copies and
the CPU attention's padded q, k, v and scores (counted, not fitted: ``budget.saved_bytes``), divided by the valid
tokens, is regressed on [L*h, L*i, h, 1, itm*h, itm] (least squares). Prints the constants and each row's error of
the module's estimate.

    python bench/budget_calibration.py                 # budget 4096 tokens, CPU (about 10 minutes)
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from batches import corpus_batches

from uniter_fast.config import UniterConfig
from uniter_fast.pretraining.model import UniterForPretraining, pretraining_model_size
from uniter_fast.training import budget

TASKS = ("itm", "mlm", "mrfr", "mrckl")
WIDTHS = {"tiny": {"hidden_size": 128, "intermediate_size": 256, "vocab_size": 128}, "base": {}, "large": {}}


def width_config(preset: str, layers: int) -> UniterConfig:
    """``preset`` (tiny: the bundled config's overrides) with ``layers`` encoder layers."""
    return UniterConfig.from_dict(
        {**UniterConfig.preset(preset).to_dict(), **WIDTHS[preset], "num_hidden_layers": layers}
    )


def measure(preset: str, layers: int, tokens: int, epoch: int = 0) -> list[dict]:
    """One row per task: the measured saved bytes of a forward on the first corpus batch and the estimate."""
    torch.manual_seed(0)
    config = width_config(preset, layers)
    model = UniterForPretraining(config, fast=True)
    model.uniter.check_values = False
    size = pretraining_model_size(config)
    rows = []
    for task in TASKS:
        batch = corpus_batches(task, tokens, 1, epoch)[0]
        valid = int((batch["txt_lens"] + batch["num_bbs"]).sum())
        measured = budget.forward_saved_bytes(model, batch, task)
        padded = budget.padded_shape(batch)
        estimate = budget.saved_bytes(config, task, valid, size, padded)
        rows.append(
            dict(
                preset=preset,
                layers=layers,
                task=task,
                tokens=valid,
                measured=measured,
                estimate=estimate,
                h=config.hidden_size,
                i=config.intermediate_size,
                heads=config.num_attention_heads,
                sequences=padded[0],
                longest=padded[1],
                cast=size.cast_weights[task],
            )
        )
    return rows


def fit(rows: list[dict]) -> dict[str, float]:
    """Least squares of the per-token bytes (measured less the weight copies and the attention) on [L*h, L*i, h, 1,
    itm*h, itm]."""
    x, y = [], []
    for r in rows:
        config = width_config(r["preset"], r["layers"])
        attention = budget.attention_bytes(config, r["tokens"], (r["sequences"], r["longest"]))
        counted = 2 * r["cast"] + r["layers"] * attention
        itm = float(r["task"] == "itm")
        x.append([r["layers"] * r["h"], r["layers"] * r["i"], r["h"], 1.0, itm * r["h"], itm])
        y.append((r["measured"] - counted) / r["tokens"])
    solution = np.linalg.lstsq(np.array(x), np.array(y), rcond=None)[0]
    return dict(zip(("A_H", "A_I", "E_H", "E_0", "ITM_H", "ITM_0"), solution.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="the token budget of the measured batches")
    parser.add_argument("--widths", nargs="+", default=list(WIDTHS), choices=list(WIDTHS))
    parser.add_argument("--out", default=None, help="write the rows and the fit as JSON here")
    args = parser.parse_args()
    rows = [r for preset in args.widths for layers in (1, 2) for r in measure(preset, layers, args.tokens)]
    for r in rows:
        error = r["estimate"] / r["measured"] - 1
        print(
            f"{r['preset']:5s} L={r['layers']} {r['task']:5s} tokens {r['tokens']:5d} measured "
            f"{r['measured'] / 2**20:8.1f} MiB  estimate {r['estimate'] / 2**20:8.1f} MiB  ({error:+.1%})"
        )
    constants = fit(rows)
    print("fitted:", ", ".join(f"{k} = {v:.2f}" for k, v in constants.items()))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"rows": rows, "fit": constants}, f, indent=1)


if __name__ == "__main__":
    main()
