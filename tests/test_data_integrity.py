"""Nothing written is a failure and a failed build leaves nothing behind (the pretraining and task builders, the
extractor); LMDB integrity at open (a truncated or corrupted data.mdb is a DataError naming the db and the record,
never a signal); the side files and records checked as they are read."""

from __future__ import annotations

import json
import os
import struct

import msgpack
import msgpack_numpy
import numpy as np
import pytest
import torch
from PIL import Image

from tests.damage_helpers import (
    IMG_LMDB,
    META,
    ReaderProcess,
    image_arrays,
    leftovers,
    put_record,
    truncate,
    write_jsonl,
    write_npz_dir,
    write_pair,
    write_vocab,
)
from tests.extract_helpers import TINY, tiny_weights
from uniter_fast.build import main as build_main
from uniter_fast.data import DetectFeatLmdb, ImgDbWriter, TxtDbWriter, TxtTokLmdb
from uniter_fast.data.build import build_dbs
from uniter_fast.data.txt_db import encode_txt_record
from uniter_fast.errors import DataError
from uniter_fast.extract.run import extract_folder


@pytest.fixture(scope="module")
def reader():
    process = ReaderProcess()
    yield process
    process.close()


def _inputs(tmp_path, names=("im0", "im1")) -> tuple[str, str]:
    write_npz_dir(str(tmp_path / "feats"), list(names))
    return str(tmp_path / "feats"), write_vocab(str(tmp_path / "vocab.txt"))


def _nothing_left(out) -> None:
    assert not os.path.exists(out) and leftovers(os.path.dirname(out)) == []


# ------------------------------------------------------------------ nothing written = failure, nothing half-written
def test_pretrain_build_with_every_image_unreadable_fails_and_writes_nothing(tmp_path) -> None:
    (tmp_path / "feats").mkdir()
    for name in ("a", "b"):
        (tmp_path / "feats" / f"{name}.npz").write_bytes(b"not a zip file")
    captions = write_jsonl(str(tmp_path / "c.jsonl"), [{"id": "c0", "image": "a", "caption": "a dog"}])
    out = str(tmp_path / "db")
    with (
        pytest.warns(UserWarning, match="unreadable"),
        pytest.raises(
            DataError, match=r"features: none of the .npz files in '.*feats' is usable \(skipped: unreadable 2;"
        ),
    ):
        build_dbs(captions, str(tmp_path / "feats"), write_vocab(str(tmp_path / "v.txt")), out)
    _nothing_left(out)


def test_pretrain_build_with_every_caption_skipped_fails_and_writes_nothing(tmp_path) -> None:
    feats, vocab = _inputs(tmp_path)
    rows = [{"id": "c0", "image": "nowhere", "caption": "a dog"}, {"id": "c1", "image": "im0", "caption": "   "}]
    captions = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    with open(captions, "a") as f:
        f.write("{broken json\n")
    out = str(tmp_path / "db")
    with (
        pytest.warns(UserWarning),
        pytest.raises(
            DataError,
            match=r"captions '.*c.jsonl': no caption is usable \(skipped: empty_caption 1, malformed_line 1, "
            r"missing_image 1\); nothing written",
        ),
    ):
        build_main(["--captions", captions, "--features", feats, "--vocab", vocab, "--out", out])
    _nothing_left(out)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"captions '.*empty.jsonl': no caption is usable \(the file holds none\)"):
        build_dbs(str(tmp_path / "empty.jsonl"), feats, vocab, out)
    _nothing_left(out)


def test_pretrain_build_failing_after_some_records_leaves_nothing(tmp_path, monkeypatch) -> None:
    feats, vocab = _inputs(tmp_path)
    rows = [{"id": f"c{i}", "image": "im0", "caption": "a red dog"} for i in range(5)]
    captions = write_jsonl(str(tmp_path / "c.jsonl"), rows)
    add = TxtDbWriter.add

    def failing_add(self, id_, *args, **kwargs):
        if id_ == "c3":
            raise OSError(28, "No space left on device")
        return add(self, id_, *args, **kwargs)

    monkeypatch.setattr(TxtDbWriter, "add", failing_add)
    out = str(tmp_path / "db")
    with pytest.raises(OSError, match="No space left"):
        build_dbs(captions, feats, vocab, out)
    _nothing_left(out)


def _ve_args(tmp_path, annotations: str) -> list[str]:
    feats, vocab = _inputs(tmp_path)
    return ["--task", "ve", "--annotations", annotations, "--features", feats, "--vocab", vocab]


def test_task_build_with_empty_annotations_fails_and_writes_nothing(tmp_path) -> None:
    (tmp_path / "ve.jsonl").write_text("\n\n")
    out = str(tmp_path / "db")
    with pytest.raises(DataError, match=r"annotations '.*ve.jsonl': no ve record \(an empty file\?\); nothing written"):
        build_main([*_ve_args(tmp_path, str(tmp_path / "ve.jsonl")), "--out", out])
    _nothing_left(out)


def test_task_build_failing_after_some_records_leaves_nothing(tmp_path) -> None:
    rows = [{"id": f"p{i}", "image": f"im{i % 2}", "hypothesis": "a red dog", "label": "neutral"} for i in range(4)]
    rows[2]["label"] = "maybe"
    ann = write_jsonl(str(tmp_path / "ve.jsonl"), rows)
    out = str(tmp_path / "db")
    with pytest.raises(DataError, match=r"ve.jsonl line 3: field 'label' must be one of"):
        build_main([*_ve_args(tmp_path, ann), "--out", out])  # fails once both img_dbs are written
    _nothing_left(out)
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n\xff\xfe{\n")
    with pytest.raises(DataError, match=r"bad.jsonl line 2: not UTF-8 text"):
        build_main([*_ve_args(tmp_path / "x", str(tmp_path / "bad.jsonl")), "--out", out])
    _nothing_left(out)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("zip", r"features: '.*im1.npz' is unreadable \(BadZipFile"),
        ("missing", r"features: '.*im1.npz' lacks the arrays \['soft_labels'\]"),
        ("shape", r"features: '.*im1.npz' is rejected \(image 'im1.npz': features must have shape \[n, 2048\]"),
        ("dtype", r"features: '.*im1.npz' is rejected \(image 'im1.npz': norm_bb must be a floating-point array"),
        ("overflow", r"features: '.*im1.npz' is rejected \(image 'im1.npz' has NaN/inf values"),
    ],
)
def test_task_build_rejects_a_bad_feature_file_by_name(tmp_path, damage, message) -> None:
    rows = [{"id": f"p{i}", "image": f"im{i}", "hypothesis": "a red dog", "label": "neutral"} for i in range(2)]
    args = _ve_args(tmp_path, write_jsonl(str(tmp_path / "ve.jsonl"), rows))
    bad = tmp_path / "feats" / "im1.npz"
    arrays = image_arrays(np.random.default_rng(3), 12)
    if damage == "zip":
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        if damage == "missing":
            del arrays["soft_labels"]
        elif damage == "shape":
            arrays["features"] = arrays["features"][:, :1000]
        elif damage == "dtype":
            arrays["norm_bb"] = (arrays["norm_bb"] * 100).astype(np.int32)
        else:
            arrays["features"] = arrays["features"].astype(np.float32) * 1e6  # finite, but inf in float16
        np.savez(bad, **arrays)
    out = str(tmp_path / "db")
    with pytest.raises(DataError, match=message):
        build_main([*args, "--out", out])
    _nothing_left(out)


def test_extract_with_every_image_bad_fails(tmp_path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    (images / "b.png").write_bytes(b"not a png")
    weights = tmp_path / "w.pth"
    torch.save(tiny_weights(), weights)
    out = tmp_path / "feats"
    with (
        pytest.warns(UserWarning, match="skipped"),
        pytest.raises(
            DataError,
            match=r"images: none of the 2 images of '.*imgs' could be extracted \(the first, '.*a.jpg': .*; "
            r"all 2 listed in '.*failed.txt'\); nothing written",
        ),
    ):
        extract_folder(str(images), str(weights), str(out), config=TINY, num_workers=0, progress=False)
    assert sorted(os.listdir(out)) == ["failed.txt"]
    Image.new("RGB", (70, 90)).save(images / "c.png")  # one good image: the run succeeds, the bad ones are listed
    summary = extract_folder(str(images), str(weights), str(out), config=TINY, num_workers=0, progress=False)
    assert summary.written == 1 and len(summary.failed) == 2
    (tmp_path / "none").mkdir()
    with pytest.raises(DataError, match=r"images: '.*none' names no image \(extensions .jpg, .jpeg"):
        extract_folder(str(tmp_path / "none"), str(weights), str(out), config=TINY, progress=False)


# ------------------------------------------------------------------ LMDB integrity
def test_truncated_data_mdb_is_an_error_naming_the_db_not_a_signal(tmp_path, reader) -> None:
    txt, img = write_pair(str(tmp_path))
    data = os.path.join(img, IMG_LMDB, "data.mdb")
    size = os.path.getsize(data)
    truncate(data, size - 4096)
    answer = reader.read(txt, img)
    assert answer.get("error") == "DataError", answer
    assert answer["message"] == (
        f"LMDB {os.path.join(img, IMG_LMDB)!r} is truncated or damaged: data.mdb holds {size - 4096} bytes, its pages "
        f"need {size}; copy it again or rebuild it"
    )
    txt, img = write_pair(str(tmp_path / "again"))
    truncate(os.path.join(txt, "data.mdb"), 3000)  # not even the two meta pages: LMDB itself refuses it
    answer = reader.read(txt, img)
    assert answer["error"] == "DataError" and answer["message"].startswith(f"LMDB {txt!r} is corrupted or not an LMDB")


def test_corrupted_data_mdb_is_an_error_naming_the_db_and_the_record(tmp_path, reader) -> None:
    txt, img = write_pair(str(tmp_path))
    with open(os.path.join(txt, "data.mdb"), "r+b") as f:  # the one leaf page (page 2) marked as an overflow page
        f.seek(2 * 4096 + 10)
        f.write(struct.pack("<H", 4))
    answer = reader.read(txt, img)
    assert answer == {
        "error": "DataError",
        "user_error": True,
        "message": f"LMDB {txt!r}: record 't0' cannot be read (mdb_get: MDB_CORRUPTED: Located page was wrong type); "
        "rebuild it",
    }


def test_not_a_database(tmp_path) -> None:
    txt, _ = write_pair(str(tmp_path))
    os.remove(os.path.join(txt, "data.mdb"))
    with pytest.raises(DataError, match=rf"LMDB {txt!r} has no data.mdb \(not a database"):
        TxtTokLmdb(txt)
    with open(os.path.join(txt, "data.mdb"), "wb") as f:
        f.write(os.urandom(3 * 4096))
    with pytest.raises(DataError, match=rf"LMDB {txt!r} is corrupted or not an LMDB database \(.*MDB_INVALID"):
        TxtTokLmdb(txt)


# ------------------------------------------------------------------ side files and records
@pytest.mark.parametrize(
    "file, content, message",
    [
        ("meta.json", "{", r"txt_db meta file '.*meta.json' is not valid JSON: .*line 1,? column 2"),
        ("meta.json", {**META, "CLS": "2"}, r"txt_db meta file '.*meta.json': 'CLS' must be an integer id, got '2'"),
        ("meta.json", {**META, "v_range": [5]}, r"'v_range' must be \[lo, hi\] with 0 <= lo <= hi, got \[5\]"),
        ("id2len.json", ["t0"], r"txt_db length file '.*id2len.json' must be a JSON object of name -> count, got list"),
        ("id2len.json", {"t0": 1.5}, r"txt_db length file '.*id2len.json': entry 't0' must be an integer >= 0"),
        ("id2len.json", None, r"txt_db length file '.*id2len.json' does not exist"),
    ],
)
def test_bad_txt_side_files(tmp_path, file, content, message) -> None:
    txt, _ = write_pair(str(tmp_path))
    path = os.path.join(txt, file)
    if content is None:
        os.remove(path)
    else:
        with open(path, "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=message):
        TxtTokLmdb(txt)


def test_bad_img_side_files_and_records(tmp_path) -> None:
    _, img = write_pair(str(tmp_path))
    nbb = os.path.join(img, "nbb_th0.2_max100_min10.json")
    with open(nbb) as f:
        name2nbb = json.load(f)
    with open(nbb, "w") as f:
        json.dump({**name2nbb, "im1.npz": 0}, f)
    with pytest.raises(DataError, match=r"img_db box-count file '.*nbb_th0.2.*': entry 'im1.npz' must be an integer"):
        DetectFeatLmdb(img)
    with open(nbb, "w") as f:
        json.dump({**name2nbb, "im1.npz": 40}, f)
    db = DetectFeatLmdb(img)
    with pytest.raises(DataError, match=r"image 'im1.npz' has \d+ boxes, its nbb file entry says 40"):
        db.views("im1.npz")
    lmdb_dir = os.path.join(img, IMG_LMDB)
    arrays = {k: v[:10] for k, v in image_arrays(np.random.default_rng(0), 10).items()}
    arrays["features"] = arrays["features"].astype(np.int16)
    from uniter_fast.data import lmdb_env

    lmdb_env.close_reader(lmdb_dir)
    put_record(lmdb_dir, "im0.npz", msgpack.packb(arrays, default=msgpack_numpy.encode, use_bin_type=True))
    put_record(lmdb_dir, "__keys__", b"[not json")
    with pytest.raises(DataError, match=r"image 'im0.npz': features must be a floating-point array, got dtype int16"):
        db.get_dump("im0.npz")
    os.remove(nbb)
    with pytest.raises(
        DataError, match=r"img_db '.*img' has neither the box-count file '.*img/nbb_th0.2_max100_min10.json'"
    ):
        DetectFeatLmdb(img)
    gt = str(tmp_path / "gt")
    with ImgDbWriter(gt, conf_th=-1, num_bb=100) as writer:  # no nbb file: the reader lists the images by __keys__
        writer.add("im0.npz", **image_arrays(np.random.default_rng(1), 5))
    put_record(os.path.join(gt, "feat_numbb100"), "__keys__", b"[not json")
    with pytest.raises(DataError, match=r"img_db '.*feat_numbb100': the '__keys__' record is not JSON"):
        DetectFeatLmdb(gt, conf_th=-1, num_bb=100)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"input_ids": "5 6 7", "img_fname": "im0.npz"}, r"record 't1': 'input_ids' must be a list of integers"),
        ({"input_ids": [5, 6.5], "img_fname": "im0.npz"}, r"record 't1': 'input_ids' must be a list of integers"),
        ({"input_ids": [5, 6], "img_fname": 3}, r"record 't1': 'img_fname' must be a name or a list of names"),
        ({"input_ids": [5, 6]}, r"record 't1' lacks 'input_ids' or 'img_fname'"),
    ],
)
def test_bad_txt_records(tmp_path, record, message) -> None:
    txt, _ = write_pair(str(tmp_path))
    put_record(txt, "t1", encode_txt_record(record))
    db = TxtTokLmdb(txt)
    assert db["t0"]["input_ids"]  # the other records still read
    with pytest.raises(DataError, match=rf"txt_db {txt!r}: {message}"):
        db["t1"]


def test_ids_lmdb_cannot_store_are_refused_by_line(tmp_path) -> None:
    rows = [{"id": "", "image": "im0", "hypothesis": "a red dog", "label": "neutral"}]
    out = str(tmp_path / "db")
    with pytest.raises(DataError, match=r"ve.jsonl line 1: text id '' is empty or longer than 511 bytes"):
        build_main([*_ve_args(tmp_path, write_jsonl(str(tmp_path / "ve.jsonl"), rows)), "--out", out])
    _nothing_left(out)
    captions = [{"id": "", "image": "im0", "caption": "a dog"}, {"id": "c1", "image": "im0", "caption": "a dog"}]
    with pytest.warns(UserWarning, match="captions line 1: text id '' is empty"):
        report = build_dbs(write_jsonl(str(tmp_path / "c.jsonl"), captions), *_inputs(tmp_path / "x"), out)
    assert report["texts"] == 1 and report["skipped_texts"]["malformed_line"] == 1
