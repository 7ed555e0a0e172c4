"""Kill a training run (SIGKILL) at a chosen point of its life, for the resume tests of both recipes.

A run's points are its writes to disk under its output dir (TensorBoard's ``tb/``, written by a background thread,
aside): every file opened for writing, every ``torch.save`` and ``safetensors`` save to a path, every rename onto a
path there. What a kill leaves behind is the disk, and a process killed anywhere between two writes leaves it as it
was after the first; so killing just before each write, or half-way through it (half of its bytes on disk), reaches
every state a kill at any moment can leave. ``RUNNER`` runs a script in-process with those calls wrapped: it records
the points of a whole run (each with its path under the output dir), or kills itself at point ``kill_at``. The same
run reaches the same points in the same order, so a point recorded in an uninterrupted run names a moment of any
other run of the same command.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from typing import Any, Optional

# python -c RUNNER CONTROL SCRIPT ARGS...: CONTROL is a JSON file {"out": output dir, "record": file for the points
# or null, "kill_at": point index or null, "torn": write half of that point's bytes before the kill}.
RUNNER = r"""
import atexit, builtins, io, json, os, runpy, signal, sys
import safetensors.torch as st
import torch

with open(sys.argv[1], encoding="utf-8") as f:
    control = json.load(f)
script = sys.argv[2]
out = os.path.realpath(control["out"])
tb = os.path.join(out, "tb")
points = []
real_open, real_save, real_save_file = builtins.open, torch.save, st.save_file


def watched(path):
    if not isinstance(path, (str, bytes, os.PathLike)):
        return None
    path = os.path.realpath(os.fsdecode(path))
    if path.startswith(out + os.sep) and not (path == tb or path.startswith(tb + os.sep)):
        return os.path.relpath(path, out)
    return None


def die():
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def point(kind, rel):
    "Record the point; kill here (before the write) or return True when this write is to be torn."
    points.append([kind, rel])
    if control["kill_at"] == len(points) - 1:
        if not control["torn"] or kind == "rename":
            die()
        return True
    return False


def write_half(path, data):
    with real_open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    die()


class Torn:
    "A file whose first write reaches the disk half, then the process dies."

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        die()

    def writelines(self, lines):
        lines = list(lines)
        self.write(type(lines[0])().join(lines) if lines else "")

    def close(self):
        die()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        die()

    def __getattr__(self, name):
        return getattr(self._f, name)


def open_(file, mode="r", *args, **kwargs):
    rel = watched(file) if any(c in mode for c in "wax+") else None
    if rel is None:
        return real_open(file, mode, *args, **kwargs)
    tear = point("open", rel)
    f = real_open(file, mode, *args, **kwargs)
    return Torn(f) if tear else f


def save(obj, f, *args, **kwargs):
    rel = watched(f)
    if rel is not None and point("torch.save", rel):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        write_half(f, buffer.getvalue())
    return real_save(obj, f, *args, **kwargs)


def save_file(tensors, filename, metadata=None):
    rel = watched(filename)
    if rel is not None and point("safetensors", rel):
        write_half(filename, st.save(tensors, metadata=metadata))
    return real_save_file(tensors, filename, metadata)


def renamer(real):
    def rename(src, dst, *args, **kwargs):
        rel = watched(dst)
        if rel is not None:
            point("rename", rel)
        return real(src, dst, *args, **kwargs)

    return rename


def record():
    if control["record"]:
        with real_open(control["record"], "w", encoding="utf-8") as f:
            json.dump(points, f)


builtins.open, torch.save, st.save_file = open_, save, save_file
os.replace, os.rename = renamer(os.replace), renamer(os.rename)
atexit.register(record)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""

ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", "MKL_CBWR": "AUTO,STRICT"}
TMP_PART = re.compile(r"^\.tmp-[0-9a-f]+-(old-)?")


def run_script(
    script: str, args: list[str], out_dir: str, cwd: str, kill_at: Optional[int] = None, torn: bool = False
) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """``script args`` in one process under :data:`RUNNER`: to the end (returns the points it recorded), or killed at
    point ``kill_at`` (half of that write on disk with ``torn``). Fails unless it ended as asked (exit 0, or
    SIGKILL)."""
    control_path = os.path.join(cwd, f"control-{os.getpid()}.json")
    record = None if kill_at is not None else os.path.join(cwd, f"points-{os.getpid()}.json")
    with open(control_path, "w", encoding="utf-8") as f:
        json.dump({"out": out_dir, "record": record, "kill_at": kill_at, "torn": torn}, f)
    command = [sys.executable, "-c", RUNNER, control_path, script, *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **ENV}, cwd=cwd)
    os.remove(control_path)
    expect = 0 if kill_at is None else -9
    assert proc.returncode == expect, f"{args} gave {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    if record is None:
        return proc, []
    with open(record, encoding="utf-8") as f:
        points = json.load(f)
    os.remove(record)
    return proc, points


def plain_path(rel: str) -> str:
    """``rel`` with the random parts of temporary names dropped (``.tmp-1a2b-pretrained/x`` -> ``pretrained/x``)."""
    return "/".join(TMP_PART.sub("", part) for part in rel.split("/"))


def phase(rel: str, export_dir: str) -> str:
    """The part of a run a point at ``rel`` belongs to: ``train`` (the step log), ``validation`` (its log and
    predictions), ``checkpoint``, ``export`` or ``pictures``."""
    first = plain_path(rel).split("/")[0]
    if first == "train_steps.jsonl":
        return "train"
    if first in ("validation.jsonl", "results"):
        return "validation"
    if first == "ckpt":
        return "checkpoint"
    if first == export_dir:
        return "export"
    if first.endswith(".png"):
        return "pictures"
    raise AssertionError(f"a write outside the run's known outputs: {rel}")


def choose(points: list[list[str]], export_dir: str, seed: int, phase_name: Optional[str] = None) -> tuple[int, bool]:
    """A seeded kill point: (index, torn), among the points of ``phase_name`` (any point when None)."""
    rng = random.Random(seed)
    pool = [i for i, (_, rel) in enumerate(points) if phase_name is None or phase(rel, export_dir) == phase_name]
    assert pool, f"no point in phase {phase_name!r}"
    return rng.choice(pool), rng.random() < 0.5


def read_lines(path: str) -> list[dict[str, Any]]:
    """Every record of a JSON-lines log, exactly as written (a cut-off line fails the test)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
