"""NLVR2 importer: JSON lines in the published schema, built through the CLI; targets and the image pair checked
against the original prepro.py's rule, --missing_images, and the errors."""

from __future__ import annotations

import json

from tests.cli_helpers import run_cli
from tests.damage_helpers import write_jsonl, write_npz_dir, write_vocab
from uniter_fast.build import main as build_main
from uniter_fast.data import TxtTokLmdb
from uniter_fast.data.tokenizer import WordPiece

LINES = [
    ("dev-850-0-0", "The left image has a dog.", "True"),
    ("dev-850-0-1", "A cat is red.", "False"),
    ("dev-851-2-0", "Both mats are red.", "True"),
]


def _line(identifier: str, sentence: str, label: str) -> dict:
    """One line of lil-lab/nlvr's nlvr2/data/<split>.json."""
    return {
        "validation": {},
        "sentence": sentence,
        "left_url": "https://example.org/left.jpg",
        "writer": "103",
        "label": label,
        "right_url": "https://example.org/right.jpg",
        "synset": "n02110341",
        "query": "dog on mat",
        "identifier": identifier,
        "extra_validations": {},
    }


def _build(tmp_path, path: str, out: str, *extra: str) -> tuple[int, str, str]:
    if not (tmp_path / "feats").exists():
        names = [f"nlvr2_dev-{p}-img{s}" for p in ("850-0", "851-2") for s in (0, 1)]
        write_npz_dir(str(tmp_path / "feats"), names)
        write_vocab(str(tmp_path / "vocab.txt"))
    argv = ["--from", "nlvr2", "--annotations", path, "--features", str(tmp_path / "feats")]
    return run_cli(build_main, argv + ["--vocab", str(tmp_path / "vocab.txt"), "--out", str(tmp_path / out), *extra])


def test_records_follow_prepro(tmp_path) -> None:
    path = write_jsonl(str(tmp_path / "dev.json"), [_line(*x) for x in LINES])
    status, out, err = _build(tmp_path, path, "db")
    assert status == 0, err
    assert json.loads(out) == {"texts": 3, "images": 4, "gt_images": 0}
    db = TxtTokLmdb(str(tmp_path / "db" / "txt"))
    toker = WordPiece(str(tmp_path / "vocab.txt"))
    for identifier, sentence, label in LINES:
        record = db[identifier]
        pair = "-".join(identifier.split("-")[:-1])
        assert record["img_fname"] == [f"nlvr2_{pair}-img0.npz", f"nlvr2_{pair}-img1.npz"]
        assert record["target"] == (1 if label == "True" else 0)
        assert record["input_ids"] == toker.encode(sentence)


def test_missing_images_drop_their_examples(tmp_path) -> None:
    path = write_jsonl(str(tmp_path / "dev.json"), [_line(*x) for x in LINES])
    missing = tmp_path / "missing_nlvr2_imgs.json"
    missing.write_text(json.dumps(["nlvr2_dev-851-2-img1.npz"]))
    status, out, err = _build(tmp_path, path, "db", "--missing_images", str(missing))
    assert status == 0, err
    assert sorted(TxtTokLmdb(str(tmp_path / "db" / "txt")).id2len) == ["dev-850-0-0", "dev-850-0-1"]
    missing.write_text(json.dumps(["nlvr2_dev-851-2-img1"]))  # a key without .npz names the same image
    status, out, err = _build(tmp_path, path, "db2", "--missing_images", str(missing))
    assert status == 0, err
    assert sorted(TxtTokLmdb(str(tmp_path / "db2" / "txt")).id2len) == ["dev-850-0-0", "dev-850-0-1"]
    missing.write_text(json.dumps({"nlvr2_dev-851-2-img1.npz": 1}))
    status, _, err = _build(tmp_path, path, "db3", "--missing_images", str(missing))
    assert (
        status == 2 and f"--missing_images file {str(missing)!r}: expected a JSON list of image keys, got dict" in err
    )


def test_errors_name_the_file_and_the_line(tmp_path) -> None:
    rows = [_line(*x) for x in LINES]
    rows[1]["label"] = "yes"
    path = write_jsonl(str(tmp_path / "bad.json"), rows)
    status, _, err = _build(tmp_path, path, "db1")
    assert status == 2 and f"{path} line 2: field 'label' must be 'True' or 'False', got 'yes'" in err
    rows[1] = {**_line(*LINES[1]), "identifier": 850}
    write_jsonl(path, rows)
    status, _, err = _build(tmp_path, path, "db2")
    assert status == 2 and f"{path} line 2: field 'identifier' must be str, got 850" in err
    rows[1] = _line("dev-999-0-0", "A dog.", "True")
    write_jsonl(path, rows)
    status, _, err = _build(tmp_path, path, "db3")
    assert status == 2 and "nlvr2_dev-999-0-img0.npz" in err and "is missing" in err
