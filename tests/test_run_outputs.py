"""A run's output dir: a previous run there is refused (before start-up) unless --resume or --overwrite is given,
--overwrite removes exactly that run's files, --stop_after's checks, and the logs a killed run leaves (a cut-off last
line). Kills at every point of real runs: tests/test_pretrain_distributed.py and tests/test_tasks_e2e.py."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from tests.pretrain_runs import REPO
from uniter_fast.errors import ConfigError, DataError
from uniter_fast.finetuning.config import FinetuneConfig
from uniter_fast.pretraining.config import TrainingConfig
from uniter_fast.training.cli import add_run_arguments, apply_run_arguments
from uniter_fast.training.logs import logged_results, read_jsonl, truncate_log
from uniter_fast.training.loop import Trainer
from uniter_fast.training.outputs import RUN_FILES, prepare_output_dir, previous_run, run_outputs

RUN = ["alignment.png", "ckpt", "curves.png", "pretrained", "tb", "train_steps.jsonl", "validation.jsonl"]
LEFTOVERS = [".tmp-0a1b2c3d4e5f-pretrained", ".tmp-9f8e7d6c5b4a-train_steps.jsonl"]  # of atomic writes, killed
USERS = ["my_notes.txt", "results_eval", "runs.csv"]  # the user's own files, and evaluate.py's default output


def make_dir(out, run: bool = True, users: bool = True) -> None:
    """An output dir holding a finished pretraining run (and the leftovers of a killed export) and the user's files."""
    out.mkdir(parents=True, exist_ok=True)
    for name in (RUN + LEFTOVERS if run else []) + (USERS if users else []):
        path = out / name
        if "." in name.lstrip("."):
            path.write_text("x")
        else:
            path.mkdir()
            (path / "inside").write_text("x")


def pretraining(out, checkpoint=None) -> TrainingConfig:
    return TrainingConfig(output_dir=str(out), checkpoint=checkpoint)


def test_a_run_writes_the_floors_files_and_its_recipes() -> None:
    assert run_outputs(pretraining("o")) == (*RUN_FILES, "pretrained", "curves.png", "alignment.png")
    assert FinetuneConfig(output_dir="o", task="vqa").run_outputs() == ("finetuned", "results")
    assert FinetuneConfig(output_dir="o", task="vcr_pretrain").run_outputs() == ("pretrained", "results")


def test_previous_run_lists_the_runs_entries_only(tmp_path) -> None:
    out = tmp_path / "out"
    assert previous_run(str(out), run_outputs(pretraining(out))) == []  # no dir
    make_dir(out, run=False)
    assert previous_run(str(out), run_outputs(pretraining(out))) == []  # the user's files are no run
    make_dir(out, users=False)
    assert previous_run(str(out), run_outputs(pretraining(out))) == sorted(RUN + LEFTOVERS)


def test_a_previous_run_is_refused_naming_the_dir_and_both_options(tmp_path) -> None:
    out = tmp_path / "out"
    make_dir(out)
    with pytest.raises(ConfigError) as err:
        prepare_output_dir(pretraining(out), resume=False, overwrite=False)
    message = str(err.value)
    assert f"output dir {str(out)!r} holds a previous run (" in message and "ckpt, curves.png" in message
    assert "give --resume to continue it, or --overwrite to remove those files and start over" in message
    assert sorted(os.listdir(out)) == sorted(RUN + LEFTOVERS + USERS)  # nothing touched
    prepare_output_dir(pretraining(out), resume=True, overwrite=False)  # continuing it is fine
    prepare_output_dir(pretraining(tmp_path / "new"), resume=False, overwrite=False)  # a new dir is fine


def test_resume_needs_a_previous_run_and_excludes_overwrite(tmp_path) -> None:
    out = tmp_path / "out"
    make_dir(out, run=False)
    with pytest.raises(ConfigError, match=r"--resume: output dir '.*out' holds no previous run \(none of \["):
        prepare_output_dir(pretraining(out), resume=True, overwrite=False)
    with pytest.raises(ConfigError, match="--resume and --overwrite exclude each other"):
        prepare_output_dir(pretraining(out), resume=True, overwrite=True)


def test_overwrite_removes_exactly_the_previous_run(tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    make_dir(out)
    monkeypatch.setenv("RANK", "1")  # a rank other than the launcher's 0 leaves the removal to rank 0
    prepare_output_dir(pretraining(out), resume=False, overwrite=True)
    assert sorted(os.listdir(out)) == sorted(RUN + LEFTOVERS + USERS)
    monkeypatch.setenv("RANK", "0")
    prepare_output_dir(pretraining(out), resume=False, overwrite=True)
    assert sorted(os.listdir(out)) == sorted(USERS) and (out / "results_eval" / "inside").is_file()
    prepare_output_dir(pretraining(out), resume=False, overwrite=True)  # nothing left to remove: fine


def test_overwrite_refuses_to_remove_the_runs_own_checkpoint(tmp_path) -> None:
    out = tmp_path / "out"
    make_dir(out)
    cfg = pretraining(out, checkpoint=str(out / "pretrained"))
    with pytest.raises(ConfigError, match="--overwrite would remove the run's own --checkpoint '.*pretrained'"):
        prepare_output_dir(cfg, resume=False, overwrite=True)
    assert (out / "pretrained" / "inside").is_file()


@pytest.mark.parametrize(
    "command",
    [["uniter_fast/pretrain.py"], ["uniter_fast/finetune.py", "--task", "vqa"]],
    ids=["pretrain", "finetune"],
)
def test_a_second_run_in_the_same_dir_says_what_to_do_before_start_up(tmp_path, command) -> None:
    """The README's command run again: one error naming the dir, --resume and --overwrite, before DeepSpeed starts."""
    out = tmp_path / "out"
    make_dir(out, users=False)
    cmd = [sys.executable, os.path.join(REPO, command[0]), *command[1:], "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and f"output dir {str(out)!r} holds a previous run" in last, proc.stderr[-3000:]
    assert "--resume" in last and "--overwrite" in last
    assert "TorchBackend" not in proc.stderr  # refused before the process group (DeepSpeed) starts


def run_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return parser.parse_args(list(argv))


def test_stop_after_must_be_a_step_after_the_start(tmp_path) -> None:
    with pytest.raises(ConfigError, match="--stop_after must be a step > 0, got 0"):
        apply_run_arguments(pretraining(tmp_path), run_args("--stop_after", "0"))
    trainer = Trainer(None, pretraining(tmp_path), None, None, None)
    trainer.step = 6  # resumed at step 6
    with pytest.raises(ConfigError, match="--stop_after 5 lies before step 6, where the run resumed"):
        trainer.train(stop_after=5)


def test_a_cut_off_last_line_is_dropped_and_a_bad_line_is_named(tmp_path) -> None:
    log = tmp_path / "validation.jsonl"
    records = [{"step": 0, "task": "itm", "loss": 0.7}, {"step": 4, "task": "itm", "loss": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 8, "task": "it')  # killed mid-append
    assert read_jsonl(str(log)) == records
    assert logged_results(str(log), 4) == {"itm": {"loss": 0.5}} and logged_results(str(log), 8) == {}
    assert truncate_log(str(log), 0) == records[:1]
    assert log.read_text() == json.dumps(records[0]) + "\n"
    log.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(DataError, match=r"validation.jsonl, line 2: not a JSON record"):
        read_jsonl(str(log))
