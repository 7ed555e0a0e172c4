"""The fused WRA distance: cosine cost from the raw embeddings, IPOT, Σ C ⊙ T, and its backward, in one pass each.

Two backends compute exactly the reference path's maths (``optimal_transport_dist(..., backend="reference")``, i.e.
the original ``model/ot.py``): ``cpp`` (``uniter_fast._C.wra_forward``/``wra_backward``, OpenMP, CPU tensors) and
``triton`` (``uniter_fast.kernels.wra``, CUDA, or the CPU under TRITON_INTERPRET=1). Per pair, with valid lengths
mv × nv (pads are a suffix), a = 1 / max(|x|, eps) and a' = 1 / max(|y|, eps):

    C = 1 − diag(a) X Yᵀ diag(a'),  T = IPOT(C) (detached),  dist = Σ C ⊙ T
    ∂dist/∂x_i = −(Σ_j a_i T_ij a'_j y_j − c_i x_i),  c_i = a_i [|x_i| ≥ eps] ρ_i / |x_i|,  ρ_i = Σ_j T_ij (1 − C_ij)

(and symmetrically for y), which is autograd's gradient of ``F.normalize`` + matmul + masked fill + Σ C ⊙ T. The
forward reads the embeddings once and saves only the plan [B, M, N] and two factors per row (the Triton backend the
cost too) for the backward, which reads the embeddings once more and writes the gradients once. Embeddings may be
fp32, bf16 or fp16 (fp32 arithmetic); the distance is fp32 and the gradients come back in the embeddings' dtype.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-5
"""The L2-normalisation eps of UNITER's ``cost_matrix_cosine``."""


class WraRunner(NamedTuple):
    """A fused backend: ``forward(txt, img, txt_lens, img_lens, beta, iteration, k, eps, save) -> (dist, saved)``
    and ``backward(txt, img, txt_lens, img_lens, saved, grad_dist) -> (grad_txt, grad_img)``; ``saved`` is None or
    the backend's tuple of fp32 tensors (the plan and per-row factors; see each backend)."""

    forward: Callable[..., Any]
    backward: Callable[..., Any]


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _numpy(x: torch.Tensor) -> Any:
    """A NumPy view of a CPU tensor sharing its memory (bf16 as int16, which NumPy lacks)."""
    x = x.detach()
    return (x.view(torch.int16) if x.dtype == torch.bfloat16 else x).numpy()


def _unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dimension is contiguous (any batch/row strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _triton_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its rows suit the Triton kernels (16-byte aligned, width and strides divisible by 4), else a
    copy zero-padded to a width divisible by 4 (zeros change no dot product or norm; autograd drops their gradient)."""
    from uniter_fast.kernels.wra import rows_aligned

    if rows_aligned(x):
        return x
    pad = -x.shape[-1] % 4
    return F.pad(x, (0, pad)) if pad else x.clone(memory_format=torch.contiguous_format)


def _cpp_forward(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    beta: float,
    iteration: int,
    k: int,
    eps: float,
    save: bool,
) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
    """Distance [B] fp32 (and the plan and stats when ``save``) by ``uniter_fast._C.wra_forward``."""
    from uniter_fast import _C

    batch, m, _ = txt_emb.shape
    n = img_emb.shape[1]
    dist = torch.empty(batch, dtype=torch.float32)
    saved = (
        (torch.empty(batch, m, n), torch.empty(batch, m, 2), torch.empty(batch, n, 2)) if save else (None, None, None)
    )
    _C.wra_forward(
        _numpy(txt_emb),
        _numpy(img_emb),
        _DTYPE_NAMES[txt_emb.dtype],
        _numpy(txt_lens),
        _numpy(img_lens),
        float(beta),
        int(iteration),
        int(k),
        float(eps),
        dist.numpy(),
        *(None if t is None else t.numpy() for t in saved),
        torch.get_num_threads(),
    )
    return dist, (saved if save else None)


def _cpp_backward(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    grad_dist: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. both embeddings (contiguous, their dtype) by ``uniter_fast._C.wra_backward``."""
    from uniter_fast import _C

    grad_txt = torch.empty(txt_emb.shape, dtype=txt_emb.dtype)
    grad_img = torch.empty(img_emb.shape, dtype=img_emb.dtype)
    _C.wra_backward(
        _numpy(txt_emb),
        _numpy(img_emb),
        _DTYPE_NAMES[txt_emb.dtype],
        _numpy(txt_lens),
        _numpy(img_lens),
        *(t.numpy() for t in saved),
        grad_dist.numpy(),
        _numpy(grad_txt),
        _numpy(grad_img),
        torch.get_num_threads(),
    )
    return grad_txt, grad_img


def _triton_forward(*args: Any) -> tuple[torch.Tensor, Optional[tuple[torch.Tensor, ...]]]:
    from uniter_fast.kernels.wra import wra_forward_triton

    return wra_forward_triton(*args)


def _triton_backward(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from uniter_fast.kernels.wra import wra_backward_triton

    return wra_backward_triton(*args)


WRA_RUNNERS: dict[str, WraRunner] = {
    "cpp": WraRunner(_cpp_forward, _cpp_backward),
    "triton": WraRunner(_triton_forward, _triton_backward),
}


class _FusedWraDistance(torch.autograd.Function):
    """dist [B] = Σ C ⊙ T from the embeddings; backward through the cosine cost with the plan detached."""

    @staticmethod
    def forward(
        ctx: Any,
        txt_emb: torch.Tensor,
        img_emb: torch.Tensor,
        txt_lens: torch.Tensor,
        img_lens: torch.Tensor,
        beta: float,
        iteration: int,
        k: int,
        backend: str,
        save: bool,
    ) -> torch.Tensor:
        dist, saved = WRA_RUNNERS[backend].forward(
            txt_emb, img_emb, txt_lens, img_lens, beta, iteration, k, COSINE_EPS, save
        )
        if save:
            ctx.save_for_backward(txt_emb, img_emb, txt_lens, img_lens, *saved)
        ctx.backend = backend
        return dist

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_dist: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        txt_emb, img_emb, txt_lens, img_lens, *saved = ctx.saved_tensors
        grad = grad_dist.to(torch.float32).contiguous()
        grad_txt, grad_img = WRA_RUNNERS[ctx.backend].backward(txt_emb, img_emb, txt_lens, img_lens, saved, grad)
        return (grad_txt if ctx.needs_input_grad[0] else None, grad_img if ctx.needs_input_grad[1] else None) + (
            None,
        ) * 7


def fused_wra_distance(
    txt_emb: torch.Tensor,
    img_emb: torch.Tensor,
    txt_lens: torch.Tensor,
    img_lens: torch.Tensor,
    beta: float,
    iteration: int,
    k: int,
    backend: str,
) -> torch.Tensor:
    """[B] fp32 WRA distance by the fused ``backend`` ("cpp" or "triton"); inputs validated by the caller.

    txt_emb [B, M, D], img_emb [B, N, D] (fp32/bf16/fp16; unit stride along D, else copied); txt_lens/img_lens [B]
    integer valid lengths (moved to the embeddings' device, non-blocking, if elsewhere).
    """
    if txt_emb.dtype != img_emb.dtype:
        txt_emb, img_emb = txt_emb.float(), img_emb.float()
    prepare = _triton_rows if backend == "triton" else _unit_last_stride
    txt_emb, img_emb = prepare(txt_emb), prepare(img_emb)
    device = txt_emb.device
    txt_lens = txt_lens.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()
    img_lens = img_lens.to(device=device, dtype=torch.int64, non_blocking=True).contiguous()
    save = torch.is_grad_enabled() and (txt_emb.requires_grad or img_emb.requires_grad)
    return _FusedWraDistance.apply(txt_emb, img_emb, txt_lens, img_lens, beta, iteration, k, backend, save)
