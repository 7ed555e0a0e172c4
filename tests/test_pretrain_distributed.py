"""Longer end-to-end runs (marked slow): exact resume, two ranks (deepspeed and torchrun, ZeRO-2 and ZeRO-3), and
learning on the bundled corpus."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from tests.pretrain_runs import ALL_TASKS, launcher, run, step_log, write_configs

pytestmark = pytest.mark.slow


def test_resume_continues_exactly(tmp_path) -> None:
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full_dir.mkdir()
    cut_dir.mkdir()
    full = write_configs(str(full_dir), steps=10, grad_accum=2)
    cut = write_configs(str(cut_dir), steps=10, grad_accum=2)
    run(launcher("python"), *full)
    run(launcher("python"), *cut, extra=("--stop_after", "5"))
    assert [r["step"] for r in step_log(cut[0])] == [1, 2, 3, 4, 5]
    proc = run(launcher("python"), *cut, extra=("--resume",))
    assert "final metrics after 10 steps" in proc.stdout
    expected, got = step_log(full[0]), step_log(cut[0])
    assert [r["step"] for r in got] == list(range(1, 11))
    for a, b in zip(expected[5:], got[5:]):
        assert (a["task"], a["lr"]) == (b["task"], b["lr"])
        for key in a:
            if key not in ("step", "task", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a, b)
    assert len({r["task"] for r in expected[5:]}) > 1  # the continued part mixes tasks


@pytest.mark.parametrize(
    "name,stage",
    [("deepspeed", 2), ("torchrun", 2), ("deepspeed", 3)],
    ids=["deepspeed-zero2", "torchrun-zero2", "deepspeed-zero3"],
)
def test_two_ranks_every_task(tmp_path, name, stage) -> None:
    def ds_edit(ds: dict) -> None:
        ds["zero_optimization"] = {"stage": stage, "overlap_comm": False}

    cfg_path, ds_path = write_configs(str(tmp_path), steps=10, ds_edit=ds_edit, edit=lambda c: c.update(valid_steps=5))
    proc = run(launcher(name, ranks=2), cfg_path, ds_path)
    records = step_log(cfg_path)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert {r["task"].split("_")[0] for r in records} == set(ALL_TASKS)
    assert all(math.isfinite(v) for r in records for k, v in r.items() if k not in ("task",))
    assert f"final metrics after 10 steps (2 rank(s), ZeRO-{stage})" in proc.stdout
    assert os.path.isfile(os.path.join(str(tmp_path), "out", "pretrained", "model.safetensors"))


def test_short_run_learns(tmp_path) -> None:
    steps = 2400

    def edit(cfg: dict) -> None:
        cfg.update(num_train_steps=steps, warmup_steps=100, learning_rate=1e-3, valid_steps=10**6, seed=7)
        for spec in cfg["train_datasets"] + cfg["val_datasets"]:
            spec["tasks"] = ["itm", "mlm", "mrfr", "mrckl"]
        cfg["train_datasets"][0]["mix_ratio"] = [4, 2, 1, 1]

    cfg_path, ds_path = write_configs(str(tmp_path), steps=steps, edit=edit)
    proc = run(launcher("python"), cfg_path, ds_path, timeout=1500)
    records = step_log(cfg_path)
    for task in ("itm", "mlm", "mrfr", "mrckl"):
        losses = [r["itm_loss" if task == "itm" else "loss"] for r in records if r["task"].startswith(task)]
        first, last = np.mean(losses[:20]), np.mean(losses[-50:])
        assert last < 0.9 * first, (task, first, last)
    row = next(line for line in proc.stdout.splitlines() if line.startswith("itm_synth"))
    itm_acc = float(row.split()[2])
    assert itm_acc > 0.6, row
