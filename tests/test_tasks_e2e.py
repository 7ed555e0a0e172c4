"""End to end: ``finetune.py`` under the DeepSpeed launcher on a bundled set, then ``python -m uniter_fast.evaluate``
on its export; a run killed (SIGKILL) in its evaluation or its export and resumed is the uninterrupted run; the slow
tests cover exact resume after --stop_after, kills at more seeded points (twice in a row too), VCR's two stages and
the default configs' learning."""

from __future__ import annotations

import dataclasses
import filecmp
import json
import math
import os
import random
import subprocess
import sys
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors.torch import load_file

from tests.kill_runs import choose, read_lines, run_script
from tests.pretrain_runs import REPO, launcher
from uniter_fast.tasks.bundled import task_sets_dir

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
    exported = ["config.json", "model.safetensors", "model_step_6.pt", "task.json", "vocab.txt"]
    assert sorted(os.listdir(out / "finetuned")) == exported  # trained on the bundled sets: their vocab comes along
    assert filecmp.cmp(out / "finetuned" / "vocab.txt", os.path.join(task_sets_dir(), "vocab.txt"), shallow=False)
    assert os.listdir(out / "tb")
    command = [sys.executable, "-m", "uniter_fast.evaluate", "--checkpoint", str(out / "finetuned"), "--config", config]
    proc = run(command, str(tmp_path))
    assert "vqa evaluation of" in proc.stdout and "\nval " in proc.stdout
    reloaded = json.load(open(out / "results_eval" / "val_results.json"))
    assert [a["question_id"] for a in reloaded] == [a["question_id"] for a in answers]


KILL_SEED = 23
KILL_STEPS = 6  # validations (and checkpoints) at steps 3 and 6


@dataclasses.dataclass
class Reference:
    """An NLVR2 run of KILL_STEPS steps, never stopped: its output dir, logs and kill points."""

    out: str
    steps: list[dict]
    validations: list[dict]
    points: list[list[str]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Reference:
    directory = str(tmp_path_factory.mktemp("uninterrupted"))
    config = write_config(directory, "nlvr2", steps=KILL_STEPS)
    out = os.path.join(directory, "out")
    _, points = run_script(SCRIPT, ["--config", config, "--num_workers", "0"], out, directory)
    validations = read_lines(os.path.join(out, "validation.jsonl"))
    return Reference(out, step_log(config), validations, points)


def assert_same_run(expected: Reference, config: str, logs: tuple[str, ...] = ("train_steps", "validation")) -> None:
    """The run of ``config`` equals the uninterrupted one: every record of ``logs`` (floats compared exactly), the
    export (every tensor ``torch.equal``, the same files) and every prediction file byte for byte."""
    with open(config, encoding="utf-8") as f:
        out = json.load(f)["output_dir"]
    for log in logs:
        assert read_lines(os.path.join(out, f"{log}.jsonl")) == read_lines(os.path.join(expected.out, f"{log}.jsonl"))
    assert sorted(os.listdir(os.path.join(out, "finetuned"))) == sorted(
        os.listdir(os.path.join(expected.out, "finetuned"))
    )
    for name, load in (("model.safetensors", load_file), (f"model_step_{KILL_STEPS}.pt", torch.load)):
        got, want = (load(os.path.join(d, "finetuned", name)) for d in (out, expected.out))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), name
    names = sorted(os.listdir(os.path.join(expected.out, "results")))
    assert sorted(os.listdir(os.path.join(out, "results"))) == names
    _, differ, _ = filecmp.cmpfiles(os.path.join(out, "results"), os.path.join(expected.out, "results"), names, False)
    assert not differ, differ


def kill_and_resume(directory: str, expected: Reference, index: int, torn: bool) -> str:
    """The NLVR2 run killed at point ``index`` of the uninterrupted run (``torn``: half-way through that write), then
    ``--resume``d; returns the config."""
    config = write_config(directory, "nlvr2", steps=KILL_STEPS)
    out = os.path.join(directory, "out")
    run_script(SCRIPT, ["--config", config, "--num_workers", "0"], out, directory, kill_at=index, torn=torn)
    proc = finetune(config, "--resume", ranks=[sys.executable])
    assert f"final nlvr2 metrics after {KILL_STEPS} steps" in proc.stdout, expected.points[index]
    return config


@pytest.mark.parametrize("phase_name", ["validation", "export"])
def test_kill_during_evaluation_or_export_resumes_exactly(tmp_path, uninterrupted, phase_name) -> None:
    """A seeded point among the writes of the validations (the predictions of each split, the log: before one, the
    evaluation is running) or of the export, before that write or half-way through it."""
    index, torn = choose(uninterrupted.points, "finetuned", KILL_SEED, phase_name)
    assert_same_run(uninterrupted, kill_and_resume(str(tmp_path), uninterrupted, index, torn))


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(4))
def test_kill_at_a_random_point_resumes_exactly(tmp_path, uninterrupted, draw) -> None:
    index, torn = choose(uninterrupted.points, "finetuned", KILL_SEED + 1 + draw)
    assert_same_run(uninterrupted, kill_and_resume(str(tmp_path), uninterrupted, index, torn))


@pytest.mark.slow
def test_killed_twice_resumes_exactly(tmp_path, uninterrupted) -> None:
    """Killed at a seeded point, then killed again early in the resumed run (rewriting its logs, restarting), then
    resumed to the end."""
    rng = random.Random(KILL_SEED)
    index, torn = choose(uninterrupted.points, "finetuned", KILL_SEED + 100)
    config = write_config(str(tmp_path), "nlvr2", steps=KILL_STEPS)
    args = ["--config", config, "--num_workers", "0", "--resume"]
    out = str(tmp_path / "out")
    run_script(SCRIPT, args[:-1], out, str(tmp_path), kill_at=index, torn=torn)
    run_script(SCRIPT, args, out, str(tmp_path), kill_at=rng.randrange(4), torn=rng.random() < 0.5)
    finetune(config, "--resume", ranks=[sys.executable])
    assert_same_run(uninterrupted, config)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path, uninterrupted) -> None:
    split = write_config(str(tmp_path), "nlvr2", steps=KILL_STEPS)
    proc = finetune(split, "--stop_after", "3", ranks=[sys.executable])
    assert "nlvr2 metrics at step 3 of 6" in proc.stdout and "--resume" in proc.stdout.splitlines()[-1]
    finetune(split, "--resume", ranks=[sys.executable])
    assert_same_run(uninterrupted, split)


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


def test_a_tower_distilled_alone_keeps_its_cross_encoder(tmp_path) -> None:
    """``finetune.py`` (ZeRO-2, the frozen cross-encoder beside the trained tower) from an itm export without a tower:
    the export's cross-encoder and heads are the checkpoint's bit for bit, its tower moved away from the copy of the
    encoder it started as, and the validation reads the tower's first stage."""
    from tests.tasks_helpers import export_task_model
    from uniter_fast.config import UniterConfig
    from uniter_fast.data import TxtTokLmdb
    from uniter_fast.tasks.bundled import resolve_bundled

    words = max(TxtTokLmdb(resolve_bundled(f"bundled:itm/txt_{s}"), -1).v_range[1] for s in ("train", "val", "test"))
    teacher = export_task_model("itm", {}, UniterConfig.tiny(vocab_size=words), str(tmp_path / "teacher"), noise=0.05)

    def edit(cfg: dict) -> None:
        cfg.update(checkpoint=teacher, first_stage_tower=True, train_first_stage_only=True, first_stage_loss="distill")
        cfg.pop("test_txt_db")
        cfg.pop("test_img_db")

    proc = finetune(write_config(str(tmp_path), "itm", steps=4, edit=edit))
    assert "first_stage_uniter of UniterForImageTextRetrieval from a copy of the checkpoint's encoder" in proc.stderr
    assert "first_stage_img_r16" in proc.stdout
    before = load_file(os.path.join(teacher, "model.safetensors"))
    after = load_file(str(tmp_path / "out" / "finetuned" / "model.safetensors"))
    assert {k for k in after if not k.startswith("first_stage_uniter.")} == set(before)
    for key, value in before.items():
        if key.startswith(("uniter.", "itm_output.", "rank_output.")):
            assert torch.equal(after[key], value), key
    assert not torch.equal(after["txt_proj.weight"], before["txt_proj.weight"])
    tower = "first_stage_uniter.encoder.layer.0.output.dense.weight"
    assert not torch.equal(after[tower], before["uniter.encoder.layer.0.output.dense.weight"])
