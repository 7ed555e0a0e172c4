"""Training-config and ds.json validation: bad input fails with a clear error before any training starts."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest

from uniter_fast.pretraining.config import load_training_config, parse_training_config
from uniter_fast.training.engine import complete_ds_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def raw(tmp_path) -> dict:
    for name in ("txt", "txt_val", "img"):
        os.makedirs(tmp_path / name)
    return {
        "output_dir": str(tmp_path / "out"),
        "train_datasets": [
            {"name": "coco", "db": ["txt"], "img": ["img"], "tasks": ["itm", "mlm", "mrckl"], "mix_ratio": [2, 3, 1]}
        ],
        "val_datasets": [{"name": "coco", "db": ["txt_val"], "img": ["img"], "tasks": ["itm", "mlm"]}],
    }


def test_valid_config_resolves_paths(raw, tmp_path) -> None:
    cfg = parse_training_config(raw, str(tmp_path))
    assert cfg.train_datasets[0].db == [str(tmp_path / "txt")]
    assert cfg.all_task_names() == ["itm_coco", "mlm_coco", "mrckl_coco"]
    assert (cfg.learning_rate, cfg.itm_ot_lambda, cfg.ot.iteration) == (5e-5, 0.1, 50)
    assert cfg.phases is None and cfg.phase_starts() is None
    phases = [{"steps": 30, "mix": {"itm_coco": 1}}, {"steps": 20, "mix": {"mlm_coco": 2}}, {"mix": {"itm_coco": 1}}]
    cfg = parse_training_config({**raw, "phases": phases}, str(tmp_path))
    assert cfg.phase_starts() == [(0, {"itm_coco": 1}), (30, {"mlm_coco": 2}), (50, {"itm_coco": 1})]


@pytest.mark.parametrize(
    "edit,error,match",
    [
        (lambda r: r["train_datasets"][0].update(tasks=["itm", "vqa", "mrckl"]), ValueError, "unknown task 'vqa'"),
        (lambda r: r["train_datasets"][0].update(mix_ratio=[2, 0, 1]), ValueError, "mix_ratio of task 'mlm'.*got 0"),
        (lambda r: r["train_datasets"][0].update(mix_ratio=[2, -1, 1]), ValueError, "must be an integer > 0, got -1"),
        (lambda r: r["train_datasets"][0].update(mix_ratio=[2, 1]), ValueError, "one entry per task \\(3\\), got 2"),
        (
            lambda r: r["train_datasets"][0].update(db=["nowhere"]),
            FileNotFoundError,
            "db: database directory .*nowhere",
        ),
        (lambda r: r["val_datasets"][0].update(img=["gone"]), FileNotFoundError, "val_datasets\\[0\\].img.*gone"),
        (lambda r: r.update(train_batch_size=0), ValueError, "train_batch_size must be a number > 0, got 0"),
        (lambda r: r.update(learning_rte=1e-4), ValueError, "unknown keys \\['learning_rte'\\]"),
        (lambda r: r.update(mrm_prob=1.5), ValueError, "mrm_prob must be in \\(0, 1\\), got 1.5"),
        (lambda r: r.update(ot={"beta": 0}), ValueError, "need beta > 0"),
        (lambda r: r.pop("val_datasets"), ValueError, "missing key 'val_datasets'"),
        (lambda r: r.update(checkpoint="none.pt"), FileNotFoundError, "checkpoint .*none.pt"),
        (lambda r: r.update(phases=[]), ValueError, "phases must be a non-empty list"),
        (
            lambda r: r.update(phases=[{"mix": {"itm_coco": 1}, "steps": 5}]),
            ValueError,
            "phases\\[0\\]: expected keys only 'mix'",
        ),
        (
            lambda r: r.update(phases=[{"mix": {"itm_coco": 1}}, {"mix": {"mlm_coco": 1}}]),
            ValueError,
            "phases\\[0\\]: expected keys 'steps' and 'mix'",
        ),
        (
            lambda r: r.update(phases=[{"steps": 0, "mix": {"itm_coco": 1}}, {"mix": {"mlm_coco": 1}}]),
            ValueError,
            "phases\\[0\\]: 'steps' must be an integer > 0, got 0",
        ),
        (lambda r: r.update(phases=[{"mix": {"itm_vg": 1}}]), ValueError, "unknown task 'itm_vg' in 'mix'"),
        (lambda r: r.update(phases=[{"mix": {"itm_coco": 0.5}}]), ValueError, "'itm_coco' must be an integer > 0"),
        (lambda r: r.update(phases=[{"mix": {}}]), ValueError, "'mix' must be a non-empty object"),
    ],
)
def test_bad_config_is_a_clear_error(raw, tmp_path, edit, error, match) -> None:
    bad = copy.deepcopy(raw)
    edit(bad)
    with pytest.raises(error, match=match):
        parse_training_config(bad, str(tmp_path))


def test_token_budget_smaller_than_one_batch_fails_before_training(tmp_path) -> None:
    from uniter_fast.pretraining.data import DataBuilder

    with open(os.path.join(REPO, "configs", "pretrain-tiny.json"), encoding="utf-8") as f:
        raw = json.load(f)
    raw["train_batch_size"] = 20
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    cfg = load_training_config(str(path))
    with pytest.raises(ValueError, match="train_batch_size=20 tokens is too small for dataset 'synth'"):
        DataBuilder(cfg, 0, 1, 0).train_stream(1)


def test_cli_rejects_bad_config_before_training(tmp_path) -> None:
    with open(os.path.join(REPO, "configs", "pretrain-tiny.json"), encoding="utf-8") as f:
        raw = json.load(f)
    raw["train_datasets"][0]["tasks"][0] = "itmm"
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "uniter_fast", "pretrain.py"), "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0
    assert "unknown task 'itmm'" in proc.stderr
    assert "pretrain:" not in proc.stderr  # no progress bar: training never started


def ds_base() -> dict:
    with open(os.path.join(REPO, "ds.json"), encoding="utf-8") as f:
        return json.load(f)


def test_ds_json_is_completed_from_training_config(raw, tmp_path) -> None:
    cfg = parse_training_config({**raw, "learning_rate": 3e-4}, str(tmp_path))
    ds = complete_ds_config(ds_base(), cfg)
    params = ds["optimizer"]["params"]
    assert params["lr"] == 3e-4 and params["betas"] == [0.9, 0.98] and params["eps"] == 1e-6
    assert params["weight_decay"] == 0.01 and ds["gradient_clipping"] == 5.0
    assert ds["zero_optimization"]["stage"] == 2 and ds["train_micro_batch_size_per_gpu"] == 1
    assert "lr" not in ds_base()["optimizer"]["params"]  # the input is not modified


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(scheduler={"type": "WarmupDecayLR"}), "remove 'scheduler'"),
        (lambda d: d.update(train_batch_size=64), "remove 'train_batch_size'"),
        (lambda d: d["optimizer"]["params"].update(lr=1e-4), "remove optimizer.params.lr"),
        (lambda d: d.update(optimizer={"type": "SGD"}), "'optimizer' must be"),
        (lambda d: d.update(gradient_accumulation_steps=0), "gradient_accumulation_steps must be an integer >= 1"),
        (lambda d: d.update(train_micro_batch_size_per_gpu=4), "train_micro_batch_size_per_gpu must be 1"),
    ],
)
def test_bad_ds_config(raw, tmp_path, edit, match) -> None:
    cfg = parse_training_config(raw, str(tmp_path))
    ds = ds_base()
    edit(ds)
    with pytest.raises(ValueError, match=match):
        complete_ds_config(ds, cfg)
