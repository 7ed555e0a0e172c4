"""Exact resume (after --stop_after, and after a kill -9 anywhere: at seeded points of the run, in the middle of a
checkpoint write, in validation, in the export), 2 ranks against 1 rank on the same global batches, gradient
accumulation against the original's summed gradients; more kill points, launchers and ZeRO-3 (marked slow)."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

from tests.kill_runs import choose, read_lines, run_script
from tests.pretrain_runs import (
    ALL_TASKS,
    SCRIPT,
    exported_weights,
    launcher,
    run,
    run_worker,
    script_args,
    step_log,
    write_configs,
)
from uniter_fast.training.distributed import SHM_WORKSPACE
from uniter_fast.training.logs import read_jsonl

STEPS = 8
KILL_SEED = 23


PHASE_ONE = {"mlm_synth": 1, "mrfr_synth": 1}


def _edit(cfg: dict) -> None:
    cfg.update(save_steps=2)  # a checkpoint every 2 steps: the cut and the kill below land between two of them
    # a two-phase curriculum whose boundary (after step 6) lies after the cut and the kill: the resumed runs cross it
    cfg["phases"] = [{"steps": 6, "mix": PHASE_ONE}, {"mix": {f"{t}_synth": 1 for t in ("itm", "mrc", "mrckl")}}]


@dataclasses.dataclass
class Reference:
    """A run of STEPS steps (accumulation 2, every task), never stopped: its logs, final weights and kill points."""

    cfg: str
    steps: list[dict]
    validations: list[dict]
    weights: dict[str, torch.Tensor]
    points: list[list[str]]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Reference:
    directory = str(tmp_path_factory.mktemp("uninterrupted"))
    cfg, ds = write_configs(directory, steps=STEPS, grad_accum=2, edit=_edit)
    out = os.path.join(directory, "out")
    _, points = run_script(SCRIPT, script_args(cfg, ds), out, directory)
    validations = read_lines(os.path.join(out, "validation.jsonl"))
    return Reference(cfg, step_log(cfg), validations, exported_weights(out), points)


def _assert_same_run(expected: Reference, cfg_path: str, out_dir: str, validations: bool = True) -> None:
    """Every logged value equal (floats compared exactly: the step log, and with ``validations`` the validation log)
    and every exported tensor ``torch.equal``; the export holds its files and nothing else."""
    assert step_log(cfg_path) == expected.steps
    if validations:
        assert read_lines(os.path.join(out_dir, "validation.jsonl")) == expected.validations
    weights = exported_weights(out_dir)
    assert weights.keys() == expected.weights.keys()
    differ = [k for k in weights if not torch.equal(weights[k], expected.weights[k])]
    assert not differ, f"weights differ from the uninterrupted run: {differ}"
    assert sorted(os.listdir(os.path.join(out_dir, "pretrained"))) == ["config.json", "model.safetensors"]


def test_resume_continues_bit_for_bit(tmp_path, uninterrupted) -> None:
    cfg, ds = write_configs(str(tmp_path), steps=STEPS, grad_accum=2, edit=_edit)
    proc = run(launcher("python"), cfg, ds, extra=("--stop_after", "5"))
    assert [r["step"] for r in step_log(cfg)] == [1, 2, 3, 4, 5]
    assert f"metrics at step 5 of {STEPS}" in proc.stdout and "final metrics" not in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("stopped at step 5 of 8 (--stop_after) with a checkpoint")
    assert "run the same command with --resume" in proc.stdout
    proc = run(launcher("python"), cfg, ds, extra=("--resume",))
    assert f"final metrics after {STEPS} steps" in proc.stdout and "stopped at" not in proc.stdout
    tasks = [r["task"] for r in step_log(cfg)]
    assert set(tasks[:6]) <= set(PHASE_ONE) and not set(tasks[6:]) & set(PHASE_ONE), tasks  # the phases hold
    assert len(set(tasks[5:])) > 1  # the continued part mixes tasks
    _assert_same_run(uninterrupted, cfg, str(tmp_path / "out"), validations=False)  # + the stop's validation


def _kill_and_resume(tmp_path, expected: Reference, index: int, torn: bool) -> str:
    """The run killed at point ``index`` of the uninterrupted run (``torn``: half-way through that write), then
    ``--resume``d: the same run as the uninterrupted one. Returns the resumed run's stderr."""
    cfg, ds = write_configs(str(tmp_path), steps=STEPS, grad_accum=2, edit=_edit)
    out = str(tmp_path / "out")
    run_script(SCRIPT, script_args(cfg, ds), out, str(tmp_path), kill_at=index, torn=torn)
    proc = run(launcher("python"), cfg, ds, extra=("--resume",))
    assert f"final metrics after {STEPS} steps" in proc.stdout, expected.points[index]
    _assert_same_run(expected, cfg, out)
    return proc.stderr


def test_kill_during_checkpoint_write_resumes_from_previous(tmp_path, uninterrupted) -> None:
    """Killed half-way through the model-state file of step 6's DeepSpeed checkpoint."""
    index = uninterrupted.points.index(["torch.save", "ckpt/step6/mp_rank_00_model_states.pt"])
    cfg, ds = write_configs(str(tmp_path), steps=STEPS, grad_accum=2, edit=_edit)
    run_script(SCRIPT, script_args(cfg, ds), str(tmp_path / "out"), str(tmp_path), kill_at=index, torn=True)
    ckpt = tmp_path / "out" / "ckpt"
    assert (ckpt / "latest").read_text() == "step4"  # the pointer still names the last complete checkpoint
    assert (ckpt / "step6" / "mp_rank_00_model_states.pt").is_file()  # the half-written file is there
    assert [r["step"] for r in step_log(cfg)] == list(range(1, 7))  # steps 5 and 6 ran before the kill
    proc = run(launcher("python"), cfg, ds, extra=("--resume",))
    assert "at step 4" in proc.stderr and f"final metrics after {STEPS} steps" in proc.stdout
    _assert_same_run(uninterrupted, cfg, str(tmp_path / "out"))


def test_kill_during_export_resumes_exactly(tmp_path, uninterrupted) -> None:
    """A seeded point among the writes of the export (after the last checkpoint): before one or half-way through it.
    The resumed run starts at the last step, reads its final validation back from the log and exports again."""
    stderr = _kill_and_resume(tmp_path, uninterrupted, *choose(uninterrupted.points, "pretrained", KILL_SEED, "export"))
    assert f"at step {STEPS}" in stderr


@pytest.mark.slow
@pytest.mark.parametrize("phase_name", ["train", "validation", "checkpoint", "pictures"])
def test_kill_in_each_part_of_the_run_resumes_exactly(tmp_path, uninterrupted, phase_name) -> None:
    _kill_and_resume(tmp_path, uninterrupted, *choose(uninterrupted.points, "pretrained", KILL_SEED, phase_name))


@pytest.mark.slow
@pytest.mark.parametrize("draw", range(6))
def test_kill_at_a_random_point_resumes_exactly(tmp_path, uninterrupted, draw) -> None:
    _kill_and_resume(tmp_path, uninterrupted, *choose(uninterrupted.points, "pretrained", KILL_SEED + 1 + draw))


def shm_workspaces() -> set[str]:
    """This user's DeepSpeed CPU all-reduce workspaces in /dev/shm (``training.distributed.SHM_WORKSPACE``)."""
    prefix = f"{os.path.basename(SHM_WORKSPACE)}_{os.getuid()}_"
    return {name for name in os.listdir(os.path.dirname(SHM_WORKSPACE)) if name.startswith(prefix)}


def test_two_ranks_follow_one_rank_on_the_same_global_batches(tmp_path) -> None:
    """ZeRO-2 over gloo, fp32, no dropout. Per step, 1 rank takes the whole global batch, each of 2 ranks half of it
    (equal loss denominators). The logged loss (mean over ranks) and the final weights must agree to float rounding:
    the global batch's gradient is summed in another order (one batch of 8 vs two of 4 plus an all-reduce), which
    changes the last bits, and 8 Adam steps carry that on. Measured: losses within 2e-6 relative, weights within 5e-6
    absolute; asserted: 1e-4 and 1e-4. A wrong reduction (sum instead of mean, one rank's loss only, unsynchronised
    optimizer shards) is off by far more."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    workspaces = shm_workspaces()
    run_worker(launcher("python"), "ranks", one)
    run_worker(launcher("deepspeed", ranks=2), "ranks", two)
    assert shm_workspaces() <= workspaces  # the ranks' DeepSpeed shared memory went back when they exited
    log_one, log_two = (read_jsonl(os.path.join(d, "train_steps.jsonl")) for d in (one, two))
    tasks = [r["task"] for r in log_one]
    assert tasks == [r["task"] for r in log_two] == ["itm", "mlm", "mrfr", "mrckl"] * 2
    for a, b in zip(log_one, log_two):
        for key in a:
            if key not in ("step", "task"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (key, a, b)
    assert log_one[-1]["loss"] != log_one[3]["loss"]
    w_one, w_two = exported_weights(one), exported_weights(two)
    for key in w_one:
        torch.testing.assert_close(w_two[key], w_one[key], rtol=0, atol=1e-4, msg=key)


def _assert_engine_grads_are_the_originals(grads: dict) -> None:
    """Per task, every gradient the engine handed its optimizer equals plain autograd's sum (rtol 1e-5)."""
    assert set(grads["engine"]) == set(grads["original"]) == {"itm", "mlm", "mrfr", "mrckl"}
    for task, expected in grads["original"].items():
        got = grads["engine"][task]
        assert got.keys() == expected.keys(), task
        assert max(float(g.abs().max()) for g in expected.values()) > 0, task
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-8, msg=f"{task} {name}")


def test_gradient_accumulation_sums_micro_batches_like_the_original(tmp_path) -> None:
    """3 micro-batches per step through Trainer.train_step: the gradient at the accumulation boundary equals the sum of
    the micro-batches' gradients of plain autograd (the original's apex delay_unscale accumulation), not their mean."""
    run_worker(launcher("python"), "accum", str(tmp_path))
    _assert_engine_grads_are_the_originals(torch.load(tmp_path / "grads.pt", weights_only=True))


def test_zero3_gathers_the_weights_the_heads_hand_to_the_losses(tmp_path) -> None:
    """The accumulation check under ZeRO-3 (one rank, fp32), each step after validation forwards of its task. The
    MLM / MRFR / MRC-kl forwards hand tied and head weights to the loss functions outside their modules' forwards,
    which ZeRO-3 gathers for backward only when registered (``external_parameters``; unregistered, the MRC-kl
    backward after validation fails). The parameters a task does not reach must get zero, not the gradient of the
    last step that reached them (``clear_zero3_gradients``; without it the MLM step hands ITM's head its ITM
    gradient again). The ZeRO-3 checkpoint (one model-state file per rank) consolidates to the engine's weights."""
    run_worker(launcher("python"), "zero3", str(tmp_path))
    saved = torch.load(tmp_path / "grads.pt", weights_only=True)
    _assert_engine_grads_are_the_originals(saved)
    assert saved["exported"].keys() == saved["trained"].keys()
    for name, value in saved["trained"].items():
        assert torch.equal(saved["exported"][name], value), name


@pytest.mark.slow
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
