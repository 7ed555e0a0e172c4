"""The Python API: Extractor outputs and argument errors, and sharding a folder over ranks (RANK / WORLD_SIZE)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.extract_helpers import TINY, synthetic_image, tiny_weights
from uniter_fast.extract import Extractor
from uniter_fast.extract.roi_pool import torchvision_ops_available
from uniter_fast.extract.run import extract_folder


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    return Extractor(tiny_weights(), config=TINY)


def test_detections_are_in_original_pixels(extractor) -> None:
    image = synthetic_image(8, 90, 260)  # wide: the 214-pixel cap on the longer side decides the scale
    det = extractor.detect([image], attributes=True)[0]
    assert det.size == (90, 260) and det.boxes.shape == (16, 4)
    assert (det.boxes[:, :2] >= 0).all() and (det.boxes[:, 2] <= 260).all() and (det.boxes[:, 3] <= 90).all()
    torch.testing.assert_close(det.cls_prob.sum(1), torch.ones(16))
    assert (det.conf <= det.cls_prob[:, 1:].amax(1) + 1e-7).all() and (det.conf > 0).any()
    torch.testing.assert_close(det.attr_prob.sum(1), torch.ones(16))


def test_argument_errors(extractor) -> None:
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8 BGR"):
        extractor.extract([np.zeros((10, 10), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8 BGR"):
        extractor.extract([np.zeros((10, 10, 3), dtype=np.float32)])
    with pytest.raises(ValueError, match="dtype must be one of"):
        Extractor(tiny_weights(), dtype=torch.int8, config=TINY)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        Extractor(tiny_weights(), config=TINY, chunk=0)
    with pytest.raises(ValueError, match="ops must be one of"):
        Extractor(tiny_weights(), config=TINY, ops="cuda")
    no_attr = Extractor(tiny_weights("violetteshev"), config=TINY)
    with pytest.raises(ValueError, match="no attribute head"):
        no_attr.detect([synthetic_image(1, 60, 60)], attributes=True)
    if not torchvision_ops_available():
        with pytest.raises(ValueError, match="torchvision.ops does not load"):
            Extractor(tiny_weights(), config=TINY, ops="torchvision")


def test_ranks_share_a_folder(tmp_path, monkeypatch) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(3):
        Image.fromarray(synthetic_image(10 + i, 80, 100)).save(images / f"im{i}.png")
    weights = tmp_path / "w.pth"
    torch.save(tiny_weights(), weights)
    out = str(tmp_path / "feats")
    written = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        summary = extract_folder(str(images), str(weights), out, config=TINY, num_workers=0, progress=False)
        written[rank] = summary.written
        assert summary.images == (2 if rank == 0 else 1)
    assert written == {0: 2, 1: 1}
    assert not os.path.exists(os.path.join(out, "failed.rank0.txt"))
    assert sorted(os.listdir(out)) == ["im0.npz", "im1.npz", "im2.npz"]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    again = extract_folder(str(images), str(weights), out, config=TINY, num_workers=0, progress=False)
    assert again.skipped == 3 and again.written == 0


def test_degenerate_images_fail_by_name_and_the_run_goes_on(tmp_path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(synthetic_image(20, 3, 3)).save(images / "dot.png")  # every proposal below 16 x scale
    Image.fromarray(synthetic_image(21, 1, 500)).save(images / "line.png")  # resizes to 0 rows
    Image.fromarray(synthetic_image(22, 70, 90)).save(images / "fine.png")
    weights = tmp_path / "w.pth"
    torch.save(tiny_weights(), weights)
    with pytest.warns(UserWarning, match="skipped"):
        summary = extract_folder(str(images), str(weights), str(tmp_path / "out"), config=TINY, num_workers=0,
                                 batch_size=3, progress=False)  # fmt: skip
    assert summary.written == 1 and sorted(os.listdir(tmp_path / "out")) == ["failed.txt", "fine.npz"]
    reasons = dict(summary.failed)
    assert "no region proposal survived" in reasons[str(images / "dot.png")]
    assert "resizes to 0 x 214" in reasons[str(images / "line.png")]


def test_cpu_progress_bar_moves_per_image(tmp_path, capsys) -> None:
    """On the CPU a run takes one image per detector call (batch size 1 by default), so the bar shows 1/2 before 2/2."""
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        Image.fromarray(synthetic_image(30 + i, 80, 100)).save(images / f"im{i}.png")
    weights = tmp_path / "w.pth"
    torch.save(tiny_weights(), weights)
    summary = extract_folder(str(images), str(weights), str(tmp_path / "feats"), "cpu", config=TINY, num_workers=0)
    assert summary.written == 2
    err = capsys.readouterr().err
    assert "1/2" in err and "2/2" in err, err
