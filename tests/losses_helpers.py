"""Shared pieces of the loss tests: ragged masked batches, the original heads as oracle, error metrics, poisoning."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import uniter_fast.losses as losses

LOSSES = {
    "mlm": losses.mlm_loss,
    "mrfr": losses.mrfr_loss,
    "mrc": losses.mrc_loss,
    "mrckl": losses.mrc_kl_loss,
}
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@dataclass
class Case:
    """A ragged batch's encoder output [B, L, H], its mask of masked positions [B, L], and the head's projection."""

    seq_out: torch.Tensor
    mask: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    target: torch.Tensor

    def leaves(self) -> list[torch.Tensor]:
        """The tensors gradients are checked for."""
        return [self.seq_out, self.weight, self.bias]


def soft_labels(rows: int, classes: int, zeros: bool = True) -> torch.Tensor:
    """Random probability rows [rows, classes] (float32); with ``zeros`` about half the entries are exactly 0."""
    logits = torch.randn(rows, classes) * 2
    if zeros:
        logits = logits.masked_fill(torch.rand(rows, classes) < 0.5, float("-inf"))
        logits[:, 1] = torch.randn(rows)  # at least one finite entry per row
    return logits.softmax(-1)


def make_case(task: str, lengths: list[int], masked: int, hidden: int, classes: int, dtype: torch.dtype) -> Case:
    """Random inputs for ``task`` with ragged ``lengths`` and ``masked`` masked positions spread over the batch."""
    batch, longest = len(lengths), max(lengths)
    seq_out = torch.randn(batch, longest, hidden)
    valid = torch.arange(longest)[None] < torch.tensor(lengths)[:, None]
    flat = valid.flatten().nonzero().squeeze(1)
    mask = torch.zeros(batch * longest, dtype=torch.bool)
    mask[flat[torch.randperm(flat.numel())[:masked]]] = True
    mask = mask.view(batch, longest)
    rows = int(mask.sum())
    shape = (hidden, classes) if task == "mrfr" else (classes, hidden)
    weight = torch.randn(shape) * hidden**-0.5
    bias = torch.randn(classes) * 0.1
    if task == "mlm":
        target = torch.randint(0, classes, (rows,))
    elif task == "mrfr":
        target = torch.randn(rows, classes)
    else:
        target = soft_labels(rows, classes)
    seq_out, weight, bias = (t.to(dtype).requires_grad_() for t in (seq_out, weight, bias))
    return Case(seq_out, mask, weight, bias, target)


def original_head_loss(task: str, case: Case) -> torch.Tensor:
    """The original UNITER computation in float32: gather masked rows, F.linear, F.cross_entropy/mse_loss/kl_div."""
    hidden = case.seq_out.float()[case.mask]
    weight, bias = case.weight.float(), case.bias.float()
    if task == "mlm":
        return F.cross_entropy(F.linear(hidden, weight, bias), case.target, reduction="none").mean()
    if task == "mrfr":
        return F.mse_loss(F.linear(hidden, weight.t(), bias), case.target, reduction="none").mean()
    logits = F.linear(hidden, weight, bias)
    if task == "mrc":
        target = case.target[:, 1:].max(dim=-1)[1] + 1
        return F.cross_entropy(logits, target, ignore_index=0, reduction="none").mean()
    return F.kl_div(F.log_softmax(logits, dim=-1), case.target, reduction="none").mean()


def run_loss(task: str, case: Case, backend: str) -> torch.Tensor:
    """The library loss of ``task`` on the case's gathered masked rows with ``backend``."""
    hidden = case.seq_out[case.mask]
    return LOSSES[task](hidden, case.weight, case.bias, case.target, backend=backend)


def loss_and_grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """[loss, d loss / d leaf for each leaf], all as float32."""
    return [loss.detach().float()] + [g.float() for g in torch.autograd.grad(loss, leaves)]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error ‖got − want‖ / ‖want‖ (NaN anywhere gives inf)."""
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))


def poison_empty(monkeypatch) -> None:
    """Make torch.empty / torch.empty_like return NaN-filled float tensors, so unwritten outputs show up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(factory):
        def make(*args, **kwargs):
            out = factory(*args, **kwargs)
            if out.is_floating_point():
                out.fill_(float("nan"))
            return out

        return make

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))
