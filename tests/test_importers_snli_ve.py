"""SNLI-VE importer: JSON lines in the published schema, built through the CLI; ids, hypotheses, classes and image
keys checked against the original's rule, and the errors."""

from __future__ import annotations

import json

from tests.cli_helpers import run_cli
from tests.damage_helpers import write_jsonl, write_npz_dir, write_vocab
from uniter_fast.build import main as build_main
from uniter_fast.data import TxtTokLmdb
from uniter_fast.data.tokenizer import WordPiece

LINES = [
    ("3416050480.jpg#4r1e", "3416050480.jpg", "A dog is on the mat.", "entailment"),
    ("3416050480.jpg#4r1c", "3416050480.jpg", "A cat is on the mat.", "contradiction"),
    ("36979.jpg#0r1n", "36979.jpg", "The dog is red.", "neutral"),
]
CLASSES = {"contradiction": 0, "entailment": 1, "neutral": 2}  # the original's VE_ENT2IDX


def _line(pair_id: str, image: str, hypothesis: str, label: str) -> dict:
    """One line of snli_ve_<split>.jsonl (SNLI's fields + Flikr30kID)."""
    return {
        "annotator_labels": [label],
        "captionID": pair_id.split("#")[0] + "#4",
        "gold_label": label,
        "pairID": pair_id,
        "sentence1": "A dog sits on a red mat.",
        "sentence1_binary_parse": "( ( A dog ) ( sits ... ) )",
        "sentence1_parse": "(ROOT (S ...))",
        "sentence2": hypothesis,
        "sentence2_binary_parse": "( ... )",
        "sentence2_parse": "(ROOT (S ...))",
        "Flikr30kID": image,
    }


def _build(tmp_path, path: str, out: str, *extra: str) -> tuple[int, str, str]:
    if not (tmp_path / "feats").exists():
        write_npz_dir(str(tmp_path / "feats"), ["flickr30k_003416050480", "flickr30k_000000036979"])
        write_vocab(str(tmp_path / "vocab.txt"))
    argv = ["--from", "snli-ve", "--annotations", path, "--features", str(tmp_path / "feats")]
    return run_cli(build_main, argv + ["--vocab", str(tmp_path / "vocab.txt"), "--out", str(tmp_path / out), *extra])


def test_records_follow_the_original_rule(tmp_path) -> None:
    path = write_jsonl(str(tmp_path / "snli_ve_dev.jsonl"), [_line(*x) for x in LINES])
    status, out, err = _build(tmp_path, path, "db")
    assert status == 0, err
    assert json.loads(out) == {"texts": 3, "images": 2, "gt_images": 0}
    db = TxtTokLmdb(str(tmp_path / "db" / "txt"))
    toker = WordPiece(str(tmp_path / "vocab.txt"))
    for pair_id, image, hypothesis, label in LINES:
        record = db[pair_id]
        assert record["img_fname"] == f"flickr30k_{int(image.split('.')[0]):012d}.npz"
        assert record["input_ids"] == toker.encode(hypothesis)
        assert record["target"] == {"labels": [CLASSES[label]], "scores": [1.0]}
    assert json.load(open(tmp_path / "db" / "txt" / "ans2label.json")) == CLASSES


def test_errors_name_the_file_and_the_line(tmp_path) -> None:
    rows = [_line(*x) for x in LINES]
    rows[1]["gold_label"] = "-"
    path = write_jsonl(str(tmp_path / "bad.jsonl"), rows)
    status, _, err = _build(tmp_path, path, "db1")
    assert status == 2 and f"{path} line 2: field 'gold_label' must be one of" in err and "got '-'" in err
    rows = [_line(*x) for x in LINES]
    del rows[2]["sentence2"]
    write_jsonl(path, rows)
    status, _, err = _build(tmp_path, path, "db2")
    assert status == 2 and f"{path} line 3: missing field 'sentence2'" in err
    rows[2] = {**_line(*LINES[2]), "Flikr30kID": "img.png"}
    write_jsonl(path, rows)
    status, _, err = _build(tmp_path, path, "db3")
    assert status == 2 and f"{path} line 3 field 'Flikr30kID': 'img.png' is not a Flickr30k file name" in err
    status, _, err = _build(tmp_path, str(tmp_path / "absent.jsonl"), "db4")
    assert status == 2 and "absent.jsonl" in err and "does not exist" in err
