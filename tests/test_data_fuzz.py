"""Property test of the readers and builders over random damage (hypothesis, a fixed example count, derandomized).

Readers (txt_db + img_db, read whole in a child process, where a signal cannot kill pytest): ``data.mdb`` truncated
or with flipped bits in its meta pages or inside one stored value, a record replaced by one of the wrong dtype, shape,
type or with a field missing, a side file (``meta.json``, ``id2len.json``, the nbb file) deleted, truncated, with
flipped bits or a wrong value. Builders: one ``.npz`` feature file, the captions or the annotation lines damaged alike.

Every case ends in the project's error type with a message naming the damaged file (or its database), or in a
well-formed result (every record read, of the promised types and shapes: LMDB keeps no checksums, so a flipped bit
inside a stored number reads as another number); never another exception, a signal or a partial output.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from datetime import timedelta
from typing import Any

import msgpack
import msgpack_numpy
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.damage_helpers import (
    IMG_LMDB,
    ReaderProcess,
    flip_bits,
    leftovers,
    put_record,
    truncate,
    write_jsonl,
    write_npz_dir,
    write_pair,
    write_vocab,
)
from uniter_fast.build import main as build_main
from uniter_fast.config import IMG_DIM, IMG_LABEL_DIM
from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.data.build import build_dbs
from uniter_fast.data.txt_db import decode_txt_record, encode_txt_record
from uniter_fast.errors import UserError

FUZZ = settings(
    max_examples=60,
    deadline=timedelta(seconds=60),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DIMS = {"features": IMG_DIM, "norm_bb": 6, "soft_labels": IMG_LABEL_DIM}
NBB_FILE = "nbb_th0.2_max100_min10.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """The undamaged pair, its raw records and the reader process."""
    root = str(tmp_path_factory.mktemp("pristine"))
    txt, img = write_pair(root)
    reader = ReaderProcess()
    answer = reader.read(txt, img)
    assert "result" in answer, answer
    yield root, answer["result"], reader
    reader.close()


def _raw_records(lmdb_dir: str) -> dict[str, bytes]:
    import lmdb

    env = lmdb.open(lmdb_dir, readonly=True, lock=False)
    with env.begin() as txn:
        records = {k.decode(): bytes(v) for k, v in txn.cursor()}
    env.close()
    return records


def _flips(start: int, end: int) -> st.SearchStrategy:
    """1 to 3 (offset, bit) flips of bytes in [start, end)."""
    return st.lists(st.tuples(st.integers(start, end - 1), st.integers(0, 7)), min_size=1, max_size=3)


def _truncate_or_flip(draw: Any, path: str, how: str) -> bool:
    """Cut ``path`` to a random shorter length ("truncate") or flip random bits of it ("flip"); False otherwise."""
    size = os.path.getsize(path)
    if how == "truncate":
        truncate(path, draw(st.integers(0, size - 1)))
    elif how == "flip":
        flip_bits(path, draw(_flips(0, size)))
    return how in ("truncate", "flip")


def _bad_value(draw: Any, which: str, raw: bytes) -> bytes:
    """A replacement for one stored record: cut, garbage, or decoded and re-encoded with a field gone wrong."""
    how = draw(st.sampled_from(["cut", "garbage", "field"]))
    if how == "cut":
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "garbage":
        return draw(st.binary(min_size=0, max_size=64))
    if which == "txt":
        record = decode_txt_record(raw)
        key = draw(st.sampled_from(["input_ids", "img_fname"]))
        value = draw(st.sampled_from([None, "x", 3, 2.5, [], [1.5, 2], ["a"], {"a": 1}, [[5, 6]], "missing"]))
        if value == "missing":
            del record[key]
        else:
            record[key] = value
        return encode_txt_record(record)
    arrays = msgpack.unpackb(raw, object_hook=msgpack_numpy.decode, raw=False)
    key = draw(st.sampled_from(["features", "norm_bb", "soft_labels"]))
    change = draw(st.sampled_from(["int16", "float64", "str", "1d", "3d", "cols", "rows", "empty", "missing"]))
    a = arrays[key]
    arrays[key] = {
        "int16": lambda: a.astype(np.int16),
        "float64": lambda: a.astype(np.float64),
        "str": lambda: a.astype(str)[:, :2],
        "1d": lambda: a[:, 0].copy(),
        "3d": lambda: a[:, :, None].copy(),
        "cols": lambda: a[:, :-1].copy(),
        "rows": lambda: a[:-1].copy(),
        "empty": lambda: a[:0].copy(),
        "missing": lambda: None,
    }[change]()
    if arrays[key] is None:
        del arrays[key]
    return msgpack.packb(arrays, default=msgpack_numpy.encode, use_bin_type=True)


def _damage_side_file(draw: Any, path: str) -> None:
    how = draw(st.sampled_from(["delete", "truncate", "flip", "value"]))
    if how == "delete":
        os.remove(path)
    elif not _truncate_or_flip(draw, path, how):
        with open(path) as f:
            table = json.load(f)
        key = draw(st.sampled_from(sorted(table)))
        table[key] = draw(st.sampled_from([None, "7", -1, 0, 1.5, [1], {"a": 1}]))
        if draw(st.booleans()):
            del table[key]
        with open(path, "w") as f:
            json.dump(table, f)


def _check_result(result: dict[str, Any]) -> None:
    """A well-formed read: every text of input_ids ints and a name, every image of float arrays [nbb, dim]."""
    for ids, fname in result["texts"].values():
        assert ids and all(type(i) is int for i in ids) and isinstance(fname, str)
    for read in result["images"].values():
        for how, arrays in read.items():
            rows = {shape[0] for _, shape, _ in arrays.values()}
            assert len(rows) == 1 and rows.pop() >= 1
            for key, (dtype, shape, _) in arrays.items():
                assert dtype.startswith("float") and shape[1:] == [DIMS[key]]
                assert how == "views" or dtype == "float32"


@FUZZ
@given(data=st.data())
def test_readers_end_in_a_named_error_or_a_well_formed_result(pristine, data) -> None:
    root, pristine_result, reader = pristine
    work = tempfile.mkdtemp(prefix="fuzz-")
    try:
        shutil.copytree(os.path.join(root, "txt"), os.path.join(work, "txt"))
        shutil.copytree(os.path.join(root, "img"), os.path.join(work, "img"))
        txt, img = os.path.join(work, "txt"), os.path.join(work, "img")
        which = data.draw(st.sampled_from(["txt", "img"]), "db")
        lmdb_dir = txt if which == "txt" else os.path.join(img, IMG_LMDB)
        mdb = os.path.join(lmdb_dir, "data.mdb")
        damage = data.draw(st.sampled_from(["truncate", "flip_meta", "flip_value", "record", "side_file"]), "damage")
        named = [txt if which == "txt" else img]  # the database as the user names it (paths inside it count)
        if damage == "truncate":
            _truncate_or_flip(data.draw, mdb, "truncate")
        elif damage == "flip_meta":  # LMDB's two meta pages
            flip_bits(mdb, data.draw(_flips(0, 2 * 4096)))
        elif damage in ("flip_value", "record"):
            records = {k: v for k, v in _raw_records(lmdb_dir).items() if k != "__keys__"}
            key = data.draw(st.sampled_from(sorted(records)), "key")
            raw = records[key]
            named.append(repr(key))
            if damage == "flip_value":  # inside one stored value, found in the file by its bytes
                with open(mdb, "rb") as f:
                    start = f.read().index(raw)
                flip_bits(mdb, data.draw(_flips(start, start + len(raw))))
            else:
                put_record(lmdb_dir, key, _bad_value(data.draw, which, raw))
        else:
            files = ["meta.json", "id2len.json"] if which == "txt" else [NBB_FILE]
            side = os.path.join(txt if which == "txt" else img, data.draw(st.sampled_from(files), "file"))
            _damage_side_file(data.draw, side)  # the error names the file or its database
        answer = reader.read(txt, img)
        assert "signal" not in answer and "exit" not in answer, answer
        if "error" in answer:
            assert answer["user_error"], answer
            assert all(n in answer["message"] for n in named), (named, answer)
        else:
            _check_result(answer["result"])
            if damage == "truncate":  # cutting the file cannot change what it says
                assert answer["result"] == pristine_result
    finally:
        shutil.rmtree(work)


def _damage_npz(draw: Any, path: str) -> None:
    how = draw(st.sampled_from(["truncate", "flip", "dtype", "shape", "missing"]))
    if not _truncate_or_flip(draw, path, how):
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
        key = draw(st.sampled_from(sorted(arrays)))
        if how == "dtype":
            arrays[key] = arrays[key].astype(draw(st.sampled_from([np.int32, np.float64, np.bool_, "U3"])))
        elif how == "shape":
            arrays[key] = arrays[key][..., :-1] if draw(st.booleans()) else arrays[key][:0]
        else:
            del arrays[key]
        np.savez_compressed(path, **arrays)


def _damage_lines(draw: Any, path: str) -> None:
    how = draw(st.sampled_from(["truncate", "flip", "field"]))
    if not _truncate_or_flip(draw, path, how):
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        row = draw(st.sampled_from(rows))
        key = draw(st.sampled_from(sorted(row)))
        if draw(st.booleans()):
            del row[key]
        else:
            row[key] = draw(st.sampled_from([None, 3, [], {"a": 1}, "", "im9"]))
        write_jsonl(path, rows)


def _lines(path: str) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_builders_end_in_a_named_error_or_a_complete_db(data) -> None:
    work = tempfile.mkdtemp(prefix="fuzz-")
    try:
        feats, vocab = os.path.join(work, "feats"), write_vocab(os.path.join(work, "vocab.txt"))
        write_npz_dir(feats, ["im0", "im1"])
        captions = write_jsonl(
            os.path.join(work, "captions.jsonl"),
            [{"id": f"c{i}", "image": f"im{i % 2}", "caption": "a red dog on the mat ."} for i in range(4)],
        )
        annotations = write_jsonl(
            os.path.join(work, "ve.jsonl"),
            [{"id": f"p{i}", "image": f"im{i % 2}", "hypothesis": "the cat", "label": "neutral"} for i in range(4)],
        )
        target = data.draw(st.sampled_from(["npz", "captions", "annotations"]), "target")
        if target == "npz":
            damaged = os.path.join(feats, data.draw(st.sampled_from(["im0.npz", "im1.npz"])))
            _damage_npz(data.draw, damaged)
        else:
            damaged = captions if target == "captions" else annotations
            _damage_lines(data.draw, damaged)
        out = os.path.join(work, "db")
        if target in ("npz", "captions"):  # the pretraining builder skips bad records and counts them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    report = build_dbs(captions, feats, vocab, out)
                except UserError as exc:
                    assert repr(damaged) in str(exc) or repr(feats) in str(exc), exc
                    assert not os.path.exists(out) and leftovers(work) == []
                else:
                    assert report["images"] + sum(report["skipped_images"].values()) == 2
                    assert report["texts"] + sum(report["skipped_texts"].values()) == _lines(captions)
                    txt_db, img_db = TxtTokLmdb(os.path.join(out, "txt")), DetectFeatLmdb(os.path.join(out, "img"))
                    assert len(txt_db.id2len) == report["texts"] and len(img_db.name2nbb) == report["images"]
                    for id_ in txt_db.id2len:
                        img_db.views(txt_db[id_]["img_fname"])
        if target in ("npz", "annotations"):  # a task builder refuses any bad record
            out = os.path.join(work, "task_db")
            args = ["--task", "ve", "--annotations", annotations, "--features", feats, "--vocab", vocab, "--out", out]
            try:
                report = build_main(args)
            except UserError as exc:
                assert repr(damaged) in str(exc) or repr(feats) in str(exc) or annotations in str(exc), exc
                assert not os.path.exists(out) and leftovers(work) == []
            else:
                assert report["texts"] == _lines(annotations)  # no annotation silently dropped
                txt_db = TxtTokLmdb(os.path.join(out, "txt"))
                assert all(txt_db[id_]["input_ids"] for id_ in txt_db.id2len)
    finally:
        shutil.rmtree(work)
