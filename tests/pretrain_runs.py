"""Launch ``uniter_fast/pretrain.py`` in a subprocess (python, deepspeed or torchrun) on the bundled corpus."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "uniter_fast", "pretrain.py")
ALL_TASKS = ["itm", "mlm", "mrfr", "mrc", "mrckl"]


def write_configs(
    directory: str,
    steps: int,
    grad_accum: int = 1,
    edit: Optional[Callable[[dict], None]] = None,
    ds_edit: Optional[Callable[[dict], None]] = None,
) -> tuple[str, str]:
    """A training config (tiny, bundled corpus, all five tasks mixed 1:1 from the first step: the default's curriculum
    ``phases`` are dropped; ``edit`` may set its own) and a ds.json (ZeRO-2) in ``directory``."""
    with open(os.path.join(REPO, "configs", "pretrain-tiny.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    for spec in cfg["train_datasets"] + cfg["val_datasets"]:
        spec["tasks"] = list(ALL_TASKS)
    cfg["train_datasets"][0]["mix_ratio"] = [1] * len(ALL_TASKS)
    cfg.pop("phases", None)
    cfg.update(
        output_dir=os.path.join(directory, "out"),
        num_train_steps=steps,
        warmup_steps=2,
        valid_steps=10**6,
        save_steps=10**6,
        train_batch_size=512,
        val_batch_size=4096,
    )
    if edit is not None:
        edit(cfg)
    with open(os.path.join(REPO, "ds.json"), encoding="utf-8") as f:
        ds = json.load(f)
    ds["gradient_accumulation_steps"] = grad_accum
    if ds_edit is not None:
        ds_edit(ds)
    cfg_path, ds_path = os.path.join(directory, "cfg.json"), os.path.join(directory, "ds.json")
    for path, obj in ((cfg_path, cfg), (ds_path, ds)):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f)
    return cfg_path, ds_path


ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def script_args(cfg_path: str, ds_path: str) -> list[str]:
    """The script's arguments for the configs of :func:`write_configs` (no loader workers)."""
    return ["--config", cfg_path, "--ds_config", ds_path, "--num_workers", "0"]


def run(
    launcher: list[str],
    cfg_path: str,
    ds_path: str,
    extra: tuple[str, ...] = (),
    timeout: int = 600,
    expect_rc: int = 0,
) -> subprocess.CompletedProcess:
    """Run the script under ``launcher`` (e.g. ``[python]`` or ``[deepspeed, --num_gpus, 2]``); fails unless its exit
    status is ``expect_rc``."""
    cmd = [*launcher, SCRIPT, *script_args(cfg_path, ds_path), *extra]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV}, cwd=os.path.dirname(cfg_path)
    )
    assert proc.returncode == expect_rc, f"{cmd} gave {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_worker(launcher: list[str], mode: str, out_dir: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``tests/pretrain_worker.py <mode> <out_dir>`` under ``launcher``; fails on rc != 0."""
    cmd = [*launcher, os.path.join(REPO, "tests", "pretrain_worker.py"), mode, out_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **ENV}, cwd=REPO)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def exported_weights(out_dir: str) -> dict[str, torch.Tensor]:
    """The fp32 export (``pretrained/model.safetensors``) of a finished run."""
    return load_file(os.path.join(out_dir, "pretrained", "model.safetensors"))


def final_row(stdout: str, task: str) -> dict[str, float]:
    """The row of ``task`` in the final metrics table, by column name (``val_acc``, ``val_loss_step_0``, ...)."""
    lines = stdout.splitlines()
    header_at = next(i for i, line in enumerate(lines) if line.startswith("task "))
    names = ["_".join(n.split()) for n in lines[header_at].split("  ") if n.strip()]
    row = next(line for line in lines[header_at:] if line.startswith(task)).split()
    return {k: float(v) for k, v in zip(names[1:], row[1:]) if v != "-"}


def launcher(name: str, ranks: int = 1) -> list[str]:
    """The command prefix of launcher ``name`` ("python", "deepspeed" or "torchrun")."""
    bindir = os.path.dirname(sys.executable)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    if name == "python":
        return [sys.executable]
    if name == "deepspeed":
        return [os.path.join(bindir, "deepspeed"), "--num_gpus", str(ranks), "--master_port", port]
    return [os.path.join(bindir, "torchrun"), "--nproc_per_node", str(ranks), "--master_port", port]


def step_log(cfg_path: str, name: str = "train_steps.jsonl") -> list[dict[str, Any]]:
    """The per-step records (step, task, lr, loss, ...) of the run of ``cfg_path`` (``validation.jsonl``: the
    validation records)."""
    with open(cfg_path, encoding="utf-8") as f:
        out_dir = json.load(f)["output_dir"]
    with open(os.path.join(out_dir, name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]
