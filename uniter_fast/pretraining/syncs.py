"""The host syncs of one pretraining micro-step (forward + backward of ``UniterForPretraining``) on a real batch of
the bundled corpus, counted by :class:`uniter_fast.syncs.SyncCounter`; ``tests/test_syncs.py`` holds it to the budget
of docs/pretraining.md ("Host syncs"), ``bench/gpu_suite.py`` calls it with ``device="cuda"``."""

from __future__ import annotations

from typing import Optional

import torch

from uniter_fast.config import UniterConfig
from uniter_fast.data import default_corpus, move_to_device
from uniter_fast.pretraining.data import bundled_batches
from uniter_fast.pretraining.model import UniterForPretraining, task_kind
from uniter_fast.syncs import SyncCounter


def count_step_syncs(
    task: str,
    device: torch.device | str = "cpu",
    fast: bool = True,
    dtype: Optional[torch.dtype] = None,
    batch_tokens: int = 2048,
) -> tuple[int, list[str]]:
    """Host syncs of one training micro-step (forward + backward of ``UniterForPretraining``) on ``task``.

    The model is the tiny config (its sizes do not change the count) on ``device`` in ``dtype`` (default fp32; pass
    bf16 to count the production GPU path), ``fast`` picks the fast (packed batch) or the reference (padded batch)
    path; the batch is the first one of the bundled corpus's ``task`` loader (``batch_tokens`` per batch, built as
    training builds it), moved to the device. One uncounted step runs first (first-call set-up). Returns (count,
    what was counted). The trainer's loss logging and the optimizer step are not included (docs/pretraining.md,
    "Host syncs").
    """
    device = torch.device(device)
    (cpu_batch,) = bundled_batches(task_kind(task), batch_tokens, 1, layout="packed" if fast else "padded")
    config = UniterConfig.tiny(vocab_size=default_corpus().vocab_size)
    model = UniterForPretraining(config, fast=fast).to(device=device, dtype=dtype or torch.float32).train()

    batch = move_to_device(cpu_batch, device)  # the loader's copies, not counted
    model(batch, task)["loss"].backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with SyncCounter(device) as counter:
        model(batch, task)["loss"].backward()
    return counter.count, counter.calls
