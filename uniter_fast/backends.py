"""The one backend resolver: every component with a run-time kernel switch, its names, and what ``"auto"`` picks.

One vocabulary for every component (docs/backends.md):

- ``"auto"``: the fastest exact backend for the tensors' device and dtype (and, where it matters, the situation:
  attention dropout, the OT pad layout and pair size), chosen by :func:`choose`;
- ``"reference"``: the original UNITER maths in plain PyTorch (eager attention, the plain losses, the original IPOT
  loop), the oracle every fast path is tested against;
- the component's concrete kernel names (:data:`COMPONENTS`), used as given where they can run, else a
  ``ValueError`` saying why.

:func:`resolve` turns a requested name into a concrete one; the model, the losses and the OT functions ask it on
every call and keep only their tables of kernels. The availability probes (:func:`triton_usable`,
:func:`cpp_available`, :func:`flash_attn_available`, :func:`torch_varlen_available`) have one meaning each and are
cached where the answer cannot change in a process. This module imports nothing from ``model/``, ``losses/`` or
``ot/``; optional packages are imported lazily, only when a probe asks.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import warnings
from typing import Callable, Mapping, Optional, Union

import torch

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)
TRITON_OT_MAX_BLOCK = 128
"""The most rows per side of one pair that the Triton IPOT / WRA kernels hold (``kernels/ipot.py`` tiles it): larger
pairs fall back to the reference (:func:`resolve`)."""
DeviceLike = Union[torch.device, str]


# ------------------------------------------------------------------------------------------------------------- probes
@functools.cache
def triton_importable() -> bool:
    """Whether ``triton`` (and ``triton.language``) import."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        return False
    return True


def triton_usable(device: DeviceLike) -> bool:
    """Whether Triton kernels can run on tensors of ``device``: Triton imports and the device is CUDA, or the CPU under
    ``TRITON_INTERPRET=1`` (the interpreter: for tests, not speed). The variable is read on every call."""
    kind = torch.device(device).type
    if kind == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return kind in ("cuda", "cpu") and triton_importable()


@functools.cache
def cpp_available() -> bool:
    """Whether the compiled extension ``uniter_fast._C`` imports with its OT kernels (IPOT and the fused WRA)."""
    try:
        from uniter_fast import _C
    except ImportError:
        return False
    return hasattr(_C, "ipot_forward") and hasattr(_C, "wra_forward")


@functools.cache
def flash_attn_available() -> bool:
    """Whether the ``flash_attn`` package imports (it only builds against CUDA)."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def torch_varlen_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen.varlen_attn``."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


PROBES: dict[str, tuple[Callable[[torch.device], bool], str]] = {
    "cuda": (lambda device: device.type == "cuda", "needs a CUDA device"),
    "cpu": (lambda device: device.type == "cpu", "runs on CPU tensors only"),
    "triton": (triton_usable, "needs Triton installed, and on CPU tensors TRITON_INTERPRET=1"),
    "cpp": (lambda device: cpp_available(), "needs the C++ extension uniter_fast._C, which is not built"),
    "flash_attn": (lambda device: flash_attn_available(), "needs the flash-attn package, which is not installed"),
    "torch_varlen": (
        lambda device: torch_varlen_available(),
        f"needs torch.nn.attention.varlen, which torch {torch.__version__} lacks",
    ),
}
"""requirement -> (test on a device, why a backend needing it cannot run when the test fails)."""


class LiveProbes:
    """The probes of this machine for one device, as the mapping :func:`choose` reads (evaluated on access only, so
    nothing optional is imported before a rule needs it)."""

    def __init__(self, device: DeviceLike) -> None:
        self.device = torch.device(device)

    def __getitem__(self, requirement: str) -> bool:
        return PROBES[requirement][0](self.device)


# ------------------------------------------------------------------------------------------------------ selection rules
Rule = Callable[[str, torch.dtype, Mapping[str, bool], float], str]


def _auto_attention(device_type: str, dtype: torch.dtype, probes: Mapping[str, bool], dropout_p: float) -> str:
    """Padded attention: ``sdpa`` everywhere (PyTorch picks its fused kernel per device; the same function as the
    eager reference to rounding, 1e-5 in fp32)."""
    return "sdpa"


def _auto_packed_attention(device_type: str, dtype: torch.dtype, probes: Mapping[str, bool], dropout_p: float) -> str:
    """Packed (varlen) attention. CUDA: ``flash_attn`` for fp16/bf16 when installed, else ``flash_torch`` (PyTorch's own
    flash varlen kernels, with or without dropout) for fp16/bf16, ``sdpa_padded`` (memory-efficient kernel, key-padding
    mask) for fp32. ``sdpa_nested`` is never chosen: on an H200 (bench/results/gpu_suite_nvidia_h200, first run) its
    training step ran at 0.19x the padded encoder, with 3 host syncs per layer. Any other device: ``sdpa_padded``
    (measured on a 2-core CPU: as fast as ``sdpa_loop`` single-threaded, and far less sensitive to a busy machine, as
    it issues a handful of ops per layer instead of a few per sequence). Dropout changes nothing: every pick has it."""
    if device_type != "cuda" or dtype not in HALF_DTYPES:
        return "sdpa_padded"
    return "flash_attn" if probes["flash_attn"] else "flash_torch"


def _auto_losses(device_type: str, dtype: torch.dtype, probes: Mapping[str, bool], dropout_p: float) -> str:
    """Masked-position losses: the Triton row kernels on CUDA when Triton imports, else ``chunked`` (the fused chunk
    loop in PyTorch; never the Triton interpreter on CPU)."""
    return "triton" if device_type == "cuda" and probes["triton"] else "chunked"


def _auto_ot(device_type: str, dtype: torch.dtype, probes: Mapping[str, bool], dropout_p: float) -> str:
    """IPOT and the WRA distance: ``cpp`` on CPU tensors when the extension is built, else ``triton`` where Triton runs
    (CUDA; the CPU under TRITON_INTERPRET=1), else ``reference``."""
    if device_type == "cpu" and probes["cpp"]:
        return "cpp"
    if device_type in ("cuda", "cpu") and probes["triton"]:
        return "triton"
    return "reference"


def _auto_reference(device_type: str, dtype: torch.dtype, probes: Mapping[str, bool], dropout_p: float) -> str:
    """``reference`` (the fused encoder layer is opt-in until a GPU run has timed it, docs/encoder.md)."""
    return "reference"


# ---------------------------------------------------------------------------------------------------------- components
@dataclasses.dataclass(frozen=True)
class Component:
    """A part of the model with a run-time backend switch.

    Attributes:
        name: the component's key in :data:`COMPONENTS`.
        what: one line on what it computes and where its kernels live.
        backends: the concrete names, fastest first, ``"reference"`` last.
        needs: backend -> the requirements (keys of :data:`PROBES`) it has; absent: runs anywhere.
        auto: the rule behind ``"auto"``, a pure function of (device type, dtype, probes, dropout probability).
        aliases: extra accepted names -> the concrete name per device type (``"*"``: any other device).
    """

    name: str
    what: str
    backends: tuple[str, ...]
    needs: Mapping[str, tuple[str, ...]]
    auto: Rule
    aliases: Mapping[str, Mapping[str, str]] = dataclasses.field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """Every accepted name: ``"auto"``, the concrete names, the aliases."""
        return ["auto", *self.backends, *self.aliases]


_EAGER = {"eager": {"*": "reference"}}  # the attention reference's name before the one vocabulary (saved configs)
_OT_NEEDS = {"cpp": ("cpu", "cpp"), "triton": ("triton",)}

COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            "attention",
            "attention core of the padded encoder, [B, heads, L, d] (uniter_fast.model.attention.PADDED_ATTENTION)",
            ("sdpa", "reference"),
            {},
            _auto_attention,
            _EAGER,
        ),
        Component(
            "packed_attention",
            "varlen attention of the packed encoder, [T, heads, d] (uniter_fast.model.attention.VARLEN_ATTENTION)",
            ("flash_attn", "flash_torch", "torch_varlen", "sdpa_padded", "sdpa_nested", "sdpa_loop", "reference"),
            {"flash_attn": ("cuda", "flash_attn"), "flash_torch": ("cuda",), "torch_varlen": ("cuda", "torch_varlen")},
            _auto_packed_attention,
            _EAGER,
        ),
        Component(
            "losses",
            "projection + loss of MLM, MRFR, MRC and MRC-kl (uniter_fast.losses)",
            ("triton", "chunked", "reference"),
            {"triton": ("triton",)},
            _auto_losses,
            {"fast": {"cuda": "triton", "*": "chunked"}},
        ),
        Component(
            "ipot",
            "the IPOT transport plan (uniter_fast.ot.ipot; runners in uniter_fast.ot.backends)",
            ("cpp", "triton", "reference"),
            _OT_NEEDS,
            _auto_ot,
        ),
        Component(
            "wra",
            "the WRA distance, cost + IPOT + sum + backward fused (uniter_fast.ot.optimal_transport_dist)",
            ("cpp", "triton", "reference"),
            _OT_NEEDS,
            _auto_ot,
        ),
        Component(
            "encoder_layer",
            "the element-wise parts of a post-LN encoder layer and its QKV projection (uniter_fast.model.fused_layer)",
            ("triton", "reference"),
            {"triton": ("triton",)},
            _auto_reference,
        ),
    )
}


def component(name: str) -> Component:
    """The component called ``name`` (a key of :data:`COMPONENTS`)."""
    if name not in COMPONENTS:
        raise ValueError(f"unknown backend component {name!r}; expected one of {sorted(COMPONENTS)}")
    return COMPONENTS[name]


def check_name(name: str, requested: str, argument: str = "backend") -> None:
    """Raise the one ``ValueError`` (naming ``argument``, the component, the given name and the accepted ones) unless
    ``requested`` is a name of component ``name``."""
    spec = component(name)
    if requested not in spec.names:
        raise ValueError(f"{argument}: unknown {name} backend {requested!r}; expected one of {spec.names}")


def unavailable_reason(name: str, backend: str, device: DeviceLike) -> Optional[str]:
    """Why the concrete ``backend`` of component ``name`` cannot run on tensors of ``device``; None when it can."""
    device = torch.device(device)
    for requirement in component(name).needs.get(backend, ()):
        test, why = PROBES[requirement]
        if not test(device):
            return why
    return None


def available(name: str, device: DeviceLike) -> list[str]:
    """The concrete backends of component ``name`` that can run on tensors of ``device``, fastest first (always ends
    with ``"reference"``)."""
    return [b for b in component(name).backends if unavailable_reason(name, b, device) is None]


def choose(name: str, device_type: str, dtype: torch.dtype, probes: Mapping[str, bool], dropout_p: float = 0.0) -> str:
    """What ``"auto"`` picks for component ``name``: a pure function of the device type (``"cuda"``, ``"cpu"``, ...),
    the dtype the kernel sees, the probes (a mapping with the keys of :data:`PROBES` it reads: ``{"flash_attn": True,
    ...}``, or :class:`LiveProbes`) and the attention dropout probability."""
    return component(name).auto(device_type, dtype, probes, dropout_p)


_LOGGED: set[tuple[str, str, str, bool, str]] = set()


def resolve(
    name: str,
    requested: str,
    device: DeviceLike,
    dtype: torch.dtype = torch.float32,
    *,
    dropout_p: float = 0.0,
    suffix_padded: bool = True,
    pair_size: Optional[tuple[int, int]] = None,
) -> str:
    """The concrete backend that ``requested`` selects for component ``name`` on tensors of ``device`` / ``dtype``.

    ``"auto"`` is :func:`choose` with this machine's probes; an alias maps to its concrete name for the device; a
    concrete name is used as given, or a ``ValueError`` says why it cannot run there. For IPOT and the WRA distance
    (``"ipot"``, ``"wra"``): ``suffix_padded`` False (pads not at the end of each row) makes ``"auto"`` warn and use
    the reference and any other fast name an error; ``pair_size`` (M, N) beyond the Triton tile makes ``"triton"`` warn
    and use the reference. Each (component, device, dtype, choice) is logged at INFO the first time.
    """
    check_name(name, requested)
    spec, device = component(name), torch.device(device)
    alias = spec.aliases.get(requested)
    backend = requested if alias is None else alias.get(device.type, alias["*"])
    if backend == "auto":
        backend = choose(name, device.type, dtype, LiveProbes(device), dropout_p)
    else:
        why = unavailable_reason(name, backend, device)
        if why is not None:
            raise ValueError(f"{name} backend {requested!r} cannot run on tensors on {device}: it {why}")
    if name in ("ipot", "wra"):
        backend = _ot_situation(name, requested, backend, suffix_padded, pair_size)
    key = (name, str(device), str(dtype), requested == "auto", backend)
    if key not in _LOGGED:
        _LOGGED.add(key)
        how = "selected" if requested == "auto" else "requested"
        logger.info("%s on %s/%s: %s backend %r", name, device, dtype, how, backend)
    return backend


def _ot_situation(
    name: str, requested: str, backend: str, suffix_padded: bool, pair_size: Optional[tuple[int, int]]
) -> str:
    """The OT fallbacks: the fast kernels read the valid block of each pair (pads must be a suffix), and the Triton
    kernels hold at most TRITON_OT_MAX_BLOCK x TRITON_OT_MAX_BLOCK per pair. Warnings point at the caller of ``ipot`` /
    ``optimal_transport_dist``."""
    if backend != "reference" and not suffix_padded:
        if requested != "auto":
            raise ValueError(f"backend {requested!r} needs txt_pad/img_pad True only at the end of each row")
        warnings.warn(f"{name}: pads are not a suffix of each row; using the reference backend", stacklevel=4)
        return "reference"
    if backend == "triton" and pair_size is not None:
        if max(pair_size) > TRITON_OT_MAX_BLOCK:
            warnings.warn(
                f"{name}: the Triton kernel holds at most {TRITON_OT_MAX_BLOCK}x{TRITON_OT_MAX_BLOCK} per pair, got "
                f"{pair_size[0]}x{pair_size[1]}; using the reference backend",
                stacklevel=4,
            )
            return "reference"
    return backend
