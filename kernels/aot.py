"""Ahead-of-time compilation of the project's Triton kernels for NVIDIA targets, without a GPU.

Every kernel module under ``kernels/`` defines ``aot_specs() -> list[AotSpec]`` listing the launch configurations its
dispatcher uses. ``compile_spec`` compiles one of them with ``triton.compile`` for a ``GPUTarget`` and reads the
register count, spills and shared memory from ``ptxas -v`` (the driver-side ``n_regs``/``n_spills`` need a GPU).
``bench/kernel_report.py`` runs this for every spec and architecture.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class AotSpec:
    """One launch configuration of a Triton kernel.

    ``signature`` maps every non-constexpr argument name to its Triton type ("*fp32", "i32", "fp32", ...) and every
    constexpr argument to "constexpr"; ``constexprs`` gives the constexpr values. ``maxnreg`` (optional) is the
    per-thread register cap the dispatcher passes at launch.
    """

    name: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    maxnreg: Optional[int] = None


@dataclass
class AotResult:
    """Resource usage of one compiled spec on one architecture (``shared_bytes`` as Triton allocates it)."""

    name: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    num_warps: int


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_usage(ptx: str, capability: int, arch: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from Triton's bundled ``ptxas -v`` with Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w", encoding="utf-8") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src]
        out = subprocess.run(
            cmd + ["-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True,
            text=True,
            check=True,
        )
    log = out.stdout + out.stderr
    regs = _PTXAS_USED.search(log)
    spills = _PTXAS_SPILL.search(log)
    if regs is None or spills is None:
        raise RuntimeError(f"could not parse ptxas output for {arch}:\n{log}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_spec(spec: AotSpec, capability: int) -> AotResult:
    """Compile ``spec`` for CUDA compute capability ``capability`` (e.g. 90 → sm_90a, 80 → sm_80), no GPU needed.

    Pointer arguments are assumed 16-byte aligned (as the JIT specialises them for torch tensors); integer arguments
    get no divisibility specialisation (the conservative case).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.compiler import ASTSource

    # Like the JIT for torch tensors: every pointer argument is 16-byte aligned.
    names = list(spec.signature)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a, ty in spec.signature.items() if ty.startswith("*")}
    src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    if spec.maxnreg is not None:
        options["maxnreg"] = spec.maxnreg
    compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
    arch = sm_arch_from_capability(capability)
    regs, spill_st, spill_ld = _ptxas_usage(compiled.asm["ptx"], capability, arch)
    return AotResult(spec.name, arch, regs, spill_st, spill_ld, int(compiled.metadata.shared), spec.num_warps)
