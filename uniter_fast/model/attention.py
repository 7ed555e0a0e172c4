"""Attention cores behind the encoder's backend switch: the padded layout [B, heads, L, head_dim] and the packed
(varlen) layout [T, heads, head_dim].

``eager`` is the reference: the original UNITER/BERT math (scores / sqrt(d) + additive mask, softmax, dropout,
weighted sum). ``sdpa`` gives the same function through ``torch.nn.functional.scaled_dot_product_attention``, which
picks a fused kernel where one exists. Both take the additive mask of the original code, shaped [B, 1, 1, L]
(0 for valid keys, -10000 for padded ones), so they agree to rounding.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """Reference attention. query/key/value: [B, heads, L, d]; additive_mask: [B, 1, 1, L]. Returns [B, heads, L, d]."""
    scores = torch.matmul(query, key.transpose(-1, -2)) / math.sqrt(query.size(-1))
    probs = torch.softmax(scores + additive_mask, dim=-1)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return torch.matmul(probs, value)


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor, dropout_p: float
) -> torch.Tensor:
    """PyTorch SDPA with the same additive mask. Shapes as :func:`eager_attention`."""
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=additive_mask.to(query.dtype), dropout_p=dropout_p
    )


PADDED_ATTENTION: dict[str, Callable[..., torch.Tensor]] = {"eager": eager_attention, "sdpa": sdpa_attention}


def padded_attention(name: str) -> Callable[..., torch.Tensor]:
    """The attention core called ``name`` (one of ``PADDED_ATTENTION``)."""
    if name not in PADDED_ATTENTION:
        raise ValueError(f"attention backend must be one of {sorted(PADDED_ATTENTION)}, got {name!r}")
    return PADDED_ATTENTION[name]


# ---------------------------------------------------------------------------------------------------- varlen (packed)
# The packed layout holds only valid tokens: q/k/v are [T, heads, d] with the sequences of a batch back to back,
# delimited by int32 ``cu_seqlens`` [B+1]. Every backend below computes the same function as ``eager_attention`` on
# the padded view; they differ only in which kernel does it and on which devices/dtypes/dropout they run.

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class VarlenBatch:
    """Sequence boundaries of a packed batch, plus the index tensors the padded-view backends need (built once per
    forward, shared by every layer).

    Attributes:
        cu_seqlens: [B+1] int32 cumulative sequence lengths (cu_seqlens[0] = 0, cu_seqlens[-1] = T).
        max_seqlen: the longest sequence, a Python int.
        backend: the attention backend every layer uses (a key of ``VARLEN_ATTENTION``).
        total: T, the number of packed tokens, when the caller knows it (saves reading cu_seqlens on the host).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    backend: str = "eager"
    total: Optional[int] = None

    def __post_init__(self) -> None:
        if self.cu_seqlens.dim() != 1 or self.cu_seqlens.numel() < 2 or self.cu_seqlens.dtype != torch.int32:
            raise ValueError(
                f"cu_seqlens must be a [B+1] int32 tensor with B >= 1, got shape {tuple(self.cu_seqlens.shape)} "
                f"dtype {self.cu_seqlens.dtype}"
            )
        if self.backend not in VARLEN_ATTENTION:
            raise ValueError(f"attention backend must be one of {sorted(VARLEN_ATTENTION)}, got {self.backend!r}")

    @property
    def batch_size(self) -> int:
        """B, the number of sequences."""
        return self.cu_seqlens.numel() - 1

    @functools.cached_property
    def boundaries(self) -> list[int]:
        """cu_seqlens as a Python list (one device sync, once per forward)."""
        return self.cu_seqlens.tolist()

    @functools.cached_property
    def lengths(self) -> torch.Tensor:
        """[B] int64 sequence lengths."""
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()

    @functools.cached_property
    def token_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Two [T] int64 tensors: the sequence of each packed token and its position within that sequence."""
        total = self.boundaries[-1] if self.total is None else self.total
        starts = self.cu_seqlens[:-1].long()
        seq = torch.repeat_interleave(
            torch.arange(self.batch_size, device=starts.device), self.lengths, output_size=total
        )
        return seq, torch.arange(total, device=starts.device) - starts[seq]

    @functools.cached_property
    def key_mask(self) -> torch.Tensor:
        """[B, 1, 1, S] bool, True for valid keys."""
        positions = torch.arange(self.max_seqlen, device=self.cu_seqlens.device)
        return (positions[None, :] < self.lengths[:, None])[:, None, None, :]

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[T, *rest] -> [B, S, *rest], zeros at padded positions."""
        seq, pos = self.token_coords
        padded = x.new_zeros(self.batch_size, self.max_seqlen, *x.shape[1:])
        return padded.index_put((seq, pos), x)

    def to_packed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, *rest] (any strides) -> [T, *rest], the valid positions only."""
        return x[self.token_coords]


def varlen_eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, dropout_p: float
) -> torch.Tensor:
    """Reference: the padded view through :func:`eager_attention` with the original -10000 additive mask.

    q/k/v: [T, heads, d] (any float dtype). Returns [T, heads, d].
    """
    additive = (~batch.key_mask).to(q.dtype) * -10000.0
    padded = (batch.to_padded(t).transpose(1, 2) for t in (q, k, v))
    return batch.to_packed(eager_attention(*padded, additive, dropout_p).transpose(1, 2))


def varlen_sdpa_loop(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, dropout_p: float
) -> torch.Tensor:
    """SDPA on each sequence in turn (no mask, no padding FLOPs, but a few ops per sequence).

    q/k/v: [T, heads, d]. Returns [T, heads, d].
    """
    bounds = batch.boundaries
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        qi, ki, vi = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p).transpose(0, 1))
    return torch.cat(outs)


def varlen_sdpa_padded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, dropout_p: float
) -> torch.Tensor:
    """SDPA on the padded view with a boolean key-padding mask (CPU default; on CUDA the memory-efficient kernel,
    which supports fp32 and attention dropout). q/k/v: [T, heads, d]. Returns [T, heads, d]."""
    padded = batch.to_padded(torch.stack([q, k, v], dim=1))  # one scatter for all three: [B, S, 3, heads, d]
    query, key, value = padded.permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=batch.key_mask, dropout_p=dropout_p)
    return batch.to_packed(out.transpose(1, 2))


def varlen_sdpa_nested(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, dropout_p: float
) -> torch.Tensor:
    """SDPA on jagged nested tensors (CUDA fp16/bf16: PyTorch's flash varlen kernel, with dropout; CPU: math).

    q/k/v: [T, heads, d]. Returns [T, heads, d].
    """
    offsets = batch.cu_seqlens.long()
    nested = [
        torch.nested.nested_tensor_from_jagged(t, offsets=offsets, max_seqlen=batch.max_seqlen).transpose(1, 2)
        for t in (q, k, v)
    ]
    out = F.scaled_dot_product_attention(*nested, dropout_p=dropout_p)
    return out.transpose(1, 2).values()


def varlen_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, dropout_p: float
) -> torch.Tensor:
    """``torch.nn.attention.varlen.varlen_attn`` (CUDA, fp16/bf16). It has no dropout, so ``dropout_p`` must be 0.

    q/k/v: [T, heads, d]. Returns [T, heads, d].
    """
    if dropout_p != 0.0:
        raise ValueError(
            f"dropout_p must be 0 for the torch_varlen backend (varlen_attn has no dropout), got {dropout_p}"
        )
    from torch.nn.attention.varlen import varlen_attn

    cu, s = batch.cu_seqlens, batch.max_seqlen
    return varlen_attn(q, k, v, cu, cu, s, s)


class _FlashVarlen(torch.autograd.Function):
    """PyTorch's own flash-attention kernels on the varlen layout, dropout included: the ``aten`` forward and backward
    that ``scaled_dot_product_attention`` and ``varlen_attn`` call inside. The forward's philox seed and offset are
    saved, so the backward regenerates the same dropout mask."""

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int, dropout_p: float
    ) -> torch.Tensor:
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p, False, False
        )
        ctx.save_for_backward(q, k, v, out, lse, cu, seed, offset)
        ctx.max_seqlen, ctx.dropout_p = max_seqlen, dropout_p
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        q, k, v, out, lse, cu, seed, offset = ctx.saved_tensors
        s, p = ctx.max_seqlen, ctx.dropout_p
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, s, s, p, False, seed, offset
        )
        return dq, dk, dv, None, None, None


def varlen_flash_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, dropout_p: float
) -> torch.Tensor:
    """PyTorch's flash varlen kernels (CUDA, fp16/bf16, dropout supported; no extra package, no host sync).

    q/k/v: [T, heads, d]. Returns [T, heads, d].
    """
    q, k, v = (t.contiguous() for t in (q, k, v))
    return _FlashVarlen.apply(q, k, v, batch.cu_seqlens, batch.max_seqlen, dropout_p)


def varlen_flash_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: VarlenBatch, dropout_p: float
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, dropout supported). q/k/v: [T, heads, d] ->
    [T, heads, d]."""
    from flash_attn import flash_attn_varlen_func

    cu, s = batch.cu_seqlens, batch.max_seqlen
    return flash_attn_varlen_func(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=s, max_seqlen_k=s, dropout_p=dropout_p
    )


VARLEN_ATTENTION: dict[str, Callable[..., torch.Tensor]] = {
    "eager": varlen_eager,
    "sdpa_loop": varlen_sdpa_loop,
    "sdpa_padded": varlen_sdpa_padded,
    "sdpa_nested": varlen_sdpa_nested,
    "torch_varlen": varlen_torch,
    "flash_torch": varlen_flash_torch,
    "flash_attn": varlen_flash_attn,
}
CUDA_ONLY_BACKENDS = ("torch_varlen", "flash_torch", "flash_attn")


@functools.cache
def flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package can be imported (it only builds against CUDA)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_varlen_backend(device_type: str, dtype: torch.dtype, dropout_p: float, has_flash_attn: bool) -> str:
    """The fastest varlen backend that is exact for these inputs (flash kernels take fp16/bf16 only).

    CUDA: flash-attn for fp16/bf16 when installed; else ``flash_torch`` (PyTorch's own flash varlen kernels, with or
    without dropout) for fp16/bf16, ``sdpa_padded`` (memory-efficient kernel, key-padding mask) for fp32.
    ``sdpa_nested`` is never chosen: on an H200 (bench/results/gpu_suite_nvidia_h200, first run) its training step
    ran at 0.19x the padded encoder, with 3 host syncs per layer. Any other device: ``sdpa_padded`` (measured on a
    2-core CPU: as fast as ``sdpa_loop`` single-threaded, and far less sensitive to a busy machine, as it issues a
    handful of ops per layer instead of a few per sequence).
    """
    if device_type != "cuda":
        return "sdpa_padded"
    half = dtype in HALF_DTYPES
    if half and has_flash_attn:
        return "flash_attn"
    if half:
        return "flash_torch"
    return "sdpa_padded"


def check_varlen_backend(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is ``"auto"`` or a key of ``VARLEN_ATTENTION``."""
    if name != "auto" and name not in VARLEN_ATTENTION:
        raise ValueError(f"attention backend must be 'auto' or one of {sorted(VARLEN_ATTENTION)}, got {name!r}")


_LOGGED_CHOICES: set[tuple[str, str, str]] = set()


def resolve_varlen_backend(requested: str, device: torch.device, dtype: torch.dtype, dropout_p: float) -> str:
    """``requested`` itself, or for ``"auto"`` the :func:`select_varlen_backend` choice; each (device, dtype, backend)
    combination is logged (INFO) the first time it is used."""
    check_varlen_backend(requested)
    if requested in CUDA_ONLY_BACKENDS and device.type != "cuda":
        raise ValueError(f"attention backend {requested!r} needs a CUDA device, got device {device}")
    choice = requested
    if requested == "auto":
        choice = select_varlen_backend(device.type, dtype, dropout_p, flash_attn_available())
    key = (str(device), str(dtype), choice)
    if key not in _LOGGED_CHOICES:
        _LOGGED_CHOICES.add(key)
        how = "selected" if requested == "auto" else "requested"
        logger.info("packed attention on %s/%s (dropout %s): %s backend %r", device, dtype, dropout_p, how, choice)
    return choice
