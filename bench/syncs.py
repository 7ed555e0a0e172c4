"""Host syncs of one training step per pretraining task on the fast path, counted by
``torch.cuda.set_sync_debug_mode("warn")``: every operation that makes the host wait for the GPU (``.item()``,
``.tolist()``, ``nonzero``, boolean-mask indexing, a data-dependent output size...) emits one warning, recorded here
with the file and line of the Python code that asked for it."""

from __future__ import annotations

import collections
import os
import warnings
from typing import Any

import torch
from batches import PRETRAIN_TASKS, task_batch

from uniter_fast.config import UniterConfig
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.pretraining.optim import param_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def count_step_syncs(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Per task: host syncs of one fast-path step (zero_grad, forward, backward, fused AdamW step) after two warm-up
    steps, and where they come from ({"file:line": count}). The model is built as the trainer builds it (dropout on,
    default input checks). On a CPU there is no device to wait for: rows carry ``syncs`` None and a note."""
    if device.type != "cuda":
        note = "host syncs are counted with torch.cuda.set_sync_debug_mode, which needs a CUDA device"
        return [{"task": task, "syncs": None, "where": {}, "note": note} for task in PRETRAIN_TASKS]
    config = UniterConfig.preset("tiny" if quick else "base")
    model = UniterForPretraining(config, fast=True).to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-5, fused=True)
    rows = []
    for i, task in enumerate(PRETRAIN_TASKS):
        batch = task_batch(task, 8 if quick else 32, config.vocab_size, 200 + i, device)

        def step(task: str = task, batch: dict = batch) -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(batch, task)["loss"]
            loss.backward()
            optimizer.step()

        step()
        step()
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        where = collections.Counter(f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}" for w in syncs)
        rows.append({"task": task, "syncs": len(syncs), "where": dict(where.most_common()), "note": ""})
        print(f"{task}: {len(syncs)} host syncs per step " + ", ".join(f"{k} x{v}" for k, v in where.most_common()))
    return rows
