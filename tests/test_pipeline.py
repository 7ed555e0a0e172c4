"""Same answer both ways: ``uniter_fast.Pipeline`` (photos and text in memory) against the LMDB route (``python -m
uniter_fast.extract`` -> the task's database build -> the task's evaluation dataset and collate -> the model) on
the photos bundled with matplotlib and scikit-image, for every task, with a small random detector and tiny
fine-tuned exports."""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_helpers import run_cli
from tests.extract_helpers import TINY, TINY_CLI, photo_paths, tiny_weights
from tests.tasks_helpers import export_task_model
from uniter_fast import Pipeline, UniterConfig
from uniter_fast.data.build import build_dbs
from uniter_fast.data.img_db import compute_num_bb, load_npz
from uniter_fast.data.task_records import VE_ENT2IDX
from uniter_fast.data.tokenizer import WordPiece, build_vocab
from uniter_fast.extract import Extractor
from uniter_fast.extract.cli import main as extract_main
from uniter_fast.inference.pipeline import BOX_SETTINGS
from uniter_fast.predict import main as predict_main
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.spec import scores_of

SETTINGS = type("S", (), dict(max_txt_len=60, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36))()
QUESTIONS = ["What is the woman wearing ?", "Is there a cat on the table ?", "What color is the cup ?"]
ANSWERS = ["a cup", "a cat", "a rocket", "nothing"]
RATIONALES = ["it is on the table", "the man holds it", "it is red", "there is a photo"]
VQA_ANSWERS = {"cup": 0, "cat": 1, "red": 2, "yes": 3, "no": 4, "rocket": 5}
TEXTS = QUESTIONS + ANSWERS + RATIONALES + ["The left photo shows a cat .", "A woman in a uniform ."]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """Three photos, their features through the extract CLI, a vocabulary, a detector and tiny exports."""
    root = tmp_path_factory.mktemp("pipeline")
    photos = photo_paths()[:3]
    if len(photos) < 3:  # matplotlib's photo only: three crops of it, as files
        with Image.open(photos[0]) as im:
            for i, box in enumerate([(0, 0, 300, 300), (100, 100, 400, 500), (200, 0, 512, 400)][len(photos) - 1 :]):
                im.crop(box).save(root / f"crop{i}.png")
                photos.append(str(root / f"crop{i}.png"))
    weights = str(root / "tiny-milvlg.pth")
    torch.save(tiny_weights("milvlg"), weights)
    listing = root / "photos.txt"
    listing.write_text("\n".join(photos) + "\n")
    feats = str(root / "feats")
    extract_main(["--images", str(listing), "--weights", weights, "--out", feats, "--no-progress", "--workers", "0",
                  *TINY_CLI])  # fmt: skip
    names = [os.path.splitext(os.path.basename(p))[0] for p in photos]
    assert sorted(os.listdir(feats)) == sorted(n + ".npz" for n in names)
    vocab = str(root / "vocab.txt")
    size = build_vocab(TEXTS, vocab)
    config = UniterConfig.tiny(vocab_size=size)
    options = {
        "vqa": {"ans2label_table": VQA_ANSWERS, "num_answers": len(VQA_ANSWERS)},
        "ve": {"ans2label_table": dict(VE_ENT2IDX), "num_answers": 3},
        "nlvr2": {},
        "itm": {},
        "re": {},
        "vcr": {"special_token_base": size},
    }
    exports = {name: export_task_model(name, o, config, str(root / f"finetuned-{name}")) for name, o in options.items()}
    extractor = Extractor(weights, config=TINY)
    return dict(root=root, photos=photos, names=names, feats=feats, vocab=vocab, exports=exports, extractor=extractor)


def lmdb_results(
    world: dict, task_name: str, records: list[dict], top_k: int = 3, feats: str = "", **build: Any
) -> list[dict]:
    """The results of the LMDB route: the task's build from ``records`` (its annotation format) and the npz files
    of the extract CLI (``feats``, default the detected boxes'), the task's evaluation dataset, collate and the
    exported model."""
    task = get_task(task_name)
    feats = feats or world["feats"]
    out = str(world["root"] / f"db-{task_name}{'-' + os.path.basename(feats) if feats != world['feats'] else ''}")
    annotations = world["root"] / f"{task_name}.jsonl"
    annotations.write_text("".join(json.dumps(r) + "\n" for r in records))
    settings = tuple(BOX_SETTINGS)
    if task_name == "itm":  # ITM reads caption dbs (python -m uniter_fast.build --captions)
        build_dbs(str(annotations), feats, world["vocab"], out, *settings)
    else:
        gt = feats if task.gt_features else None
        task.build_dbs(str(annotations), feats, out, WordPiece(world["vocab"]), "t", settings, gt, build)
    model, options = load_task_model(task, world["exports"][task_name], {})
    img = f"{out}/img_gt;{out}/img" if task.gt_features else f"{out}/img"
    dataset = task.eval_dataset(DbCache(SETTINGS), f"{out}/txt", img, options, "test")
    batch = task.query_batch(dataset)
    with torch.no_grad():
        scores = scores_of(model.eval(), batch)
    return task.query_results(scores, batch, options, top_k)


def assert_same(got: Any, expected: Any, where: str = "result") -> None:
    """Equal structure and strings, numbers within 1e-5."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), where
        for key in expected:
            assert_same(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert math.isfinite(got) and abs(got - expected) <= 1e-5, f"{where}: {got} vs {expected}"
    else:
        assert got == expected, f"{where}: {got!r} vs {expected!r}"


def pipeline(world: dict, task: str, **settings: Any) -> Pipeline:
    return Pipeline.from_pretrained(task, world["exports"][task], world["extractor"], world["vocab"], **settings)


def test_vqa(world) -> None:
    records = [{"question_id": str(i), "image": n, "question": q, "answers": {}}
               for i, (n, q) in enumerate(zip(world["names"], QUESTIONS))]  # fmt: skip
    expected = lmdb_results(world, "vqa", records, ans2label=str(dump(world, "ans2label.json", VQA_ANSWERS)))
    pipe = pipeline(world, "vqa", top_k=3)
    got = pipe(world["photos"], QUESTIONS)
    assert_same(got, expected)
    assert [len(r["answers"]) for r in got] == [3, 3, 3]
    assert all(a["answer"] in VQA_ANSWERS for r in got for a in r["answers"])
    single = pipe(world["photos"][1], QUESTIONS[1])  # one question: one result, the same
    assert_same(single, expected[1])


def dump(world: dict, name: str, value: Any) -> str:
    path = world["root"] / name
    path.write_text(json.dumps(value))
    return str(path)


def test_ve(world) -> None:
    records = [{"id": str(i), "image": n, "hypothesis": q, "label": "neutral"}
               for i, (n, q) in enumerate(zip(world["names"], QUESTIONS))]  # fmt: skip
    expected = lmdb_results(world, "ve", records)
    got = pipeline(world, "ve")(world["photos"], QUESTIONS)
    assert_same(got, expected)
    assert all(set(r["probs"]) == set(VE_ENT2IDX) and abs(sum(r["probs"].values()) - 1) < 1e-5 for r in got)


def test_nlvr2(world) -> None:
    names, photos = world["names"], world["photos"]
    statements = ["The left photo shows a cat .", "A woman in a uniform ."]
    records = [{"identifier": str(i), "images": [names[i], names[i + 1]], "sentence": s, "label": True}
               for i, s in enumerate(statements)]  # fmt: skip
    expected = lmdb_results(world, "nlvr2", records)
    got = pipeline(world, "nlvr2")([[photos[0], photos[1]], [photos[1], photos[2]]], statements)
    assert_same(got, expected)


def test_itm(world) -> None:
    captions = ["A woman in a uniform .", "a cat on the table", "a red cup"]
    records = [{"id": str(i), "image": n, "caption": c} for i, (n, c) in enumerate(zip(world["names"], captions))]
    expected = lmdb_results(world, "itm", records)
    got = pipeline(world, "itm")(world["photos"], captions)
    assert_same(got, expected)


def test_vcr(world) -> None:
    records = [
        {"annot_id": str(i), "image": n, "question": [q], "answer_choices": [[a] for a in ANSWERS],
         "rationale_choices": [[r] for r in RATIONALES], "answer_label": -1, "rationale_label": -1}
        for i, (n, q) in enumerate(zip(world["names"][:2], QUESTIONS))
    ]  # fmt: skip
    expected = lmdb_results(world, "vcr", records, special_token_base=WordPiece(world["vocab"]).meta("v")["v_range"][1])
    got = pipeline(world, "vcr")(world["photos"][:2], QUESTIONS[:2], answers=ANSWERS, rationales=RATIONALES)
    assert_same(got, expected)
    assert all(len(r["answer_probs"]) == 4 and len(r["rationale_probs"]) == 4 for r in got)


def re_lmdb_results(world: dict, feats: str, boxes: list[list[list[float]]], expressions: list[str], name: str):
    """(RE results of the LMDB route, its batch): each photo an image whose objects are the rows of its npz in
    ``feats`` with the bboxes ``boxes`` ([x, y, w, h] pixels per row), the GT-box db from the same npz files."""
    side = {"refs": [], "annotations": [], "categories": [{"id": 0, "name": "object"}], "images": []}
    for i, (stem, photo) in enumerate(zip(world["names"], world["photos"])):
        with Image.open(photo) as im:
            width, height = im.size
        ann_ids = [1000 * i + k for k in range(len(boxes[i]))]
        side["annotations"] += [
            {"id": a, "bbox": b, "image_id": i, "category_id": 0} for a, b in zip(ann_ids, boxes[i])
        ]
        side["images"].append(
            {"id": i, "file_name": stem + ".png", "ann_ids": ann_ids, "height": height, "width": width}
        )
        side["refs"].append({"ref_id": i, "sent_ids": [str(i)], "ann_id": ann_ids[0], "image_id": i,
                             "sentences": [{"sent_id": str(i), "sent": expressions[i]}]})  # fmt: skip
    refs = world["root"] / f"refs-{name}"
    refs.mkdir()
    for key, rows in side.items():
        (refs / f"{key}.json").write_text(json.dumps(rows))
    task = get_task("re")
    out = str(world["root"] / f"db-{name}")
    task.build_dbs(str(refs), feats, out, WordPiece(world["vocab"]), "t", BOX_SETTINGS, feats)
    model, options = load_task_model(task, world["exports"]["re"], {})
    dataset = task.eval_dataset(DbCache(SETTINGS), f"{out}/txt", f"{out}/img", options, "test")
    batch = task.query_batch(dataset)
    with torch.no_grad():
        return task.query_results(scores_of(model.eval(), batch), batch, options, 1), batch


EXPRESSIONS = ["the woman on the left", "the cat", "the red cup"]


def test_re_over_detected_boxes(world) -> None:
    """RE on the LMDB route: each photo as an image whose objects are its boxes (the GT-box db from the same npz)."""
    rows = [min(len(load_npz(os.path.join(world["feats"], n + ".npz"))["conf"]), 100) for n in world["names"]]
    boxes = [[[0, 0, 1, 1]] * n for n in rows]  # what a GT-box img_db keeps
    expected, batch = re_lmdb_results(world, world["feats"], boxes, EXPRESSIONS, "re")
    got = pipeline(world, "re")(world["photos"], EXPRESSIONS)
    assert_same(got, expected)
    for result, n in zip(got, batch["num_bbs"].tolist()):
        assert len(result["probs"]) == n and abs(sum(result["probs"]) - 1) < 1e-5
        assert result["probs"][result["index"]] == max(result["probs"])


def given_boxes(world: dict) -> list[list[list[float]]]:
    """12 boxes [x1, y1, x2, y2] inside each photo (more than min_bb: a detected-box img_db would keep 10)."""
    rng = np.random.default_rng(0)
    out = []
    for photo in world["photos"]:
        with Image.open(photo) as im:
            width, height = im.size
        x = np.sort(rng.uniform(0, width, size=(12, 2)), axis=1).round(1)
        y = np.sort(rng.uniform(0, height, size=(12, 2)), axis=1).round(1)
        out.append(np.stack([x[:, 0], y[:, 0], x[:, 1] + 1, y[:, 1] + 1], axis=1).clip(0, [width, height] * 2).tolist())
    out[0][-1] = [0, 0, *Image.open(world["photos"][0]).size]  # the whole photo
    return out


def test_re_over_given_boxes(world) -> None:
    """``pipe(image, text, boxes=...)`` equals extract --boxes -> build -> RE evaluation; every box kept, in order."""
    from uniter_fast.extract.given_boxes import image_key as boxes_key

    boxes = given_boxes(world)
    listing = world["root"] / "photos.txt"
    boxes_file = world["root"] / "boxes.json"
    boxes_file.write_text(json.dumps({boxes_key(p, str(world["root"])): b for p, b in zip(world["photos"], boxes)}))
    feats = str(world["root"] / "feats-given")
    extract_main(["--images", str(listing), "--weights", str(world["root"] / "tiny-milvlg.pth"), "--out", feats,
                  "--boxes", str(boxes_file), "--no-progress", "--workers", "0", *TINY_CLI])  # fmt: skip
    xywh = [[[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in image] for image in boxes]
    expected, batch = re_lmdb_results(world, feats, xywh, EXPRESSIONS, "re-given")
    assert batch["num_bbs"].tolist() == [12, 12, 12]
    pipe = pipeline(world, "re")
    got = pipe(world["photos"], EXPRESSIONS, boxes=boxes)
    for g, e, image in zip(got, expected, xywh):  # the box: the user's own, not its fp16 copy in norm_bb
        assert g["box"] == image[g["index"]] and np.allclose(e["box"], g["box"], atol=1.0)
    assert_same([{**g, "box": None} for g in got], [{**e, "box": None} for e in expected])
    single = pipe(world["photos"][0], EXPRESSIONS[0], boxes=np.asarray(boxes[0]))  # one image: one list (or array)
    assert_same(single, got[0])
    records, _ = pipe.features(world["photos"], boxes=[np.asarray(b) for b in boxes])
    for i, stem in enumerate(world["names"]):  # the stored regions: the npz of extract --boxes
        stored = load_npz(os.path.join(feats, stem + ".npz"))
        assert stored["keep_all"] and len(stored["conf"]) == 12
        for field in ("features", "norm_bb", "conf", "soft_labels"):
            assert np.allclose(records[f"image{i}.npz"][field], stored[field], atol=1e-2), field
    questions = [{"question_id": str(i), "image": n, "question": q, "answers": {}}
                 for i, (n, q) in enumerate(zip(world["names"], QUESTIONS))]  # fmt: skip
    ans2label = str(dump(world, "ans2label.json", VQA_ANSWERS))
    vqa = lmdb_results(world, "vqa", questions, feats=feats, ans2label=ans2label)  # another task over given boxes
    assert_same(pipeline(world, "vqa", top_k=3)(world["photos"], QUESTIONS, boxes=boxes), vqa)
    from uniter_fast.data.memory_db import memory_img_db

    low = {**records["image0.npz"], "conf": np.full(12, 0.05, np.float16)}  # below conf_th: 10 kept (min_bb) ...
    detected = {k: v for k, v in low.items() if k != "given_boxes"}
    assert memory_img_db({"a": low, "b": detected}, BOX_SETTINGS).name2nbb == {"a": 12, "b": 10}  # ... unless given


def test_bad_given_boxes_are_one_line_errors(world) -> None:
    from uniter_fast.errors import DataError

    pipe = pipeline(world, "re")
    with pytest.raises(DataError, match=r"boxes: box 0 \[10, 10, 5, 5\] is empty"):
        pipe(world["photos"][0], "the cat", boxes=[[10, 10, 5, 5]])
    with pytest.raises(DataError, match=r"boxes: box 1 \[0.0, 0.0, 100000.0, 5.0\] lies outside"):
        pipe(world["photos"][0], "the cat", boxes=[[0, 0, 5, 5], [0, 0, 1e5, 5]])
    with pytest.raises(ValueError, match="boxes: given boxes are for one-image tasks"):
        pipeline(world, "nlvr2")([world["photos"][0], world["photos"][1]], "a cat", boxes=[[0, 0, 5, 5]])
    detector = str(world["root"] / "tiny-milvlg.pth")
    common = ["--task", "re", "--checkpoint", world["exports"]["re"], "--detector", detector, "--vocab", world["vocab"],
              *TINY_CLI, "--no-progress", "--image", world["photos"][0], "--text", "the cat"]  # fmt: skip
    for boxes, message in [
        ("[[10, 10, 5, 5]]", "--boxes: box 0 [10, 10, 5, 5] is empty"),
        ("[[0, 0, 100000, 5]]", "--boxes (" + world["photos"][0] + "): box 0 [0.0, 0.0, 100000.0, 5.0] lies outside"),
        ("[1, 2, 3, 4]", "--boxes: box 0 must be 4 numbers"),
        ("boxes.json", "--boxes: expected a JSON list"),
    ]:
        status, stdout, stderr = run_cli(predict_main, [*common, "--boxes", boxes])
        assert status == 2 and stdout == "" and stderr.count("\n") == 1 and message in stderr, stderr
    status, stdout, _ = run_cli(predict_main, [*common, "--boxes", "[[0, 0, 50, 40], [10, 10, 60, 70]]"])
    printed = json.loads(stdout)[0]
    assert status == 0 and len(printed["probs"]) == 2 and printed["box"] in ([0, 0, 50, 40], [10, 10, 50, 60])
    assert_same({k: printed[k] for k in ("index", "prob", "probs", "box")},
                pipe(world["photos"][0], "the cat", boxes=[[0, 0, 50, 40], [10, 10, 60, 70]]))  # fmt: skip


def test_predict_cli(world, tmp_path) -> None:
    detector = str(world["root"] / "tiny-milvlg.pth")
    common = ["--task", "vqa", "--checkpoint", world["exports"]["vqa"], "--detector", detector,
              "--vocab", world["vocab"], *TINY_CLI, "--top-k", "2", "--no-progress"]  # fmt: skip
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        "".join(json.dumps({"image": p, "text": q}) + "\n" for p, q in zip(world["photos"], QUESTIONS))
    )
    status, stdout, _ = run_cli(
        predict_main, [*common, "--questions", str(questions), "--out", str(tmp_path / "answers.json")]
    )
    assert status == 0
    printed = json.loads(stdout)
    assert json.loads((tmp_path / "answers.json").read_text()) == printed
    expected = pipeline(world, "vqa", top_k=2)(world["photos"], QUESTIONS)
    assert [r["image"] for r in printed] == world["photos"] and [r["text"] for r in printed] == QUESTIONS
    assert_same([{"answers": r["answers"]} for r in printed], expected)
    status, stdout, _ = run_cli(predict_main, [*common, "--image", world["photos"][0], "--text", QUESTIONS[0]])
    assert status == 0  # one question alone: the batch's answers (a batch of one rounds differently)
    assert_same(json.loads(stdout)[0]["answers"], printed[0]["answers"])
    (tmp_path / "photos").mkdir()  # a path relative to the questions file's folder, printed as the file gives it
    shutil.copy(world["photos"][0], tmp_path / "photos" / "a.jpg")
    (tmp_path / "relative.jsonl").write_text(json.dumps({"image": "photos/a.jpg", "text": QUESTIONS[0]}) + "\n")
    status, stdout, _ = run_cli(predict_main, [*common, "--questions", str(tmp_path / "relative.jsonl")])
    relative = json.loads(stdout)[0]
    assert status == 0 and relative["image"] == "photos/a.jpg", relative["image"]
    assert_same(relative["answers"], printed[0]["answers"])
    for argv, message in [
        (["--image", str(tmp_path / "missing.jpg"), "--text", "what ?"], "--image: expected an image file"),
        (["--text", "what ?"], "--image: expected at least one"),
        (["--questions", str(questions), "--image", world["photos"][0]], "--questions: expected either"),
        (
            ["--image", world["photos"][0], "--text", "what ?", "--top-k", "0"],
            "--top-k: expected an integer >= 1, got 0",
        ),
    ]:
        status, stdout, stderr = run_cli(predict_main, [*common, *argv])
        assert status == 2 and stdout == "" and stderr.count("\n") == 1 and message in stderr, stderr
    no_vocab = [a for a in common if a not in ("--vocab", world["vocab"])]
    status, _, stderr = run_cli(predict_main, [*no_vocab, "--image", world["photos"][0], "--text", "what ?"])
    assert status == 2 and "vocab (--vocab): the checkpoint" in stderr and "carries no vocab.txt" in stderr


def test_alignment_picture(world, tmp_path) -> None:
    pipe = pipeline(world, "itm")
    out = pipe.alignment(world["photos"][0], "A woman in a uniform .", str(tmp_path / "wra.png"))
    with Image.open(out["path"]) as im:
        assert im.format == "PNG" and im.size[0] > 500
    plan = torch.tensor(out["plan"])
    assert out["words"][0] == "[CLS]" and out["words"][-1] == "[SEP]" and plan.shape[0] == len(out["words"])
    assert (plan >= 0).all() and math.isfinite(out["ot_distance"]) and plan.sum() > 0
    conf = load_npz(os.path.join(world["feats"], world["names"][0] + ".npz"))["conf"]  # the img_db's box count
    assert plan.shape[1] == min(len(conf), compute_num_bb(conf, 0.2, 10, 100))


def test_a_checkpoint_of_another_task_or_without_a_head_is_refused(world, tmp_path) -> None:
    with pytest.raises(ValueError, match="task: the checkpoint .* is a 'vqa' model, got task 'itm'"):
        pipeline_of(world, "itm", world["exports"]["vqa"])
    model, _ = load_task_model(get_task("vqa"), None, {"num_answers": 2}, UniterConfig.tiny(vocab_size=200))
    model.uniter.save_pretrained(str(tmp_path / "pretrained"))  # the encoder only: no VQA head
    with pytest.raises(ValueError, match="expected a fine-tuned vqa model"):
        pipeline_of(world, "vqa", str(tmp_path / "pretrained"))


def pipeline_of(world: dict, task: str, checkpoint: str) -> Pipeline:
    return Pipeline.from_pretrained(task, checkpoint, world["extractor"], world["vocab"])


def test_images_as_paths_pil_images_and_rgb_arrays_decode_alike() -> None:
    from uniter_fast.inference.inputs import to_bgr

    path = photo_paths()[0]
    from_file = to_bgr(path)
    with Image.open(path) as im:
        assert np.array_equal(to_bgr(im), from_file)
        rgb = np.asarray(im.convert("RGB"))
    assert np.array_equal(to_bgr(rgb), from_file) and np.array_equal(to_bgr(np.dstack([rgb, rgb[:, :, :1]])), from_file)
    assert np.array_equal(to_bgr(rgb[:, :, 0]), np.repeat(rgb[:, :, :1], 3, axis=2))
    with pytest.raises(ValueError, match=r"uint8 \[H, W\]"):
        to_bgr(rgb.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="image: 'nope.jpg' is not a file"):
        to_bgr("nope.jpg")
    with pytest.raises(TypeError, match="expected a path, a PIL image or a numpy array, got int"):
        to_bgr(3)


def test_answer_maps_of_checkpoints_without_task_json(tmp_path) -> None:
    from uniter_fast.errors import CheckpointError

    table = tmp_path / "ans2label.json"
    table.write_text(json.dumps(VQA_ANSWERS))
    assert get_task("vqa").answer_map({"ans2label": str(table)}) == VQA_ANSWERS
    assert get_task("vqa").answer_map({"ans2label_table": {"x": 0}, "ans2label": str(table)}) == {"x": 0}
    assert get_task("ve").answer_map({}) == VE_ENT2IDX
    with pytest.raises(CheckpointError, match="give the option ans2label"):
        get_task("vqa").answer_map({})
