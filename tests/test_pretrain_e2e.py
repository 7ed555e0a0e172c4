"""End-to-end: the real CLI under the DeepSpeed launcher, one rank, ZeRO-2, a few steps of every task."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors.torch import load_file

from tests.pretrain_runs import ALL_TASKS, launcher, run, step_log, write_configs
from uniter_fast import Model
from uniter_fast.checkpoint import read_checkpoint
from uniter_fast.config import UniterConfig


def test_deepspeed_one_rank_every_task(tmp_path) -> None:
    cfg_path, ds_path = write_configs(str(tmp_path), steps=12, grad_accum=2)
    proc = run(launcher("deepspeed"), cfg_path, ds_path)
    records = step_log(cfg_path)
    assert [r["step"] for r in records] == list(range(1, 13))
    assert {r["task"].split("_")[0] for r in records} == set(ALL_TASKS)
    assert all(math.isfinite(r["loss"]) for r in records)
    assert all(math.isfinite(r["ot_loss"]) for r in records if r["task"].startswith("itm"))
    assert records[0]["lr"] < records[1]["lr"]  # warm-up
    assert "final metrics after 12 steps (1 rank(s), ZeRO-2)" in proc.stdout
    for task in ALL_TASKS:
        assert f"{task}_synth" in proc.stdout
    out_dir = os.path.join(str(tmp_path), "out")
    model = Model.from_pretrained(os.path.join(out_dir, "pretrained"))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    expected = {**UniterConfig.preset(cfg["model"]).to_dict(), **cfg.get("model_overrides", {})}
    with open(os.path.join(out_dir, "pretrained", "config.json"), encoding="utf-8") as f:
        assert json.load(f)["hidden_size"] == expected["hidden_size"]
    checkpoint = read_checkpoint(os.path.join(out_dir, "ckpt"))  # the DeepSpeed checkpoint, with its model config
    assert checkpoint.config == model.config
    for key, value in load_file(os.path.join(out_dir, "pretrained", "model.safetensors")).items():
        torch.testing.assert_close(checkpoint.state[key], value, rtol=0, atol=0, msg=key)
    assert os.listdir(os.path.join(out_dir, "tb"))
