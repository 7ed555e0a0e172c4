"""VQA v2 importer: files written in the published schema (questions + annotations JSON), built through the CLI;
the answer vocabulary, the soft targets and the image keys checked against the published rules computed here
(bottom-up-attention-vqa's compute_softscore.py), the train map reused for val / test, and the errors."""

from __future__ import annotations

import json
import os

import pytest

from tests.cli_helpers import run_cli
from tests.damage_helpers import write_npz_dir, write_vocab
from uniter_fast.build import main as build_main
from uniter_fast.data import TxtTokLmdb
from uniter_fast.data.vqa_answers import normalize_answer

# (question_id, image_id, question, multiple_choice_answer, the 10 annotators' answers)
TRAIN = [
    (10, 1, "What is on the mat?", "dog", ["dog"] * 6 + ["Dog."] * 2 + ["cat"] * 2),
    (11, 1, "How many dogs?", "two", ["two"] * 3 + ["2"] * 2 + ["three"] * 4 + ["a lot"]),
    (12, 2, "What is red?", "the mat", ["mat"] * 9 + ["rug"]),
    (13, 2, "Is it a dog?", "yes", ["yes"] * 10),
]
VAL = [
    (20, 3, "What animal?", "cat", ["cat"] * 7 + ["kitten"] * 3),
    (21, 3, "How many cats?", "2", ["2"] * 5 + ["1"] * 5),
]


def _write(tmp_path, subtype: str, rows: list, answers: bool = True) -> list[str]:
    """The questions file (and the annotations file) of ``rows`` as VQA v2 publishes them."""
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": {},
        "data_subtype": subtype,
        "questions": [{"image_id": i, "question": q, "question_id": qid} for qid, i, q, _, _ in rows],
    }
    paths = [str(tmp_path / f"v2_OpenEnded_mscoco_{subtype}_questions.json")]
    with open(paths[0], "w") as f:
        json.dump(questions, f)
    if answers:
        annotations = {
            "info": {},
            "license": {},
            "data_subtype": subtype,
            "annotations": [
                {
                    "question_type": "what",
                    "multiple_choice_answer": mc,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in enumerate(answers)
                    ],
                    "image_id": i,
                    "answer_type": "other",
                    "question_id": qid,
                }
                for qid, i, _, mc, answers in rows
            ],
        }
        paths.append(str(tmp_path / f"v2_mscoco_{subtype}_annotations.json"))
        with open(paths[1], "w") as f:
            json.dump(annotations, f)
    return paths


def _build(tmp_path, files: list[str], out: str, *extra: str) -> tuple[int, str, str]:
    images = [f"coco_{f}_{i:012d}" for f, i in [("train2014", 1), ("train2014", 2), ("val2014", 3), ("test2015", 4)]]
    if not (tmp_path / "feats").exists():
        write_npz_dir(str(tmp_path / "feats"), images)
        write_vocab(str(tmp_path / "vocab.txt"))
    argv = ["--from", "vqa2", "--annotations", *files, "--features", str(tmp_path / "feats")]
    return run_cli(build_main, argv + ["--vocab", str(tmp_path / "vocab.txt"), "--out", str(tmp_path / out), *extra])


def _score(count: int) -> float:
    """compute_softscore.py's get_score."""
    return 0 if count == 0 else 0.3 if count == 1 else 0.6 if count == 2 else 0.9 if count == 3 else 1


def test_vocabulary_targets_and_images_follow_the_published_rules(tmp_path) -> None:
    files = _write(tmp_path, "train2014", TRAIN) + _write(tmp_path, "val2014", VAL)
    status, out, err = _build(tmp_path, files[::-1], "train", "--split", "train2014", "--min_answer_count", "1")
    assert status == 0, err
    assert json.loads(out)["texts"] == len(TRAIN)
    # the vocabulary: normalised multiple-choice answers of train then val, in order of first occurrence
    assert json.load(open(tmp_path / "train" / "txt" / "ans2label.json")) == {
        "dog": 0,
        "2": 1,
        "mat": 2,
        "yes": 3,
        "cat": 4,
    }
    db = TxtTokLmdb(str(tmp_path / "train" / "txt"))
    expected_targets = {
        "10": {0: _score(8)},  # "Dog." normalises to "dog": 8 annotators; "cat" (2) is in the vocabulary too
        "11": {1: _score(5)},  # "two" -> "2": 5 annotators; "three" is outside the vocabulary
        "12": {2: _score(9)},
        "13": {3: _score(10)},
    }
    expected_targets["10"][4] = _score(2)
    for qid, image_id, question, _, _ in TRAIN:
        record = db[str(qid)]
        assert record["img_fname"] == f"coco_train2014_{image_id:012d}.npz"
        assert record["question"] == question
        got = dict(zip(record["target"]["labels"], record["target"]["scores"]))
        assert got == pytest.approx(expected_targets[str(qid)])


def test_min_answer_count_counts_distinct_questions(tmp_path) -> None:
    files = _write(tmp_path, "train2014", TRAIN) + _write(tmp_path, "val2014", VAL)
    status, _, err = _build(tmp_path, files, "db", "--split", "val2014", "--min_answer_count", "2")
    assert status == 0, err
    # "2" is the answer of questions 11 ("two") and 21; every other answer of one question only
    assert json.load(open(tmp_path / "db" / "txt" / "ans2label.json")) == {"2": 0}
    record = TxtTokLmdb(str(tmp_path / "db" / "txt"))["21"]
    assert record["target"] == {"labels": [0], "scores": [pytest.approx(1.0)]}
    assert record["img_fname"] == "coco_val2014_000000000003.npz"


def test_val_and_test_reuse_the_training_map(tmp_path, caplog) -> None:
    train = _write(tmp_path, "train2014", TRAIN)
    assert _build(tmp_path, train, "train", "--min_answer_count", "1")[0] == 0
    table = str(tmp_path / "train" / "txt" / "ans2label.json")
    val = _write(tmp_path, "val2014", VAL)
    assert not [r for r in caplog.records if r.name == "uniter_fast.importers.vqa2"]  # train + its map: no warning
    assert _build(tmp_path, val, "val_own_map", "--min_answer_count", "1")[0] == 0
    assert "answer vocabulary built from val2014 alone" in caplog.text and "--ans2label" in caplog.text
    assert _build(tmp_path, val, "val", "--ans2label", table)[0] == 0
    assert json.load(open(tmp_path / "val" / "txt" / "ans2label.json")) == json.load(open(table))
    # "2" is in the training map (5 annotators: 1); "cat" and "kitten" are not: question 20 has no target
    db = TxtTokLmdb(str(tmp_path / "val" / "txt"))
    assert db["21"]["target"] == {"labels": [json.load(open(table))["2"]], "scores": [1.0]}
    assert db["20"]["target"] == {"labels": [], "scores": []}
    test = _write(tmp_path, "test-dev2015", [(30, 4, "What is it?", "", [])], answers=False)
    status, err = _build(tmp_path, test, "test")[::2]
    assert status == 2 and "--ans2label" in err and "no annotations file" in err
    assert _build(tmp_path, test, "test", "--ans2label", table)[0] == 0
    record = TxtTokLmdb(str(tmp_path / "test" / "txt"))["30"]
    assert record["img_fname"] == "coco_test2015_000000000004.npz"  # test-dev's images are test2015's
    assert record["target"] == {"labels": [], "scores": []}


def test_normalisation_matches_the_rules() -> None:
    cases = {
        "Two dogs.": "2 dogs",  # number words, period
        "t-shirt": "t shirt",  # "-" without a space beside it becomes a space
        "t - shirt": "t shirt",  # beside a space it goes
        "1,000": "1000",  # digit-comma-digit: marks removed; then commas
        "A man": "man",  # articles
        "dont": "don't",  # contractions
        "3.5": "3.5",  # a period before a digit stays
        "what?!": "what",
        "none": "0",
    }
    assert {a: normalize_answer(a) for a in cases} == cases


def test_errors_name_the_file_and_the_record(tmp_path) -> None:
    files = _write(tmp_path, "train2014", TRAIN)
    annotations = json.load(open(files[1]))
    del annotations["annotations"][2]["answers"][4]["answer"]
    bad = tmp_path / "bad_annotations.json"
    bad.write_text(json.dumps(annotations))
    status, _, err = _build(tmp_path, [files[0], str(bad)], "db1")
    assert status == 2 and f"{bad} annotations[2] answers[4]: missing field 'answer'" in err
    annotations = json.load(open(files[1]))
    annotations["annotations"] = annotations["annotations"][:3]
    bad.write_text(json.dumps(annotations))
    status, _, err = _build(tmp_path, [files[0], str(bad)], "db2")
    assert status == 2 and f"{files[0]} questions[3]: question_id 13 has no annotation in {bad}" in err
    annotations = json.load(open(files[1]))
    annotations["annotations"][3]["question_id"] = 10
    bad.write_text(json.dumps(annotations))
    status, _, err = _build(tmp_path, [files[0], str(bad)], "db7")
    assert (
        status == 2 and f"{bad} annotations[3]: question_id 10 is annotated twice (first: {bad} annotations[0])" in err
    )
    status, _, err = _build(tmp_path, [files[0]], "db3")
    assert status == 2 and "questions of 'train2014' without their annotations file" in err
    status, _, err = _build(tmp_path, files, "db4", "--split", "val2014")
    assert status == 2 and "--split 'val2014': expected the data_subtype of a questions file given" in err
    status, _, err = _build(tmp_path, files, "db5", "--image_key", "coco_{split}_{id}")
    assert status == 2 and "--image_key 'coco_{split}_{id}': unknown field 'split'" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": []}))
    status, _, err = _build(tmp_path, [str(other)], "db6")
    assert status == 2 and f"{other}: not a VQA v2 questions or annotations file" in err
    assert not any(os.path.exists(tmp_path / f"db{i}") for i in range(1, 8))
