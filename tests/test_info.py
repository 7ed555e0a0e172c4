"""``python -m uniter_fast.info``: the CLI runs, its JSON has the documented keys and agrees with the resolver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from uniter_fast import backends, info

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "uniter_fast.info", *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_json_has_the_documented_keys_and_agrees_with_the_resolver() -> None:
    payload = json.loads(run_cli("--json"))
    assert set(payload) == {"versions", "environment", "devices", "components", "choices"}
    assert set(payload["versions"]) == {
        "python",
        "uniter_fast",
        "torch",
        "torch_cuda",
        "triton",
        "deepspeed",
        "flash_attn",
        "cpp_extension",
    }
    assert payload["versions"]["torch"] == torch.__version__
    assert payload["versions"]["cpp_extension"] == backends.cpp_available()
    assert payload["environment"] == {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET")}
    assert payload["devices"]["cpu"]["threads"] >= 1
    assert len(payload["devices"]["cuda"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert set(payload["components"]) == set(backends.COMPONENTS)
    for name, component in payload["components"].items():
        assert component["names"] == backends.component(name).names
    assert set(payload["choices"]) == set(info.device_types())
    for kind, components in payload["choices"].items():
        dtypes = {"fp32", "bf16", "fp16"} if kind == "cuda" else {"fp32", "bf16"}
        for name, choice in components.items():
            assert choice["available"] == backends.available(name, kind)
            assert set(choice["auto"]) == dtypes
            for dtype, picked in choice["auto"].items():
                assert picked == backends.resolve(name, "auto", kind, info.DTYPES[dtype], dropout_p=0.1)
                assert picked in choice["available"]


def test_table_names_every_component() -> None:
    text = run_cli()
    assert text.startswith("uniter_fast ")
    for name in backends.COMPONENTS:
        assert any(line.startswith(f"{name} ") for line in text.splitlines()), name


def test_follows_the_probes_and_survives_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no C++ extension and no Triton interpreter, auto's IPOT choice is the reference; packages that are not
    installed show as None."""
    monkeypatch.setattr(backends, "cpp_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    payload = info.machine_info()
    assert payload["versions"]["cpp_extension"] is False
    ipot = payload["choices"]["cpu"]["ipot"]
    assert ipot == {"available": ["reference"], "auto": {"fp32": "reference", "bf16": "reference"}}
    assert info.package_version("no-such-package-uniter-fast") is None
    assert "C++ extension uniter_fast._C no" in info.format_info(payload)
