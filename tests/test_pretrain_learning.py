"""The default run (`deepspeed uniter_fast/pretrain.py --ds_config ds.json`) learns: CI runs the default config on a
shortened schedule (its LR schedule shrinks with it; its curriculum `phases` are kept, so the last, mixed phase is
shorter) against thresholds set below what that schedule measures; the whole default run is marked slow and checked
against the figures the README shows.

What is asserted is what the run learns on the bundled corpus (docs/pretraining.md, "What the default run learns"):
ITM accuracy and the WRA gap (mean OT distance of mismatched minus matched pairs), MLM accuracy, MRFR and MRC-kl
validation loss against their step-0 values, MRC-kl agreement of the predicted class with the soft label's argmax.
"""

from __future__ import annotations

import os

import pytest
from matplotlib.image import imread

from tests.pretrain_runs import REPO, final_row, launcher, run
from uniter_fast.training.logs import read_jsonl

DEFAULT_CONFIG = os.path.join(REPO, "configs", "pretrain-tiny.json")
DS_CONFIG = os.path.join(REPO, "ds.json")
TASKS = ("itm", "mlm", "mrfr", "mrckl")
SHORT_STEPS = 1200  # the 600 ITM + MRFR steps of the curriculum, then 600 of the mix (the default has 1900)


def _default_run(tmp_path, steps: int | None = None) -> tuple[str, dict[str, dict[str, float]]]:
    out_dir = str(tmp_path / "out")
    extra = ["--output_dir", out_dir]
    if steps is not None:
        extra += ["--num_train_steps", str(steps)]
    proc = run(launcher("deepspeed"), DEFAULT_CONFIG, DS_CONFIG, extra=tuple(extra), timeout=1500)
    rows = {task: final_row(proc.stdout, f"{task}_synth") for task in TASKS}
    last = proc.stdout.strip().splitlines()[-3:]  # the run names its pictures in its last lines (+ the launcher's)
    for name in ("curves.png", "alignment.png"):
        path = os.path.join(out_dir, name)
        assert any(line.endswith(f": {path}") for line in last), last
        assert imread(path).shape[0] > 300, path
    return proc.stdout, rows


def test_default_config_learns_on_a_short_schedule(tmp_path) -> None:
    """1200 steps of the default config, measured on the 2-core CPU (docs/pretraining.md): ITM accuracy 0.883
    (asserted >= 0.8), mean OT distance mismatched - matched 0.36 (asserted >= 0.2), MLM accuracy 0.41 (asserted
    >= 0.3, chance 0.0125), MRFR validation loss 0.40x its step-0 value (asserted <= 0.6x), MRC-kl agreement 0.32
    (asserted >= 0.2; the soft-label marginal's argmax gets 0.02) and loss 0.43x (asserted <= 0.6x). About 150 s of
    CPU."""
    stdout, rows = _default_run(tmp_path, SHORT_STEPS)
    assert f"final metrics after {SHORT_STEPS} steps (1 rank(s), ZeRO-2)" in stdout
    itm = rows["itm"]
    assert itm["val_acc"] >= 0.8 and itm["val_ot_neg"] - itm["val_ot_pos"] >= 0.2, itm
    assert rows["mlm"]["val_acc"] >= 0.3, rows["mlm"]
    assert rows["mrfr"]["val_loss"] <= 0.6 * rows["mrfr"]["val_loss_step_0"], rows["mrfr"]
    mrckl = rows["mrckl"]
    assert mrckl["val_acc"] >= 0.2 and mrckl["val_loss"] <= 0.6 * mrckl["val_loss_step_0"], mrckl
    steps = [r["step"] for r in read_jsonl(str(tmp_path / "out" / "validation.jsonl"))]
    assert steps[: len(TASKS)] == [0] * len(TASKS) and steps[-len(TASKS) :] == [SHORT_STEPS] * len(TASKS)


@pytest.mark.slow
def test_default_run_meets_its_documented_figures(tmp_path) -> None:
    """The whole default run (README table: ITM 0.883, OT gap 0.23, MLM 0.73, MRFR 0.33x, MRC-kl agreement 0.77)
    meets issue 12's targets: ITM accuracy >= 0.85, OT gap >= 0.05, MLM accuracy >= 0.6, MRFR <= 0.8x its step-0
    loss, MRC-kl agreement >= 0.5."""
    _, rows = _default_run(tmp_path)
    itm = rows["itm"]
    assert itm["val_acc"] >= 0.85 and itm["val_ot_neg"] - itm["val_ot_pos"] >= 0.05, itm
    assert rows["mlm"]["val_acc"] >= 0.6, rows["mlm"]
    assert rows["mrfr"]["val_loss"] <= 0.8 * rows["mrfr"]["val_loss_step_0"], rows["mrfr"]
    assert rows["mrckl"]["val_acc"] >= 0.5, rows["mrckl"]
