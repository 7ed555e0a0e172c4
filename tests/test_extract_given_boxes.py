"""Given-box mode: features of the user's boxes (``Extractor.extract_boxes``, ``--boxes boxes.json``) equal the RoI
head's on the same RoIs, every box is kept in order (also by ``build``), and bad boxes files fail in one line."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.extract_helpers import TINY, TINY_CLI, synthetic_image, tiny_weights
from uniter_fast.data.build import build_dbs
from uniter_fast.data.img_db import DetectFeatLmdb, ImgDbWriter
from uniter_fast.data.tokenizer import SPECIAL_TOKENS
from uniter_fast.entry import run_command
from uniter_fast.errors import DataError
from uniter_fast.extract import Extractor
from uniter_fast.extract.cli import main
from uniter_fast.extract.given_boxes import project_boxes


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    return Extractor(tiny_weights(), config=TINY, fast=False, chunk=7)


def random_boxes(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """``count`` valid boxes [count, 4] float64 inside a height x width image, fractional corners."""
    x = np.sort(rng.uniform(0, width, (count, 2)), axis=1)
    y = np.sort(rng.uniform(0, height, (count, 2)), axis=1)
    x[:, 1] += 1.0
    y[:, 1] += 1.0
    return np.clip(np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1), 0, [width, height, width, height])


@pytest.mark.parametrize("sizes", [[(90, 140)], [(150, 100), (90, 260), (120, 120)]])
def test_features_equal_the_roi_head_on_the_same_rois(extractor, sizes) -> None:
    """The RPN's own RoIs given back in original pixels give the detector's features and class probabilities."""
    images = [synthetic_image(10 + i, h, w) for i, (h, w) in enumerate(sizes)]
    raw, scales = extractor.raw(images, attributes=True)
    given = [r.rois.double().numpy() / s for r, s in zip(raw, scales)]
    dets = extractor.detect_boxes(images, given, attributes=True)
    for r, s, g, det, image in zip(raw, scales, given, dets, images):
        same = (project_boxes(g, s, torch.device("cpu")) == r.rois).all(1)
        assert same.float().mean() > 0.9  # the round trip through original pixels is exact for most RoIs
        torch.testing.assert_close(det.features[same], r.features[same], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(det.cls_prob[same], r.cls_prob[same], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(det.attr_prob[same], r.attr_prob[same], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(det.conf, det.cls_prob[:, 1:].amax(1))
        torch.testing.assert_close(det.boxes, torch.from_numpy(g).float())
        assert det.size == image.shape[:2]


def test_every_box_kept_in_order_batch_or_not(extractor) -> None:
    rng = np.random.default_rng(0)
    images = [synthetic_image(1, 100, 170), synthetic_image(2, 140, 90)]
    boxes = [random_boxes(rng, 120, 100, 170), random_boxes(rng, 3, 140, 90)]  # 120 > MAX_BOXES: all kept
    records = extractor.extract_boxes(images, boxes, attributes=True)
    for image, image_boxes, record in zip(images, boxes, records):
        n = len(image_boxes)
        assert record["features"].shape == (n, 2048) and record["soft_labels"].shape == (n, 1601)
        assert record["conf"].shape == (n,) and record["attr_prob"].shape == (n, 401)
        assert record["given_boxes"].dtype == np.bool_ and record["given_boxes"].shape == ()
        h, w = image.shape[:2]
        expected = image_boxes / [w, h, w, h]
        np.testing.assert_allclose(record["norm_bb"][:, :4].astype(np.float64), expected, rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(record["norm_bb"][:, 4:].astype(np.float64), expected[:, 2:] - expected[:, :2],
                                   rtol=1e-3, atol=1e-3)  # fmt: skip
    alone = extractor.extract_boxes(images[1:], boxes[1:])[0]  # a batch of one image gives the same rows
    for key in ("features", "soft_labels", "conf"):
        np.testing.assert_allclose(alone[key].astype(np.float32), records[1][key].astype(np.float32), atol=1e-3)


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        ([[10, 10, 5, 20]], r"image 0: box 0 \[10.0, 10.0, 5.0, 20.0\] is empty"),
        ([[0, 0, 10, 10], [0, 0, 141, 50]], r"image 0: box 1 \[0.0, 0.0, 141.0, 50.0\] lies outside the 140 x 90"),
        ([[0, 0, 10]], r"image 0: box 0 must be 4 numbers"),
        ([], r"image 0: expected a non-empty list"),
    ],
)
def test_api_refuses_bad_boxes(extractor, boxes, message) -> None:
    with pytest.raises(DataError, match=message):
        extractor.extract_boxes([synthetic_image(3, 90, 140)], [np.array(boxes, dtype=np.float64)])


def test_imgdb_writer_keeps_every_given_box(tmp_path) -> None:
    rng = np.random.default_rng(1)
    n = 12
    arrays = {"features": rng.standard_normal((n, 2048)), "norm_bb": rng.uniform(0, 1, (n, 6)),
              "conf": np.zeros(n), "soft_labels": rng.uniform(0, 1, (n, 1601))}  # fmt: skip
    with ImgDbWriter(str(tmp_path / "img"), 0.2, 100, 10) as writer:
        writer.add("given.npz", **arrays, keep_all=True)
        writer.add("detected.npz", **arrays)
    assert writer.name2nbb == {"given.npz": n, "detected.npz": 10}  # clamp(#(conf > 0.2), 10, 100) = 10


def write_images(folder) -> None:
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(synthetic_image(4, 90, 140)).save(folder / "one.jpg")
    Image.fromarray(synthetic_image(5, 150, 100)).save(folder / "sub" / "two.png")
    Image.fromarray(synthetic_image(6, 60, 60)).save(folder / "skipped.png")


def run(images, weights: str, out, boxes, *extra: str) -> dict:
    return main(["--images", str(images), "--weights", weights, "--out", str(out), "--boxes", str(boxes),
                 "--no-progress", "--workers", "0", *TINY_CLI, *extra])  # fmt: skip


def test_cli_writes_given_boxes_and_build_keeps_them(tmp_path) -> None:
    weights = str(tmp_path / "tiny.pth")
    torch.save(tiny_weights("milvlg"), weights)
    write_images(tmp_path / "imgs")
    rng = np.random.default_rng(2)
    boxes = {"one.jpg": random_boxes(rng, 12, 90, 140).tolist(), "sub/two.png": [[0, 0, 100, 150], [10, 20, 30, 40]]}
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    summary = run(tmp_path / "imgs", weights, tmp_path / "feats", tmp_path / "boxes.json", "--attributes")
    assert summary["written"] == 2 and summary["failed"] == {}
    assert sorted(os.listdir(tmp_path / "feats")) == ["one.npz", "sub__two.npz"]  # only the images named
    with np.load(tmp_path / "feats" / "sub__two.npz") as npz:
        np.testing.assert_allclose(npz["norm_bb"].astype(np.float64), [[0, 0, 1, 1, 1, 1], [0.1, 0.2 / 1.5, 0.3,
                                   0.4 / 1.5, 0.2, 0.2 / 1.5]], atol=1e-3)  # fmt: skip
        assert bool(npz["given_boxes"]) and npz["attr_prob"].shape == (2, 401)
    (tmp_path / "captions.jsonl").write_text(
        "".join(
            json.dumps({"id": i, "image": name, "caption": "a photo"}) + "\n"
            for i, name in enumerate(["one", "sub__two"])
        )  # fmt: skip
    )
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join([*SPECIAL_TOKENS, "a", "photo"]) + "\n")
    build_dbs(str(tmp_path / "captions.jsonl"), str(tmp_path / "feats"), str(vocab), str(tmp_path / "db"))
    db = DetectFeatLmdb(str(tmp_path / "db" / "img"))
    assert db.name2nbb == {"one.npz": 12, "sub__two.npz": 2}  # every given box, not clamp(#(conf > 0.2), 10, 100)
    assert db["one.npz"][0].shape == (12, 2048)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"one.jpg": [[0, 0, 10, 10]], "three.jpg": [[0, 0, 5, 5]]}', r"image 'three.jpg' is not among the images"),
        ('{"one.jpg": [[0, 0, 10, 10], [5, 5, 141, 20]]}', r"image 'one.jpg': box 1 \[5.0, 5.0, 141.0, 20.0\] lies "),
        ('{"sub/two.png": [[30, 5, 30, 20]]}', r"image 'sub/two.png': box 0 \[30, 5, 30, 20\] is empty"),
        ('{"one.jpg": [[0, 0, 10]]}', r"image 'one.jpg': box 0 must be 4 numbers"),
        ('{"one.jpg": [0, 0, 10, 10]}', r"image 'one.jpg': box 0 must be 4 numbers"),
        ('[[0, 0, 10, 10]]', r"boxes.json': must be a non-empty JSON object"),
        ('{"one.jpg": [[0, 0, 10, 10]', r"boxes.json': not a readable JSON file"),
    ],
)  # fmt: skip
def test_cli_bad_boxes_file_is_one_line_and_exit_2(tmp_path, capsys, content, message) -> None:
    write_images(tmp_path / "imgs")
    (tmp_path / "boxes.json").write_text(content)
    argv = ["--images", str(tmp_path / "imgs"), "--weights", str(tmp_path / "absent.pth"), "--out",
            str(tmp_path / "feats"), "--boxes", str(tmp_path / "boxes.json"), "--no-progress"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, argv)  # checked before the weights are read
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: boxes ") and str(tmp_path / "boxes.json") in err[0], err
    assert __import__("re").search(message, err[0]), err[0]
