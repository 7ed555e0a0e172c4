"""txt_db / img_db: round trips, the original byte format, nbb clamping, the 7-d box, bad records, the build CLI."""

from __future__ import annotations

import io
import json
import os

import lmdb
import lz4.frame
import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch

from uniter_fast.build import main
from uniter_fast.config import IMG_DIM, IMG_LABEL_DIM
from uniter_fast.data import DataError, DetectFeatLmdb, ImgDbWriter, MlmDataset, TxtDbWriter, TxtTokLmdb
from uniter_fast.data.build import build_dbs
from uniter_fast.data.img_db import compute_num_bb
from uniter_fast.data.tokenizer import SPECIAL_TOKENS

META = {"bert": "test", "CLS": 2, "SEP": 3, "MASK": 4, "UNK": 1, "v_range": [5, 50]}


def _image(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    x1, y1 = rng.random((2, n)) * 0.5
    w, h = rng.random((2, n)) * 0.4 + 0.05
    return {
        "features": rng.random((n, IMG_DIM), dtype=np.float32) * 3,
        "norm_bb": np.stack([x1, y1, x1 + w, y1 + h, w, h], 1).astype(np.float32),
        "conf": np.sort(rng.random(n).astype(np.float32))[::-1].copy(),
        "soft_labels": rng.dirichlet(np.ones(IMG_LABEL_DIM) * 0.05, n).astype(np.float32),
    }


def _raw_lmdb(path: str, records: dict[str, bytes]) -> None:
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(path, map_size=1 << 30)
    with env.begin(write=True) as txn:
        for k, v in records.items():
            txn.put(k.encode(), v)
    env.close()


@pytest.mark.parametrize("compress", [False, True])
def test_img_round_trip_nbb_and_box(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = {f"im{i}.npz": _image(rng, n) for i, n in enumerate([3, 12, 40, 120])}
    with ImgDbWriter(str(tmp_path), compress=compress) as w:
        for name, arrs in images.items():
            assert w.add(name, **arrs)
    db = DetectFeatLmdb(str(tmp_path), compress=compress)
    for name, arrs in images.items():
        n = arrs["conf"].shape[0]
        expect_nbb = min(n, int(np.clip((arrs["conf"] > 0.2).sum(), 10, 100)))
        assert db.name2nbb[name] == expect_nbb
        feat, box = db[name]
        assert feat.dtype == torch.float32 and feat.shape == (expect_nbb, IMG_DIM)
        ref = arrs["features"][:expect_nbb].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(feat.numpy(), ref)
        bb = arrs["norm_bb"][:expect_nbb].astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(box[:, :6].numpy(), bb)
        np.testing.assert_allclose(box[:, 6].numpy(), bb[:, 4] * bb[:, 5], rtol=1e-6)
        dump = db.get_dump(name)
        np.testing.assert_array_equal(
            dump["soft_labels"], arrs["soft_labels"][:expect_nbb].astype(np.float16).astype(np.float32)
        )


def test_compute_num_bb_clamps():
    conf = np.linspace(1, 0, 200)
    assert compute_num_bb(conf, 0.2, 10, 100) == 100
    assert compute_num_bb(conf, 0.99, 10, 100) == 10
    assert compute_num_bb(conf, 0.5, 10, 100) == int((conf > 0.5).sum())
    assert compute_num_bb(conf, -1, 10, 100, num_bb=36) == 36


def test_txt_round_trip_and_side_files(tmp_path):
    rng = np.random.default_rng(2)
    recs = {f"t{i}": (rng.integers(5, 50, size=int(rng.integers(1, 70))).tolist(), f"im{i % 3}.npz") for i in range(40)}
    with TxtDbWriter(str(tmp_path), META) as w:
        for id_, (ids, img) in recs.items():
            assert w.add(id_, ids, img, sent="x")
    db = TxtTokLmdb(str(tmp_path), max_txt_len=60)
    assert set(db.id2len) == {k for k, (ids, _) in recs.items() if len(ids) <= 60}
    assert len(db.id2len) < len(recs)
    assert set(TxtTokLmdb(str(tmp_path), max_txt_len=-1).id2len) == set(recs)
    for id_, (ids, img) in recs.items():
        assert db[id_]["input_ids"] == ids and db[id_]["img_fname"] == img
    assert db.txt2img == {k: img for k, (_, img) in recs.items()}
    assert sorted(sum(db.img2txts.values(), [])) == sorted(recs)
    assert db.combine_inputs([7, 8]).tolist() == [2, 7, 8, 3]
    assert db.v_range == (5, 50)


def test_reads_spec_byte_format(tmp_path):
    """A db written by hand exactly as the original scripts do (lz4 msgpack text, msgpack_numpy / savez fp16)."""
    rng = np.random.default_rng(3)
    txt_dir, img_dir = tmp_path / "txt", tmp_path / "img"
    ids = {"a": [10, 11, 12], "b": [20, 21]}
    _raw_lmdb(
        str(txt_dir),
        {
            k: lz4.frame.compress(msgpack.dumps({"input_ids": v, "img_fname": "x.npz"}, use_bin_type=True))
            for k, v in ids.items()
        },
    )
    for fname, obj in (
        ("meta.json", META),
        ("id2len.json", {k: len(v) for k, v in ids.items()}),
        ("txt2img.json", {k: "x.npz" for k in ids}),
        ("img2txts.json", {"x.npz": list(ids)}),
    ):
        (txt_dir / fname).write_text(json.dumps(obj))
    arrs = {k: v.astype(np.float16) for k, v in _image(rng, 15).items()}
    nbb = compute_num_bb(arrs["conf"], 0.2, 10, 100)
    cut = {k: v[:nbb] for k, v in arrs.items()}
    _raw_lmdb(
        str(img_dir / "feat_th0.2_max100_min10"),
        {"x.npz": msgpack.dumps(cut, default=msgpack_numpy.encode, use_bin_type=True), "__keys__": b'["x.npz"]'},
    )
    with io.BytesIO() as buf:
        np.savez_compressed(buf, **cut, allow_pickle=True)  # the original stores 'allow_pickle' as an extra array
        _raw_lmdb(str(img_dir / "feat_th0.2_max100_min10_compressed"), {"x.npz": buf.getvalue()})
    (img_dir / "nbb_th0.2_max100_min10.json").write_text(json.dumps({"x.npz": nbb}))
    txt = TxtTokLmdb(str(txt_dir))
    assert txt["a"]["input_ids"] == [10, 11, 12]
    for compress in (False, True):
        feat, box = DetectFeatLmdb(str(img_dir), compress=compress)["x.npz"]
        np.testing.assert_array_equal(feat.numpy(), cut["features"].astype(np.float32))
        assert box.shape == (nbb, 7)
    # without the nbb side file the 'all' db is read and nbb computed from conf
    _raw_lmdb(
        str(tmp_path / "img2" / "all"),
        {"x.npz": msgpack.dumps(arrs, default=msgpack_numpy.encode), "__keys__": b'["x.npz"]'},
    )
    db = DetectFeatLmdb(str(tmp_path / "img2"))
    assert db.name2nbb == {"x.npz": nbb} and db["x.npz"][0].shape == (nbb, IMG_DIM)


def test_writer_skips_bad_images_with_counts(tmp_path):
    rng = np.random.default_rng(4)
    good = _image(rng, 12)
    bad_dim = dict(good, features=good["features"][:, :1024])
    zero = {k: v[:0] for k, v in good.items()}
    nan = dict(good, features=np.full_like(good["features"], np.nan))
    with ImgDbWriter(str(tmp_path)) as w:
        assert w.add("good.npz", **good)
        with pytest.warns(UserWarning, match="bad.npz"):
            assert not w.add("bad.npz", **bad_dim)
        with pytest.warns(UserWarning, match="zero boxes"):
            assert not w.add("zero.npz", **zero)
        with pytest.warns(UserWarning, match="nan.npz"):
            assert not w.add("nan.npz", **nan)
    assert w.skipped == {"bad_shape": 2, "non_finite": 1, "duplicate": 0}
    assert set(DetectFeatLmdb(str(tmp_path)).name2nbb) == {"good.npz"}


def test_txt_writer_skips_empty_caption(tmp_path):
    with TxtDbWriter(str(tmp_path), META) as w:
        assert w.add("a", [7], "x.npz")
        assert not w.add("b", [], "x.npz")
        assert not w.add("a", [8], "x.npz")
    assert w.skipped == {"empty_caption": 1, "duplicate_id": 1}
    assert list(TxtTokLmdb(str(tmp_path)).id2len) == ["a"]


def _small_pair(tmp_path, rng) -> tuple[str, str]:
    txt_dir, img_dir = str(tmp_path / "txt"), str(tmp_path / "img")
    with ImgDbWriter(img_dir) as w:
        for i in range(3):
            w.add(f"im{i}.npz", **_image(rng, 14))
    with TxtDbWriter(txt_dir, META) as w:
        for i in range(6):
            w.add(f"t{i}", rng.integers(5, 50, 6).tolist(), f"im{i % 3}.npz")
        w.add("orphan", [9, 9], "missing.npz")
    return txt_dir, img_dir


def test_bad_records_raise_naming_the_record(tmp_path):
    rng = np.random.default_rng(5)
    txt_dir, img_dir = _small_pair(tmp_path, rng)
    txt, img = TxtTokLmdb(txt_dir), DetectFeatLmdb(img_dir)
    with pytest.warns(UserWarning, match="1 texts"):
        ds = MlmDataset(txt, img)
    assert ds.skipped == {"missing_image": 1} and "orphan" not in ds.ids
    from uniter_fast.data import lmdb_env

    lmdb_env.close_reader(txt_dir)  # the readers opened both databases: close them before rewriting in place
    lmdb_env.close_reader(os.path.join(img_dir, "feat_th0.2_max100_min10"))
    env = lmdb.open(txt_dir, map_size=1 << 30)
    with env.begin(write=True) as t:
        t.put(b"t1", b"not lz4 at all")
        t.put(b"t2", lz4.frame.compress(msgpack.dumps({"input_ids": [], "img_fname": "im2.npz"})))
    env.close()
    env = lmdb.open(os.path.join(img_dir, "feat_th0.2_max100_min10"), map_size=1 << 30)
    with env.begin(write=True) as t:
        t.put(b"im0.npz", b"\x00garbage")
        t.put(
            b"im1.npz",
            msgpack.dumps(
                {k: v for k, v in _image(rng, 14).items() if k != "soft_labels"}
                | {"features": np.ones((14, 1000), np.float16)},
                default=msgpack_numpy.encode,
            ),
        )
    env.close()
    pos = {id_: i for i, id_ in enumerate(ds.ids)}
    with pytest.raises(DataError, match="'t0'.*'im0.npz'.*corrupted"):
        ds[pos["t0"]]
    with pytest.raises(DataError, match="'t1'.*corrupted"):
        ds[pos["t1"]]
    with pytest.raises(DataError, match="'t2'.*empty caption"):
        ds[pos["t2"]]
    with pytest.raises(DataError, match="'t4'.*'im1.npz'.*features must have shape"):
        ds[pos["t4"]]
    ds.img_fnames[pos["t5"]] = "gone.npz"
    with pytest.raises(DataError, match="'t5'.*'gone.npz'.*not in the database"):
        ds[pos["t5"]]


def _vocab(path) -> str:
    words = ["a", "dog", "cat", "red", "on", "the", "mat", "."]
    path.write_text("\n".join(SPECIAL_TOKENS + ["!"] + words + ["##s"]) + "\n")
    return str(path)


def test_build_cli(tmp_path, capsys):
    rng = np.random.default_rng(6)
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in range(3):
        np.savez(feats / f"im{i}.npz", **{k: v.astype(np.float16) for k, v in _image(rng, 20).items()})
    (feats / "broken.npz").write_bytes(b"nope")
    lines = [
        {"id": "c0", "image": "im0", "caption": "a red dog on the mat ."},
        {"id": "c1", "image": "im1.npz", "caption": "the cats"},
        {"id": "c2", "image": "im2", "caption": "   "},
        {"id": "c3", "image": "nowhere", "caption": "a dog"},
    ]
    cap = tmp_path / "captions.jsonl"
    cap.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken json\n")
    out = tmp_path / "db"
    with pytest.warns(UserWarning):
        main(
            [
                "--captions",
                str(cap),
                "--features",
                str(feats),
                "--vocab",
                _vocab(tmp_path / "vocab.txt"),
                "--out",
                str(out),
            ]
        )
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["texts"] == 2
    assert report["skipped_images"]["unreadable"] == 1
    assert report["skipped_texts"] == {"empty_caption": 1, "duplicate_id": 0, "malformed_line": 1, "missing_image": 1}
    txt = TxtTokLmdb(str(out / "txt"))
    vocab = (tmp_path / "vocab.txt").read_text().split()
    assert [vocab[i] for i in txt["c0"]["input_ids"]] == ["a", "red", "dog", "on", "the", "mat", "."]
    assert [vocab[i] for i in txt["c1"]["input_ids"]] == ["the", "cat", "##s"]
    assert txt.v_range == (vocab.index("!"), len(vocab))
    assert set(DetectFeatLmdb(str(out / "img")).name2nbb) == {"im0.npz", "im1.npz", "im2.npz"}
    with pytest.raises(FileExistsError, match="already exists"):
        build_dbs(str(cap), str(feats), str(tmp_path / "vocab.txt"), str(out))
