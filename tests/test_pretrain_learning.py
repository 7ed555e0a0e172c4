"""The default run (`deepspeed uniter_fast/pretrain.py --ds_config ds.json`) learns: a shortened schedule in CI, the
whole default run marked slow. Thresholds are the ones the run meets on the bundled corpus (docs/pretraining.md,
"What the default run learns"); ITM / WRA and MRC-kl do not reach the issue's targets yet and are only checked for
what they do show."""

from __future__ import annotations

import math
import os

import pytest
from matplotlib.image import imread

from tests.pretrain_runs import REPO, final_row, launcher, run
from uniter_fast.pretraining.trainer import read_jsonl

DEFAULT_CONFIG = os.path.join(REPO, "configs", "pretrain-tiny.json")
DS_CONFIG = os.path.join(REPO, "ds.json")
SHORT_STEPS = 500  # half the default schedule (its LR schedule shrinks with it)


def _default_run(tmp_path, steps: int | None = None):
    extra = ["--output_dir", str(tmp_path / "out")]
    if steps is not None:
        extra += ["--num_train_steps", str(steps)]
    proc = run(launcher("deepspeed"), DEFAULT_CONFIG, DS_CONFIG, extra=tuple(extra), timeout=1500)
    rows = {task: final_row(proc.stdout, f"{task}_synth") for task in ("itm", "mlm", "mrfr", "mrckl")}
    return proc, rows


def _check_pictures(proc, out_dir) -> None:
    last = proc.stdout.strip().splitlines()[-2:]
    for line, name in zip(last, ("curves.png", "alignment.png")):
        path = line.split(": ", 1)[1]
        assert path == os.path.join(out_dir, name) and imread(path).shape[0] > 300, line


def test_default_config_learns_on_a_short_schedule(tmp_path) -> None:
    """500 of the default 1000 steps (measured on the 2-core CPU: MLM accuracy 0.55-0.59, MRFR 0.62x its step-0
    loss, MRC-kl loss 0.56x)."""
    proc, rows = _default_run(tmp_path, SHORT_STEPS)
    assert f"final metrics after {SHORT_STEPS} steps (1 rank(s), ZeRO-2)" in proc.stdout
    assert rows["mlm"]["val_acc"] >= 0.45, rows["mlm"]
    assert rows["mrfr"]["val_loss"] <= 0.8 * rows["mrfr"]["val_loss_step_0"], rows["mrfr"]
    assert rows["mrckl"]["val_loss"] <= 0.7 * rows["mrckl"]["val_loss_step_0"], rows["mrckl"]
    assert {"val_acc", "val_ot_pos", "val_ot_neg"} <= set(rows["itm"]) and all(map(math.isfinite, rows["itm"].values()))
    steps = [r["step"] for r in read_jsonl(str(tmp_path / "out" / "validation.jsonl"))]
    assert steps[:4] == [0] * 4 and steps[-4:] == [SHORT_STEPS] * 4  # validated before training and at the end
    _check_pictures(proc, str(tmp_path / "out"))


@pytest.mark.slow
def test_default_run_meets_its_documented_figures(tmp_path) -> None:
    """The whole default run: MLM accuracy >= 0.6 and MRFR <= 0.8x its step-0 loss (README table)."""
    proc, rows = _default_run(tmp_path)
    assert rows["mlm"]["val_acc"] >= 0.6, rows["mlm"]
    assert rows["mrfr"]["val_loss"] <= 0.8 * rows["mrfr"]["val_loss_step_0"], rows["mrfr"]
    _check_pictures(proc, str(tmp_path / "out"))
