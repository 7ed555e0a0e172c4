"""What this machine runs: ``python -m uniter_fast.info`` (a table) or ``python -m uniter_fast.info --json``.

Versions (python, torch and its CUDA, triton, deepspeed, flash-attn, whether the C++ extension ``uniter_fast._C``
imports), devices (CPU threads; each CUDA device's name, capability and memory) and, per backend component of
:mod:`uniter_fast.backends`, the backends that can run on each device type and what ``"auto"`` picks there for the
dtypes that matter (fp32 and bf16; fp16 on CUDA). Versions come from package metadata, so nothing optional is
imported but what the availability probes import; a missing package shows as ``null`` / ``-``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from typing import Any, Optional

import torch

from uniter_fast import __version__, backends
from uniter_fast.entry import CommandParser, run_command

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRAINING_DROPOUT = 0.1
"""The attention dropout ``auto`` is asked about (UNITER's ``attention_probs_dropout_prob``, i.e. training)."""


def package_version(*names: str) -> Optional[str]:
    """The installed version of the first distribution called one of ``names``, else None (nothing is imported)."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict[str, Any]:
    """Versions of python, uniter_fast, torch (and the CUDA it was built with), triton, deepspeed, flash-attn; and
    whether the C++ extension imports."""
    return {
        "python": platform.python_version(),
        "uniter_fast": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": package_version("triton"),
        "deepspeed": package_version("deepspeed"),
        "flash_attn": package_version("flash-attn", "flash_attn"),
        "cpp_extension": backends.cpp_available(),
    }


def devices() -> dict[str, Any]:
    """CPU threads (torch's intra-op pool) and every CUDA device: index, name, capability "major.minor", memory."""
    cuda = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            cuda.append(
                {
                    "index": index,
                    "name": props.name,
                    "capability": f"{props.major}.{props.minor}",
                    "memory_gib": round(props.total_memory / 2**30, 1),
                }
            )
    return {"cpu": {"threads": torch.get_num_threads()}, "cuda": cuda}


def device_types() -> list[str]:
    """The device types of this machine the components run on: ``"cpu"``, and ``"cuda"`` when a GPU is visible."""
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def component_choices(device_type: str) -> dict[str, Any]:
    """Per component: the backends that can run on ``device_type`` and what ``auto`` picks per dtype (training
    dropout, suffix pads)."""
    dtypes = ["fp32", "bf16", "fp16"] if device_type == "cuda" else ["fp32", "bf16"]
    return {
        name: {
            "available": backends.available(name, device_type),
            "auto": {
                d: backends.resolve(name, "auto", device_type, DTYPES[d], dropout_p=TRAINING_DROPOUT) for d in dtypes
            },
        }
        for name in backends.COMPONENTS
    }


def machine_info() -> dict[str, Any]:
    """Everything ``python -m uniter_fast.info --json`` prints: keys ``versions``, ``environment``
    (``TRITON_INTERPRET``), ``devices``, ``components`` (name -> ``what``, ``names``: every accepted name) and
    ``choices`` (device type -> component -> ``available``, ``auto``: dtype -> backend)."""
    return {
        "versions": versions(),
        "environment": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")},
        "devices": devices(),
        "components": {name: {"what": c.what, "names": c.names} for name, c in backends.COMPONENTS.items()},
        "choices": {kind: component_choices(kind) for kind in device_types()},
    }


def format_info(info: dict[str, Any]) -> str:
    """The human-readable report of :func:`machine_info`'s dict."""
    v = info["versions"]
    shown = {k: ("-" if value is None else value) for k, value in v.items()}
    lines = [
        f"uniter_fast {shown['uniter_fast']}: python {shown['python']}, torch {shown['torch']} (CUDA "
        f"{shown['torch_cuda']}), triton {shown['triton']}, deepspeed {shown['deepspeed']}, flash-attn "
        f"{shown['flash_attn']}, C++ extension uniter_fast._C {'yes' if v['cpp_extension'] else 'no'}",
        f"TRITON_INTERPRET: {info['environment']['TRITON_INTERPRET'] or 'unset'}",
        f"cpu: {info['devices']['cpu']['threads']} threads",
    ]
    lines += [
        f"cuda:{d['index']}: {d['name']}, capability {d['capability']}, {d['memory_gib']} GiB"
        for d in info["devices"]["cuda"]
    ]
    rows = [("component", "device", "auto fp32", "auto bf16", "auto fp16", "available (fastest first)")]
    for kind, components in info["choices"].items():
        for name, choice in components.items():
            auto = [choice["auto"].get(d, "-") for d in DTYPES]
            rows.append((name, kind, *auto, ", ".join(choice["available"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + [""] + table)


def main(argv: Optional[list[str]] = None) -> None:
    """Print the machine's versions, devices and backend choices (``--json``: as one JSON object)."""
    parser = CommandParser(prog="python -m uniter_fast.info", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    info = machine_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))


if __name__ == "__main__":
    run_command(main)
