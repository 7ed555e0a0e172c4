"""The refcoco importer: refer's ``refs(unc).p`` (a pickle written here in protocol 2, and in the protocol 0 with
8-bit strings of Python 2's default) and COCO's ``instances.json`` with their published fields, built into the RE
dbs through ``python -m uniter_fast.build --from refcoco``, the records and side tables checked against the
original ``prepro.py`` rule (refs of exactly the split, their images with every annotation, ``ann_ids`` in
instances order or MAttNet's ``iid_to_ann_ids.json`` order, one record per sentence with its ``sent``); the
restricted unpickler; the GT boxes to extract; the user's mistakes."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from tests.cli_helpers import run_cli
from tests.damage_helpers import image_arrays, write_vocab
from uniter_fast.build import main as build_main
from uniter_fast.data.re_db import ReTxtTokLmdb
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.errors import DataError
from uniter_fast.importers.refcoco import load_refs, write_gt_boxes

# image id -> (split of its refs, number of annotations); image 581857 has refs in train only
IMAGES = {581857: ("train", 3), 9: ("val", 2), 25: ("testA", 4), 42: ("val", 3)}


def refer_files(root) -> tuple[str, str, dict, list]:
    """``refs(unc).p`` and ``instances.json``: COCO annotations listed image after image in a shuffled order of
    ids (so instances order is not id order), two refs on image 42, sentences with raw / sent / tokens."""
    images, annotations, refs = [], [], []
    ann_id, ref_id, sent_id = 1000, 0, 0
    for image_id, (split, n) in IMAGES.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"license": 1, "file_name": name, "coco_url": "http://x", "height": 100 + n, "width": 200 + n,
                       "date_captured": "2013", "flickr_url": "", "id": image_id})  # fmt: skip
        ids = [ann_id + 7 * k % 5 for k in range(n)]  # not sorted
        ann_id += 10
        for k, i in enumerate(ids):
            annotations.append({"segmentation": [[1.0, 2.0, 3.0, 4.0]], "area": 50.0 + k, "iscrowd": 0,
                                "image_id": image_id, "bbox": [10.0 * k, 5.0, 20.0, 30.0 + k], "category_id": 1 + k % 2,
                                "id": i})  # fmt: skip
        for target in ids[1:] if image_id == 42 else ids[-1:]:
            sents = [
                {"tokens": ["the", "red", "cat"], "raw": "The red cat!", "sent_id": sent_id, "sent": "the red cat"},
                {"tokens": ["a", "dog"], "raw": "A dog", "sent_id": sent_id + 1, "sent": "a dog"},
            ]
            refs.append({"sent_ids": [sent_id, sent_id + 1], "file_name": f"{name[:-4]}_{target}.jpg",
                         "ann_id": target, "ref_id": ref_id, "image_id": image_id, "split": split,
                         "sentences": sents, "category_id": 1})  # fmt: skip
            ref_id, sent_id = ref_id + 1, sent_id + 2
    categories = [
        {"supercategory": "animal", "id": 1, "name": "cat"},
        {"supercategory": "animal", "id": 2, "name": "dog"},
    ]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    with open(os.path.join(root, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(os.path.join(root, "instances.json"), "w") as f:
        json.dump(instances, f)
    return os.path.join(root, "refs(unc).p"), os.path.join(root, "instances.json"), instances, refs


def features(root, name: str, rows: dict[int, int]) -> str:
    """One ``COCO_train2014_<id>.npz`` per image with ``rows[id]`` boxes (the extractor's names of COCO images)."""
    directory = os.path.join(root, name)
    os.makedirs(directory)
    rng = np.random.default_rng(len(name))
    for image_id, n in rows.items():
        np.savez(os.path.join(directory, f"COCO_train2014_{image_id:012d}.npz"), **image_arrays(rng, n))
    return directory


def build(tmp_path, annotations: list[str], *options: str) -> tuple[int, str, str]:
    """``python -m uniter_fast.build --from refcoco`` (det: 12 boxes an image, GT: one row per annotation)."""
    det = str(tmp_path / "det") if (tmp_path / "det").exists() else features(tmp_path, "det", dict.fromkeys(IMAGES, 12))
    gt = (
        str(tmp_path / "gt")
        if (tmp_path / "gt").exists()
        else features(tmp_path, "gt", {i: n for i, (_, n) in IMAGES.items()})
    )
    vocab = write_vocab(str(tmp_path / "vocab.txt"))
    out = str(tmp_path / f"db{len(list(tmp_path.glob('db*')))}")
    argv = ["--from", "refcoco", "--annotations", *annotations, "--features", det, "--gt_features", gt]
    status, _, stderr = run_cli(build_main, [*argv, "--vocab", vocab, "--out", out, *options])
    return status, out, stderr


def expected_side(instances: dict, refs: list, split: str, order: dict) -> dict:
    """The original prepro's side tables of ``split`` (``order``: image id -> ann_ids)."""
    chosen = [r for r in refs if r["split"] == split]
    image_set = {r["image_id"] for r in chosen}
    images = [
        {
            "id": i["id"],
            "file_name": i["file_name"],
            "ann_ids": order[i["id"]],
            "height": i["height"],
            "width": i["width"],
        }
        for i in instances["images"]
        if i["id"] in image_set
    ]
    anns = [
        {k: a[k] for k in ("id", "area", "bbox", "image_id", "category_id", "iscrowd")}
        for a in instances["annotations"]
        if a["image_id"] in image_set
    ]
    return {"refs": chosen, "annotations": anns, "categories": instances["categories"], "images": images}


def test_val_split_dbs_match_the_original_rule(tmp_path) -> None:
    refs_path, instances_path, instances, refs = refer_files(str(tmp_path))
    status, out, stderr = build(tmp_path, [refs_path, instances_path], "--split", "val")
    assert status == 0, stderr
    in_order = {}
    for a in instances["annotations"]:
        in_order.setdefault(a["image_id"], []).append(a["id"])
    want = expected_side(instances, refs, "val", in_order)
    for name, rows in want.items():
        assert json.loads(open(os.path.join(out, "txt", f"{name}.json")).read()) == rows, name
    txt = ReTxtTokLmdb(os.path.join(out, "txt"))
    toker = WordPiece(str(tmp_path / "vocab.txt"))
    anns = {a["id"]: a for a in instances["annotations"]}
    sentences = [(r, s) for r in want["refs"] for s in r["sentences"]]
    assert txt.sent_ids() == [str(s["sent_id"]) for _, s in sentences] and len(sentences) == 6  # image 9: 1 ref, 42: 2
    for ref, s in sentences:
        record = txt[str(s["sent_id"])]
        assert record["sent"] == s["sent"] and list(record["input_ids"]) == toker.encode(s["sent"])
        assert record["img_fname"] == f"visual_grounding_coco_gt_{ref['image_id']:012d}.npz"
        assert (record["ref_id"], record["ann_id"], record["image_id"]) == (
            ref["ref_id"],
            ref["ann_id"],
            ref["image_id"],
        )
        assert record["bbox"] == anns[ref["ann_id"]]["bbox"]
        assert txt.target_index(record) == in_order[ref["image_id"]].index(ref["ann_id"])
    assert sorted(os.listdir(out)) == ["img", "img_gt", "txt"]


def test_iid_to_ann_ids_order_sets_the_targets(tmp_path) -> None:
    refs_path, instances_path, instances, refs = refer_files(str(tmp_path))
    order = {}
    for a in instances["annotations"]:
        order.setdefault(a["image_id"], []).insert(0, a["id"])  # reversed: the rows of some other extraction
    order_path = tmp_path / "iid_to_ann_ids.json"
    order_path.write_text(json.dumps({"iid_to_ann_ids": {str(k): v for k, v in order.items()}}))
    status, out, stderr = build(
        tmp_path, [refs_path, instances_path, str(order_path)], "--dataset", "refcoco", "--split", "testA"
    )
    assert status == 0, stderr
    assert (
        json.loads(open(os.path.join(out, "txt", "images.json")).read())
        == expected_side(instances, refs, "testA", order)["images"]
    )
    txt = ReTxtTokLmdb(os.path.join(out, "txt"))
    ref = next(r for r in refs if r["split"] == "testA")
    assert (
        txt.target_index(txt[str(ref["sent_ids"][0])]) == order[25].index(ref["ann_id"]) == 0
    )  # the last in instances


def test_gt_boxes_follow_ann_ids_and_stay_inside_the_image(tmp_path) -> None:
    _, instances_path, instances, _ = refer_files(str(tmp_path))
    instances["annotations"][0]["bbox"] = [190.0, 90.0, 30.0, 20.0]  # past the 203 x 103 image's corner
    with open(instances_path, "w") as f:
        json.dump(instances, f)
    assert write_gt_boxes(instances_path, str(tmp_path / "boxes.json")) == len(IMAGES)
    boxes = json.loads((tmp_path / "boxes.json").read_text())
    for image in instances["images"]:
        anns = [a for a in instances["annotations"] if a["image_id"] == image["id"]]
        want = [
            [x, y, min(x + w, image["width"]), min(y + h, image["height"])] for x, y, w, h in (a["bbox"] for a in anns)
        ]
        assert boxes[image["file_name"]] == want
    assert boxes["COCO_train2014_000000581857.jpg"] == [
        [190.0, 90.0, 203, 103],
        [10.0, 5.0, 30.0, 36.0],
        [20.0, 5.0, 40.0, 37.0],
    ]


class Payload:
    """What a hostile pickle would run on load: it writes a file (through ``open``, or ``eval``: a builtin that is no
    data type)."""

    def __init__(self, path: str, through_eval: bool = False) -> None:
        self.path, self.through_eval = path, through_eval

    def __reduce__(self):
        if self.through_eval:
            return (eval, (f"open({self.path!r}, 'w')",))
        return (open, (self.path, "w"))


def test_refs_pickle_naming_a_function_is_refused_before_it_runs(tmp_path) -> None:
    marker = str(tmp_path / "ran")
    bad = tmp_path / "refs(unc).p"
    bad.write_bytes(pickle.dumps([{"ref_id": 0, "x": Payload(marker)}], protocol=2))
    with pytest.raises(DataError, match=r"refs\(unc\)\.p.* asks for io\.open"):
        load_refs(str(bad))
    bad.write_bytes(pickle.dumps([{"ref_id": 0, "x": Payload(marker, through_eval=True)}], protocol=2))
    with pytest.raises(DataError, match=r"asks for __builtin__\.eval"):
        load_refs(str(bad))
    assert not os.path.exists(marker)
    bad.write_bytes(pickle.dumps([{"ref_id": 0, "x": {1, 2}}], protocol=2))  # a set is plain data: read, then checked
    with pytest.raises(DataError, match=r"ref 0: missing field 'ann_id'"):
        load_refs(str(bad))


def python2_pickle(value) -> bytes:
    """``value`` (lists, dicts, ints, floats, strings) as Python 2's default ``pickle.dump`` writes it: protocol 0,
    text as 8-bit ``str`` (``S'...'``); refer's files come from Python 2 code."""
    out = []

    def put(item) -> None:
        if isinstance(item, dict):
            out.append(b"(d")
            for key, val in item.items():
                put(key), put(val), out.append(b"s")
        elif isinstance(item, list):
            out.append(b"(l")
            for val in item:
                put(val), out.append(b"a")
        elif isinstance(item, bool) or item is None:
            raise TypeError(item)
        elif isinstance(item, int):
            out.append(b"I%d\n" % item)
        elif isinstance(item, float):
            out.append(b"F%r\n" % item)
        else:
            out.append(b"S'" + item.encode("utf-8").replace(b"\\", b"\\\\").replace(b"'", b"\\'") + b"'\n")

    put(value)
    return b"".join(out) + b"."


def test_python2_pickle_of_refs_reads_as_its_data(tmp_path) -> None:
    _, _, _, refs = refer_files(str(tmp_path))
    refs[0]["sentences"][0]["raw"] = "The man's red cat"  # a quote inside the 8-bit string
    refs[0]["area"] = 12.5
    py2 = tmp_path / "py2.p"
    py2.write_bytes(python2_pickle(refs))
    assert load_refs(str(py2)) == refs


def one_line_error(status: int, stderr: str, *parts: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2 and len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_mistakes_are_one_line(tmp_path) -> None:
    refs_path, instances_path, instances, refs = refer_files(str(tmp_path))
    files = [refs_path, instances_path]
    one_line_error(
        *build(tmp_path, files, "--split", "testA", "--dataset", "refcocog")[::2], "--split 'testA'", "refcocog"
    )
    one_line_error(
        *build(tmp_path, files, "--split", "val", "--dataset", "refcoc")[::2], "--dataset 'refcoc'", "'refcoco'"
    )
    one_line_error(*build(tmp_path, files)[::2], "--split is required", "'testA'")
    one_line_error(*build(tmp_path, [refs_path], "--split", "val")[::2], "--annotations", "instances.json")
    one_line_error(*build(tmp_path, files, "--split", "testB")[::2], "no ref of split 'testB'", "'testA'")
    del refs[2]["sentences"][1]["sent"]
    broken = tmp_path / "broken.p"
    broken.write_bytes(pickle.dumps(refs, protocol=2))
    one_line_error(
        *build(tmp_path, [str(broken), instances_path], "--split", "val")[::2], "ref 2 sentences[1]", "'sent'"
    )
    broken.write_bytes(b"not a pickle")
    one_line_error(*build(tmp_path, [str(broken), instances_path], "--split", "val")[::2], "broken.p", "cannot be read")
    instances["annotations"][3]["bbox"] = [1.0, 2.0, 3.0]
    bad_instances = tmp_path / "bad_instances.json"
    bad_instances.write_text(json.dumps(instances))
    one_line_error(*build(tmp_path, [refs_path, str(bad_instances)], "--split", "val")[::2], "annotations[3]", "bbox")
    order = tmp_path / "order.json"
    order.write_text(json.dumps({"iid_to_ann_ids": {"9": [1]}}))
    one_line_error(*build(tmp_path, [*files, str(order)], "--split", "val")[::2], "iid_to_ann_ids", "image")
