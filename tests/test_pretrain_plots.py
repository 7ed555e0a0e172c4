"""The run's pictures: curves.png from the logs, alignment.png from a model and validation pairs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from uniter_fast.config import UniterConfig
from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb, build_corpus
from uniter_fast.data.datasets import DetectFeatTxtTokDataset
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.pretraining.plots import (
    alignment,
    pick_pairs,
    plot_alignment,
    plot_curves,
    region_names,
    vocab_lookup,
)


def _records() -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    tasks = ["itm_s", "mlm_s", "mrfr_s", "mrckl_s"]
    train = [{"step": s, "task": tasks[s % 4], "lr": 1e-3, "loss": float(1 + rng.random())} for s in range(1, 81)]
    val = []
    for step in (0, 40, 80):
        val += [
            {
                "step": step,
                "task": "itm_s",
                "loss": 0.69,
                "acc": 0.5 + step / 200,
                "ot_pos": 0.9 - step / 100,
                "ot_neg": 0.9,
            },
            {"step": step, "task": "mlm_s", "loss": 4.0 - step / 40, "acc": step / 100},
            {"step": step, "task": "mrfr_s", "loss": 1.4 - step / 200},
            {"step": step, "task": "mrckl_s", "loss": 0.004, "acc": step / 160},
        ]
    return train, val


def test_curves_png_has_a_panel_per_task_and_one_for_wra(tmp_path) -> None:
    train, val = _records()
    path = plot_curves(train, val, str(tmp_path / "curves.png"))
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 1000  # 2 rows x 3 panels
    assert image[..., :3].std() > 0.05  # something was drawn


def test_curves_mark_the_curriculum_phases(tmp_path) -> None:
    """A dotted gray line at each phase start, in every column of panels: the pixel column of step 50 turns gray."""
    train, val = _records()
    plain = imread(plot_curves(train, val, str(tmp_path / "plain.png")))[..., :3]
    marked = imread(plot_curves(train, val, str(tmp_path / "marked.png"), phase_starts=[50]))[..., :3]
    assert plain.shape == marked.shape
    changed = np.abs(marked - plain).max(-1) > 0.1
    columns = np.flatnonzero(changed.sum(0) > 0.3 * changed.shape[0] / 2)  # lines cross most of each row of panels
    assert len(columns) >= 3, columns  # one per panel column


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    paths = build_corpus(str(tmp_path_factory.mktemp("plots") / "c"), seed=9, n_train_images=6, n_val_images=6)
    dataset = DetectFeatTxtTokDataset(TxtTokLmdb(paths.txt_db_val), DetectFeatLmdb(paths.img_db))
    return paths, dataset


def test_pairs_and_plan_orientation(small) -> None:
    _, dataset = small
    pairs = pick_pairs(dataset, 3)
    assert len(pairs) == 3 and len({own for _, own, _ in pairs}) == 3
    assert all(own == dataset.img_fnames[i] and other != own for i, own, other in pairs)
    model = UniterForPretraining(UniterConfig.tiny(vocab_size=128))
    index, own, _ = pairs[0]
    out = alignment(model, dataset, index, own)
    words, regions = len(out["input_ids"]), dataset.img_db.name2nbb[own]
    assert out["plan"].shape == (words, regions) and out["soft_labels"].shape == (regions, 1601)
    # IPOT's plan has the uniform text marginal: every word sends 1/words of mass over the regions
    torch.testing.assert_close(out["plan"].sum(1), torch.full((words,), 1 / words), rtol=1e-4, atol=1e-6)
    assert out["dist"] > 0 and 0 < out["p_match"] < 1


def test_alignment_png_names_words_and_region_classes(small, tmp_path) -> None:
    paths, dataset = small
    names = region_names(paths.img_db)
    token = vocab_lookup(paths.txt_db_val)
    assert "cat" in names.values() and token(2) == "[CLS]"
    path = plot_alignment(
        UniterForPretraining(UniterConfig.tiny(vocab_size=128)),
        dataset,
        str(tmp_path / "a.png"),
        token,
        names,
        n_pairs=2,
    )
    assert os.path.getsize(path) > 10_000 and imread(path).shape[0] > 200


def test_the_train_extra_installs_what_the_default_run_draws_with() -> None:
    """The README's first command installs ``.[train]`` and runs the default pretraining, which draws its pictures
    with matplotlib at the end: the extra must bring it (without it the run failed after its last step)."""
    tomllib = pytest.importorskip("tomllib")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        extras = tomllib.load(f)["project"]["optional-dependencies"]
    assert any(req.startswith("matplotlib") for req in extras["train"]), extras["train"]


def test_a_finished_run_without_matplotlib_names_its_export_and_says_the_pictures_were_not_drawn(
    tmp_path, monkeypatch
) -> None:
    import sys

    from uniter_fast.pretraining.config import TrainingConfig
    from uniter_fast.pretraining.run import finished_run_lines

    monkeypatch.delitem(sys.modules, "uniter_fast.pretraining.plots", raising=False)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # ``import matplotlib.figure`` fails, as uninstalled
    lines = finished_run_lines(TrainingConfig(), UniterConfig.tiny(), str(tmp_path))
    assert lines[0] == f"consolidated fp32 weights: {tmp_path / 'pretrained'}"
    assert len(lines) == 2 and lines[1].startswith("pictures not drawn (curves.png, alignment.png)"), lines
    assert "matplotlib" in lines[1] and "pip install matplotlib" in lines[1], lines
