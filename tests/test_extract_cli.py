"""The command line on folders of images (npz format, resume, unreadable files, list files, selections) and the
whole pipeline on the photos bundled with matplotlib and scikit-image: extract -> build -> UNITER forward."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.extract_helpers import TINY_CLI, photo_paths, synthetic_image, tiny_weights
from uniter_fast import Model, UniterConfig
from uniter_fast.data.build import build_dbs
from uniter_fast.data.datasets import MrcDataset
from uniter_fast.data.img_db import DetectFeatLmdb
from uniter_fast.data.tokenizer import SPECIAL_TOKENS
from uniter_fast.data.txt_db import TxtTokLmdb
from uniter_fast.extract.cli import main

FIELDS = {"features": 2048, "norm_bb": 6, "soft_labels": 1601}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("weights") / "tiny-milvlg.pth"
    torch.save(tiny_weights("milvlg"), path)
    return str(path)


def run(images: str, weights: str, out: str, *extra: str) -> dict:
    return main(["--images", images, "--weights", weights, "--out", out, "--no-progress", "--workers", "0",
                 *TINY_CLI, *extra])  # fmt: skip


def check_npz(path: str, rows: int) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert set(arrays) == {"features", "norm_bb", "conf", "soft_labels"}
    assert all(a.dtype == np.float16 for a in arrays.values())
    for key, dim in FIELDS.items():
        assert arrays[key].shape == (rows, dim), key
    assert arrays["conf"].shape == (rows,)
    assert np.all(np.diff(arrays["conf"].astype(np.float32)) <= 0)  # top boxes by confidence, best first
    np.testing.assert_allclose(arrays["soft_labels"].astype(np.float32).sum(1), 1.0, atol=2e-2)
    bb = arrays["norm_bb"].astype(np.float32)
    assert (bb[:, :4] >= 0).all() and (bb[:, :4] <= 1).all()
    np.testing.assert_allclose(bb[:, 4], bb[:, 2] - bb[:, 0], atol=2e-3)
    return arrays


def test_folder_resume_and_unreadable_files(tmp_path, weights_file, capsys) -> None:
    images = tmp_path / "imgs"
    (images / "sub").mkdir(parents=True)
    Image.fromarray(synthetic_image(4, 90, 140)).save(images / "one.jpg")
    Image.fromarray(synthetic_image(5, 150, 100)).convert("L").save(images / "sub" / "two.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    out = str(tmp_path / "feats")
    with pytest.warns(UserWarning, match="broken.jpg"):
        summary = run(str(images), weights_file, out)
    assert json.loads(capsys.readouterr().out) == summary  # the summary is printed as JSON
    assert summary["images"] == 3 and summary["written"] == 2 and summary["skipped"] == 0
    assert list(summary["failed"]) == [str(images / "broken.jpg")]
    assert sorted(os.listdir(out)) == ["failed.txt", "one.npz", "sub__two.npz"]
    assert "broken.jpg" in (tmp_path / "feats" / "failed.txt").read_text()
    first = check_npz(os.path.join(out, "one.npz"), 16)  # 16 RoIs < 100: all of them, by confidence
    check_npz(os.path.join(out, "sub__two.npz"), 16)
    stamp = os.path.getmtime(os.path.join(out, "one.npz"))
    with pytest.warns(UserWarning, match="broken.jpg"):
        again = run(str(images), weights_file, out)
    assert again["skipped"] == 2 and again["written"] == 0 and os.path.getmtime(os.path.join(out, "one.npz")) == stamp
    (images / "broken.jpg").unlink()
    redo = run(str(images), weights_file, out, "--overwrite", "--box-selection", "anderson", "--prefix", "nlvr2_")
    assert redo["written"] == 2
    with np.load(os.path.join(out, "nlvr2_one.npz")) as npz:  # conf >= 0.2, at least 10: RoI order, same boxes
        conf = npz["conf"].astype(np.float32)
    passing = int((first["conf"] >= np.float16(0.2)).sum())
    assert len(conf) == max(10, passing)
    assert np.array_equal(np.sort(conf)[::-1], first["conf"].astype(np.float32)[: len(conf)])


def test_list_file_and_bad_arguments(tmp_path, weights_file) -> None:
    Image.fromarray(synthetic_image(6, 100, 100)).save(tmp_path / "a.png")
    listing = tmp_path / "list.txt"
    listing.write_text("a.png\n")
    out = str(tmp_path / "feats")
    summary = run(str(listing), weights_file, out, "--attributes", "--min-boxes", "5", "--max-boxes", "5")
    assert summary["written"] == 1
    with np.load(os.path.join(out, "a.npz")) as npz:
        assert npz["features"].shape == (5, 2048) and npz["attr_prob"].shape == (5, 401)
    with pytest.raises(FileNotFoundError, match="neither a folder nor a list file"):
        run(str(tmp_path / "nothing"), weights_file, out)
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        run(str(listing), weights_file, out, "--min-boxes", "50", "--max-boxes", "10")


def _vocab(path) -> str:
    words = ["a", "an", "woman", "man", "cat", "cup", "rocket", "on", "the", "of", "photo", "."]
    path.write_text("\n".join(SPECIAL_TOKENS + ["!"] + words) + "\n")
    return str(path)


def test_photos_extract_build_and_forward(tmp_path, weights_file) -> None:
    photos = photo_paths()
    assert len(photos) >= 1
    listing = tmp_path / "photos.txt"
    listing.write_text("\n".join(photos) + "\n")
    feats = str(tmp_path / "feats")
    summary = run(str(listing), weights_file, feats, "--batch-size", "3")
    assert summary["written"] == len(photos) and not summary["failed"]
    names = sorted(f[:-4] for f in os.listdir(feats))
    captions = tmp_path / "captions.jsonl"
    captions.write_text("\n".join(json.dumps({"id": f"c{i}", "image": n, "caption": "a photo of the cat ."})
                                  for i, n in enumerate(names)) + "\n")  # fmt: skip
    report = build_dbs(str(captions), feats, _vocab(tmp_path / "vocab.txt"), str(tmp_path / "db"))
    assert report["images"] == len(photos) and report["texts"] == len(photos)
    img_db = DetectFeatLmdb(str(tmp_path / "db" / "img"))
    for name in names:
        with np.load(os.path.join(feats, name + ".npz")) as npz:
            nbb = img_db.name2nbb[name + ".npz"]
            assert nbb == min(100, max(10, int((npz["conf"] > 0.2).sum())))
            assert np.array_equal(img_db.get_dump(name + ".npz")["features"], npz["features"][:nbb].astype(np.float32))
    dataset = MrcDataset(TxtTokLmdb(str(tmp_path / "db" / "txt")), img_db, seed=0)
    batch = dataset.batch(list(range(len(dataset))), position=0, layout="padded")
    model = Model(UniterConfig.tiny(vocab_size=32)).eval()
    with torch.no_grad():
        out = model.forward_batch(batch, img_masks=batch["img_masks"])
    assert out.shape[:2] == batch["attn_masks"].shape and torch.isfinite(out).all()
    assert batch["label_targets"].shape[1] == 1601
