"""VCR importer: JSON lines in the published schema, built through the CLI; person references as tags, other
objects as their names, labels (-1 on test) and the two image keys checked against the original's rule, and the
errors."""

from __future__ import annotations

import json

from tests.cli_helpers import run_cli
from tests.damage_helpers import write_jsonl, write_npz_dir, write_vocab
from uniter_fast.build import main as build_main
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.vcr_db import VcrTxtTokLmdb

BASE = 1000
OBJECTS = ["person", "dog", "person", "mat"]
IMG_FN = "lsmdc_3001_21_JUMP_STREET/3001_21_JUMP_STREET_00.00.01.000-00.00.05.112@0.jpg"
IMAGE = "3001_21_JUMP_STREET_00.00.01.000-00.00.05.112@0"


def _line(annot_id: str, labels: bool = True) -> dict:
    """One line of VCR's <split>.jsonl (labels and the originals' extra fields absent from test)."""
    line = {
        "movie": "3001_21_JUMP_STREET",
        "objects": OBJECTS,
        "interesting_scores": [0],
        "answer_likelihood": "likely",
        "img_fn": IMG_FN,
        "metadata_fn": IMG_FN.replace(".jpg", ".json"),
        "question": ["Is", [0, 2], "on", "the", [3], "?"],
        "answer_choices": [["Yes", "."], [[0], "has", "a", [1], "."], ["No", "."], [[2], "is", "red", "."]],
        "rationale_choices": [["The", [3], "is", "red", "."], ["A", "dog", "."], [[1], "."], ["No", "."]],
        "annot_id": annot_id,
        "question_number": 1,
        "img_id": "train-0",
    }
    if labels:
        line.update(answer_label=1, rationale_label=2, answer_orig="", question_orig="", rationale_orig="")
    return line


def _ids(toker: WordPiece, tokens: list) -> list[int]:
    """The original's rule, written out: a person reference k -> tag k, another object -> its name as a word."""
    ids: list[int] = []
    for tok in tokens:
        if isinstance(tok, str):
            ids += toker.encode(tok)
        else:
            for k in tok:
                ids += [BASE + k] if OBJECTS[k] == "person" else toker.encode(OBJECTS[k])
    return ids


def _build(tmp_path, path: str, split: str, out: str, *extra: str) -> tuple[int, str, str]:
    if not (tmp_path / "vocab.txt").exists():
        write_vocab(str(tmp_path / "vocab.txt"))
    if not (tmp_path / f"feats_{split}").exists():
        write_npz_dir(str(tmp_path / f"feats_{split}"), [f"vcr_{split}_{IMAGE}"])
        write_npz_dir(str(tmp_path / f"gt_{split}"), [f"vcr_gt_{split}_{IMAGE}"])
    argv = ["--from", "vcr", "--annotations", path, "--features", str(tmp_path / f"feats_{split}")]
    argv += ["--gt_features", str(tmp_path / f"gt_{split}"), "--special_token_base", str(BASE)]
    return run_cli(build_main, argv + ["--vocab", str(tmp_path / "vocab.txt"), "--out", str(tmp_path / out), *extra])


def test_records_follow_the_original_rule(tmp_path) -> None:
    path = write_jsonl(str(tmp_path / "val.jsonl"), [_line("val-0"), _line("val-1")])
    status, out, err = _build(tmp_path, path, "val", "db")
    assert status == 0, err
    assert json.loads(out) == {"texts": 2, "images": 1, "gt_images": 1}
    db = VcrTxtTokLmdb(str(tmp_path / "db" / "txt"))
    toker, line = WordPiece(str(tmp_path / "vocab.txt")), _line("val-0")
    record = db["val-0"]
    assert record["img_fname"] == [f"vcr_gt_val_{IMAGE}.npz", f"vcr_val_{IMAGE}.npz"]
    assert record["input_ids"] == _ids(toker, line["question"])
    assert record["input_ids"][1:3] == [BASE + 0, BASE + 2]  # the two persons of [0, 2]
    assert record["input_ids_as"] == [_ids(toker, a) for a in line["answer_choices"]]
    assert record["input_ids_rs"] == [_ids(toker, r) for r in line["rationale_choices"]]
    assert (record["qa_target"], record["qar_target"]) == (1, 2)


def test_test_split_has_no_labels(tmp_path) -> None:
    path = write_jsonl(str(tmp_path / "test.jsonl"), [_line("test-0", labels=False)])
    status, _, err = _build(tmp_path, path, "test", "db")
    assert status == 0, err
    record = VcrTxtTokLmdb(str(tmp_path / "db" / "txt"))["test-0"]
    assert (record["qa_target"], record["qar_target"]) == (-1, -1)
    assert record["img_fname"] == [f"vcr_gt_test_{IMAGE}.npz", f"vcr_test_{IMAGE}.npz"]


def test_errors_name_the_file_and_the_line(tmp_path) -> None:
    bad = _line("val-1")
    bad["question"] = ["Is", [4], "?"]
    path = write_jsonl(str(tmp_path / "val.jsonl"), [_line("val-0"), bad])
    status, _, err = _build(tmp_path, path, "val", "db1")
    assert status == 2 and f"{path} line 2: field 'question': token [4] is neither a word nor a list of" in err
    bad = {**_line("val-1"), "answer_choices": _line("val-1")["answer_choices"][:3]}
    write_jsonl(path, [_line("val-0"), bad])
    status, _, err = _build(tmp_path, path, "val", "db2")
    assert status == 2 and f"{path} line 2: field 'answer_choices' must hold 4 choices, got 3" in err
    many = {**_line("val-1"), "objects": ["person"] * 82, "question": ["Is", [81], "?"]}
    write_jsonl(path, [many])
    status, _, err = _build(tmp_path, path, "val", "db3")
    assert status == 2 and f"{path} line 1: field 'question': token [81]" in err and "[0, 81)" in err


def test_stem_keys_name_the_extractors_files(tmp_path) -> None:
    write_vocab(str(tmp_path / "vocab.txt"))
    name = IMG_FN[: -len(".jpg")].replace("/", "__")  # extract --images vcr1images/ names
    for folder in ("feats_test", "gt_test"):
        write_npz_dir(str(tmp_path / folder), [name])
    path = write_jsonl(str(tmp_path / "test.jsonl"), [_line("test-0", labels=False)])
    status, _, err = _build(tmp_path, path, "test", "db", "--image_key", "{stem}", "--gt_image_key", "{stem}")
    assert status == 0, err
    assert VcrTxtTokLmdb(str(tmp_path / "db" / "txt"))["test-0"]["img_fname"] == [f"{name}.npz"] * 2
