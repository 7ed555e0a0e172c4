"""Validation of the pretraining tasks (the original ``validate_*`` of ``pretrain.py``), summed over all ranks.

Per task name: ``mlm`` loss + accuracy over masked tokens; ``mrfr`` loss (mean squared error over M x 2048);
``mrc``/``mrckl`` loss + accuracy (argmax of the prediction == argmax of the soft label, as the original's
``compute_accuracy_for_soft_targets``); ``itm`` loss + accuracy, and the mean OT distance of positive and of
negative pairs (WRA should make the first smaller).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from uniter_fast.model.base import eval_mode
from uniter_fast.pretraining.model import task_kind
from uniter_fast.training.distributed import is_distributed, lockstep

# sums per task kind: names of the accumulated quantities, in a fixed order so that ranks reduce the same vector
SUMS = {
    "mlm": ("loss", "correct", "count"),
    "mrfr": ("loss", "count"),
    "mrc": ("loss", "correct", "count"),
    "mrckl": ("loss", "correct", "count"),
    "itm": ("loss", "correct", "count", "ot_pos", "n_pos", "ot_neg", "n_neg"),
}


def batch_sums(kind: str, out: dict[str, torch.Tensor]) -> dict[str, float]:
    """The quantities one batch adds, from the model's ``compute_loss=False`` outputs."""
    if kind == "mlm":
        scores, labels = out["scores"].float(), out["labels"]
        return {
            "loss": float(F.cross_entropy(scores, labels, reduction="sum")),
            "correct": float((scores.argmax(-1) == labels).sum()),
            "count": float(labels.numel()),
        }
    if kind == "mrfr":
        pred, targets = out["prediction"].float(), out["targets"].float()
        return {"loss": float(F.mse_loss(pred, targets, reduction="sum")), "count": float(targets.numel())}
    if kind in ("mrc", "mrckl"):
        scores, soft = out["scores"].float(), out["soft_labels"].float()
        log_probs = F.log_softmax(scores, dim=-1)
        if kind == "mrckl":
            loss = F.kl_div(log_probs, soft, reduction="sum") / soft.size(-1)
        else:
            loss = F.nll_loss(log_probs, soft[:, 1:].argmax(-1) + 1, reduction="sum")
        return {
            "loss": float(loss),
            "correct": float((scores.argmax(-1) == soft.argmax(-1)).sum()),
            "count": float(soft.size(0)),
        }
    scores, targets = out["scores"].float(), out["targets"]
    sums = {
        "loss": float(F.cross_entropy(scores, targets, reduction="sum")),
        "correct": float((scores.argmax(-1) == targets).sum()),
        "count": float(targets.numel()),
    }
    ot = out.get("ot_dist")
    pos, neg = targets == 1, targets == 0
    sums.update(
        ot_pos=float(ot[pos].sum()) if ot is not None else 0.0,
        n_pos=float(pos.sum()) if ot is not None else 0.0,
        ot_neg=float(ot[neg].sum()) if ot is not None else 0.0,
        n_neg=float(neg.sum()) if ot is not None else 0.0,
    )
    return sums


def metrics_from_sums(kind: str, sums: dict[str, float]) -> dict[str, float]:
    """Means from the summed quantities (NaN where nothing was counted)."""

    def ratio(num: str, den: str) -> float:
        return sums[num] / sums[den] if sums[den] > 0 else float("nan")

    out = {"loss": ratio("loss", "count")}
    if "correct" in sums:
        out["acc"] = ratio("correct", "count")
    if kind == "itm" and sums["n_pos"] + sums["n_neg"] > 0:
        out["ot_pos"] = ratio("ot_pos", "n_pos")
        out["ot_neg"] = ratio("ot_neg", "n_neg")
    return out


@torch.no_grad()
def validate(
    model: Callable[..., dict[str, torch.Tensor]],
    loaders: dict[str, Iterable[dict]],
    to_device: Callable[[dict], dict] = lambda b: b,
) -> dict[str, dict[str, float]]:
    """Evaluate each task of ``loaders`` (task name -> finite iterable of collated batches of this rank).

    ``model`` is a UniterForPretraining or a DeepSpeed engine wrapping one; it is put in eval mode and back. Returns
    ``{task_name: {"loss": ..., "acc": ..., ...}}``, identical on all ranks.
    """
    results = {}
    with eval_mode(model) as module:
        device = next(module.parameters()).device
        for name, loader in loaders.items():
            kind = task_kind(name)
            keys = SUMS[kind]
            totals = dict.fromkeys(keys, 0.0)
            for batch, counts in lockstep(loader, device):
                sums = batch_sums(kind, model(to_device(batch), name, compute_loss=False))
                for key, value in sums.items():
                    totals[key] += value if counts else 0.0
            if is_distributed():
                vector = torch.tensor([totals[k] for k in keys], dtype=torch.float64, device=device)
                dist.all_reduce(vector)
                totals = dict(zip(keys, vector.tolist()))
            results[name] = metrics_from_sums(kind, totals)
    return results
