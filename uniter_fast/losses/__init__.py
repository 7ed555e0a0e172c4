"""Masked-position pretraining losses of UNITER: MLM, MRFR, MRC and MRC-kl (the original ``model/pretrain.py``).

Each function takes the masked rows AFTER the head's small transform (Linear → GELU → LayerNorm, which stays in
PyTorch: it is a fraction of the cost and autograd handles it well) and applies the final projection + loss.

What the fast backends fuse, and why: the final projection (H → V=28996 for MLM, 1601 for MRC/MRC-kl, 2048 for
MRFR) and its loss are computed chunk of rows by chunk of rows, and the gradients w.r.t. ``hidden``, ``weight`` and
``bias`` are produced in the same pass (Liger-Kernel's fused-linear-cross-entropy design). The full [M, C] logits,
their log-softmax and their gradient never exist at once, which for MLM (M up to 8000 rows × 28996 classes) is
gigabytes; backward only scales the stored gradients by the incoming gradient and the mean's 1/N. Per chunk the
GEMMs run in cuBLAS/MKL and the row-wise loss + gradient (online softmax, KL, squared error) runs as one kernel that
overwrites the logits buffer with d (row loss) / d logits:

- ``backend="triton"``: the row kernels of :mod:`uniter_fast.kernels.fused_linear_losses` (on CPU tensors they run in
  the Triton interpreter, ``TRITON_INTERPRET=1``; that is for tests, not speed);
- ``backend="chunked"``: the same chunk loop with the row work in PyTorch (the CPU fast path);
- ``backend="fast"``: the fused path for the tensors' device, Triton on CUDA (a ``ValueError`` without Triton),
  chunked elsewhere;
- ``backend="auto"`` (default): Triton on CUDA tensors when Triton imports, else chunked;
- ``backend="reference"``: plain PyTorch, the oracle (:mod:`uniter_fast.losses.reference`).

The choice is :func:`uniter_fast.backends.resolve`'s (component ``"losses"``).

All four return a 0-dim float32 tensor. Zero masked rows give 0.0 with zero (finite) gradients. Targets
(``labels``, ``targets``, ``soft_labels``) get no gradient on the fused paths. ``weights`` [M] float32 (1 for a real
row, 0 for a padding row of a fixed-shape batch, ``uniter_fast.data.buckets``) make the mean one over the real rows
(:func:`weighted_mean`), on every backend, without a host sync.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from uniter_fast import backends
from uniter_fast.losses import reference
from uniter_fast.losses.checks import check_labels, check_projection, check_targets, check_weights
from uniter_fast.losses.reference import cross_entropy_mean, weighted_mean

__all__ = ["cross_entropy_mean", "mlm_loss", "mrc_kl_loss", "mrc_loss", "mrfr_loss", "resolve_backend", "weighted_mean"]


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete path ("reference", "chunked" or "triton") that ``backend`` selects for tensors on ``device``
    (:func:`uniter_fast.backends.resolve` of component ``"losses"``)."""
    return backends.resolve("losses", backend, device)


def _loss(
    kind: str,
    reference_loss: Callable[..., torch.Tensor],
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    target: torch.Tensor,
    backend: str,
    weights: Optional[torch.Tensor],
    transposed: bool = False,
    fused_target: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """One loss of hidden [M, H] (0-dim float32) on the path ``backend`` selects: ``reference_loss(hidden, weight,
    bias, target, weights)`` on the reference path or for zero rows, else the fused chunk loop with the row op
    ``kind`` ("ce", "kl", "mse") on ``fused_target(target)`` (default ``target``); checks ``weights`` [M] first.

    The projection runs in hidden's dtype, or in the autocast dtype inside ``torch.autocast`` (as ``F.linear``
    would); the casts sit outside the autograd Function so gradients come back in each input's own dtype.
    """
    check_weights(weights, hidden.shape[0], hidden.device)
    path = resolve_backend(backend, hidden.device)
    if path == "reference" or hidden.shape[0] == 0:
        return reference_loss(hidden, weight, bias, target, weights)
    from uniter_fast.losses.fused_linear import fused_linear_loss

    if path == "triton":
        from uniter_fast.losses.triton_ops import ROW_OPS
    else:
        from uniter_fast.losses.chunked import ROW_OPS
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    hidden, weight, bias = (t.to(dtype) for t in (hidden, weight, bias))
    target = target if fused_target is None else fused_target(target)
    return fused_linear_loss(hidden, weight, bias, target, ROW_OPS[kind], transposed, weights=weights)


def mlm_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    backend: str = "auto",
    check_values: bool = True,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MLM: mean CE over the M masked tokens of ``hidden [M,H] @ weight[V,H]ᵀ + bias [V]`` vs ``labels`` [M] int64.

    ``weight`` is the tied word-embedding matrix. ``check_values`` checks that every label lies in [0, V) (one host
    sync on a GPU; turn it off where the labels were checked on the host). Returns a 0-dim float32 tensor.
    """
    classes = check_projection(hidden, weight, bias, transposed=False)
    check_labels(labels, hidden.shape[0], classes, hidden.device, check_values)
    return _loss("ce", reference.mlm_loss, hidden, weight, bias, labels, backend, weights)


def mrfr_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    targets: torch.Tensor,
    *,
    backend: str = "auto",
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MRFR: mean over M×2048 of squared error of ``hidden [M,H] @ weight [H,2048] + bias [2048]`` vs ``targets``.

    ``weight`` is ``img_linear.weight`` (used transposed, as the original's tied regression head); ``targets`` is
    [M, 2048] float. Returns a 0-dim float32 tensor.
    """
    classes = check_projection(hidden, weight, bias, transposed=True)
    check_targets("targets", targets, hidden.shape[0], classes, hidden.device)
    return _loss("mse", reference.mrfr_loss, hidden, weight, bias, targets, backend, weights, transposed=True)


def mrc_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    soft_labels: torch.Tensor,
    *,
    backend: str = "auto",
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MRC: mean CE of ``hidden [M,H] @ weight [1601,H]ᵀ + bias`` vs ``argmax(soft_labels[:, 1:]) + 1``.

    ``soft_labels`` is [M, 1601] float (detector class probabilities). Returns a 0-dim float32 tensor.
    """
    classes = check_projection(hidden, weight, bias, transposed=False)
    check_targets("soft_labels", soft_labels, hidden.shape[0], classes, hidden.device)
    return _loss(
        "ce",
        reference.mrc_loss,
        hidden,
        weight,
        bias,
        soft_labels,
        backend,
        weights,
        fused_target=reference.mrc_targets,
    )


def mrc_kl_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    soft_labels: torch.Tensor,
    *,
    backend: str = "auto",
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MRC-kl: mean over M×1601 of ``kl_div(log_softmax(hidden @ weightᵀ + bias), soft_labels)``.

    hidden [M,H], weight [1601,H], bias [1601], soft_labels [M,1601] float. Returns a 0-dim float32 tensor.
    """
    classes = check_projection(hidden, weight, bias, transposed=False)
    check_targets("soft_labels", soft_labels, hidden.shape[0], classes, hidden.device)
    return _loss("kl", reference.mrc_kl_loss, hidden, weight, bias, soft_labels, backend, weights)
