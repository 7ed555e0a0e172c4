"""End to end: ``finetune.py`` under the DeepSpeed launcher on a bundled set, then ``python -m uniter_fast.evaluate``
on its export; the slow tests cover exact resume, VCR's two stages and the default configs' learning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Any, Callable, Optional

import pytest

from tests.pretrain_runs import REPO, launcher

SCRIPT = os.path.join(REPO, "uniter_fast", "finetune.py")


def write_config(directory: str, task: str, steps: int, edit: Optional[Callable[[dict], None]] = None) -> str:
    """The task's tiny config with ``steps`` steps, a validation half-way, no checkpoint, output under
    ``directory``; absolute ``bundled:`` paths keep working from there."""
    name = task.replace("_", "-")
    with open(os.path.join(REPO, "configs", f"finetune-{name}-tiny.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg.update(
        output_dir=os.path.join(directory, "out"),
        num_train_steps=steps,
        valid_steps=max(1, steps // 2),
        warmup_steps=1,
        checkpoint=None,
    )
    if edit is not None:
        edit(cfg)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    return path


def run(command: list[str], cwd: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``command`` on one CPU thread; fails with the output on a non-zero exit."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    assert proc.returncode == 0, f"{command} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def finetune(config: str, *extra: str, ranks: Optional[list[str]] = None) -> subprocess.CompletedProcess:
    """``finetune.py --config`` under the DeepSpeed launcher (one rank)."""
    command = [*(ranks or launcher("deepspeed")), SCRIPT, "--config", config, "--num_workers", "0", *extra]
    return run(command, os.path.dirname(config))


def step_log(config: str) -> list[dict[str, Any]]:
    with open(config, encoding="utf-8") as f:
        out = json.load(f)["output_dir"]
    with open(os.path.join(out, "train_steps.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_finetune_vqa_then_evaluate(tmp_path) -> None:
    config = write_config(str(tmp_path), "vqa", steps=6, edit=lambda c: [c.pop("test_txt_db"), c.pop("test_img_db")])
    proc = finetune(config)
    records = step_log(config)
    assert [r["step"] for r in records] == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in records)
    assert "final vqa metrics after 6 steps (1 rank(s), ZeRO-2)" in proc.stdout
    out = tmp_path / "out"
    assert sorted(os.listdir(out / "results")) == ["val_results_3.json", "val_results_6.json"]
    answers = json.load(open(out / "results" / "val_results_6.json"))
    assert len(answers) == 300 and set(answers[0]) == {"answer", "question_id"}
    assert sorted(os.listdir(out / "finetuned")) == ["config.json", "model.safetensors", "model_step_6.pt", "task.json"]
    assert os.listdir(out / "tb")
    command = [sys.executable, "-m", "uniter_fast.evaluate", "--checkpoint", str(out / "finetuned"), "--config", config]
    proc = run(command, str(tmp_path))
    assert "vqa evaluation of" in proc.stdout and "\nval " in proc.stdout
    reloaded = json.load(open(out / "results_eval" / "val_results.json"))
    assert [a["question_id"] for a in reloaded] == [a["question_id"] for a in answers]


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = write_config(str(tmp_path / "a"), "nlvr2", steps=6)
    finetune(whole)
    split = write_config(str(tmp_path / "b"), "nlvr2", steps=6)
    finetune(split, "--stop_after", "3")
    finetune(split, "--resume")
    assert [r["loss"] for r in step_log(split)] == [r["loss"] for r in step_log(whole)]


@pytest.mark.slow
def test_vcr_two_stages_and_original_checkpoint(tmp_path) -> None:
    (tmp_path / "s1").mkdir()
    stage1 = write_config(str(tmp_path / "s1"), "vcr_pretrain", steps=6)
    proc = finetune(stage1)
    assert "final vcr_pretrain metrics after 6 steps" in proc.stdout
    assert "mlm_acc" in proc.stdout and "mrckl_acc" in proc.stdout and "mrfr_loss" in proc.stdout
    export = tmp_path / "s1" / "out" / "pretrained"
    (tmp_path / "s2").mkdir()
    stage2 = write_config(str(tmp_path / "s2"), "vcr", steps=4, edit=lambda c: c.update(checkpoint=str(export)))
    proc = finetune(stage2)
    assert "acc_q_ar" in proc.stdout
    original = tmp_path / "s2" / "out" / "finetuned" / "model_step_4.pt"
    proc = run(
        [sys.executable, "-m", "uniter_fast.evaluate", "--task", "vcr", "--checkpoint", str(original)], str(tmp_path)
    )
    assert "acc_qa" in proc.stdout
    assert (tmp_path / "s2" / "out" / "finetuned" / "results_eval" / "test_results.csv").is_file()


@pytest.mark.slow
def test_two_ranks_evaluate_every_example_once(tmp_path) -> None:
    config = write_config(str(tmp_path), "vqa", steps=4, edit=lambda c: c.update(train_batch_size=512))
    proc = finetune(config, ranks=launcher("deepspeed", ranks=2))
    assert "final vqa metrics after 4 steps (2 rank(s), ZeRO-2)" in proc.stdout
    answers = json.load(open(tmp_path / "out" / "results" / "val_results_4.json"))
    assert len(answers) == 300 and len({a["question_id"] for a in answers}) == 300
