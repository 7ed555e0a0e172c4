"""The caption importers (Karpathy's COCO / Flickr30k splits, COCO captions, Visual Genome region descriptions):
small files written in each published schema, built into dbs through ``python -m uniter_fast.build --from``, and
every record checked against the published rule (ids, texts, image keys, splits, exclusions), computed here from
the files themselves; then the user's mistakes, each one line naming the file or the option."""

from __future__ import annotations

import json

import pytest

from tests.cli_helpers import run_cli
from tests.damage_helpers import write_npz_dir, write_vocab
from uniter_fast.build import main as build_main
from uniter_fast.data import TxtTokLmdb
from uniter_fast.data.tokenizer import WordPiece

TEXTS = ["a dog on the mat.", "the red cat", "a cat on a mat", "red dogs", "the dog.", "a red mat", "cats", "a dog"]


def karpathy_coco() -> dict:
    """dataset_coco.json: one image per split (two in train), two sentences each, fields as published."""
    images = []
    for imgid, (split, cocoid, folder) in enumerate(
        [
            ("train", 9, "train2014"),
            ("restval", 42, "val2014"),
            ("val", 73, "val2014"),
            ("test", 74, "val2014"),
            ("train", 25, "train2014"),
        ]  # fmt: skip
    ):
        sentids = [2 * imgid + 100, 2 * imgid + 101]
        images.append(
            {
                "filepath": folder,
                "sentids": sentids,
                "filename": f"COCO_{folder}_{cocoid:012}.jpg",
                "imgid": imgid,
                "split": split,
                "sentences": [
                    {
                        "tokens": TEXTS[(2 * imgid + k) % 8].lower().split(),
                        "raw": TEXTS[(2 * imgid + k) % 8],
                        "imgid": imgid,
                        "sentid": s,
                    }  # fmt: skip
                    for k, s in enumerate(sentids)
                ],
                "cocoid": cocoid,
            }
        )
    return {"images": images, "dataset": "coco"}


def karpathy_flickr() -> dict:
    """dataset_flickr30k.json: no filepath / cocoid; the file name is the Flickr photo id."""
    images = []
    for imgid, (split, photo) in enumerate([("train", 1000092795), ("val", 1007129816), ("test", 1009434119)]):
        sentids = [5 * imgid, 5 * imgid + 1]
        sentences = [{"tokens": [], "raw": TEXTS[s % 8], "imgid": imgid, "sentid": s} for s in sentids]
        images.append({"sentids": sentids, "imgid": imgid, "sentences": sentences, "split": split,
                       "filename": f"{photo}.jpg"})  # fmt: skip
    return {"images": images, "dataset": "flickr30k"}


def build(tmp_path, name: str, annotations: list[str], keys: list[str], *extra: str) -> tuple[int, str, str]:
    """``python -m uniter_fast.build --from name`` over features named ``keys`` (fresh out dir ``name``)."""
    feats = tmp_path / f"feats_{len(list(tmp_path.glob('feats_*')))}"
    write_npz_dir(str(feats), keys)
    vocab = write_vocab(str(tmp_path / "vocab.txt"))
    out = tmp_path / f"db_{len(list(tmp_path.glob('db_*')))}"
    argv = [
        "--from",
        name,
        "--annotations",
        *annotations,
        "--features",
        str(feats),
        "--vocab",
        vocab,
        "--out",
        str(out),
    ]
    status, stdout, stderr = run_cli(build_main, [*argv, *extra])
    return status, str(out / "txt"), stderr


def records(txt_path: str) -> dict[str, tuple[str, str, list[int]]]:
    """id -> (image key, sentence, input_ids) of a built txt_db."""
    db = TxtTokLmdb(txt_path, max_txt_len=-1)
    return {i: (db[i]["img_fname"], db[i]["sent"], list(db[i]["input_ids"])) for i in db.id2len}


def expected(images: list[dict], splits: set[str], key, vocab) -> dict[str, tuple[str, str, list[int]]]:
    """The published rule: every sentence of the images of ``splits``, id = sentid, text = raw, image = ``key``."""
    toker = WordPiece(str(vocab))
    return {
        str(s["sentid"]): (key(im) + ".npz", s["raw"], toker.encode(s["raw"]))
        for im in images
        if im["split"] in splits
        for s in im["sentences"]
    }


def coco_key(image: dict) -> str:
    return f"coco_{image['filepath']}_{image['cocoid']:012d}"


def write(path, data) -> str:
    """``data`` into ``path``: a string as it is, anything else as JSON."""
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


LITERAL_IMAGES = {  # the original img_db names of the images of each split, written out
    "train": {"coco_train2014_000000000009.npz", "coco_val2014_000000000042.npz", "coco_train2014_000000000025.npz"},
    "val": {"coco_val2014_000000000073.npz"},
    "val,test": {"coco_val2014_000000000073.npz", "coco_val2014_000000000074.npz"},
}


@pytest.mark.parametrize(
    "split, splits", [("train", {"train", "restval"}), ("val", {"val"}), ("val,test", {"val", "test"})]
)
def test_karpathy_coco_records(tmp_path, split: str, splits: set[str]) -> None:
    data = karpathy_coco()
    path = write(tmp_path / "dataset_coco.json", data)
    keys = [coco_key(im) for im in data["images"]]
    status, txt, stderr = build(tmp_path, "karpathy-coco", [path], keys, "--split", split)
    assert status == 0, stderr
    got = records(txt)
    assert got == expected(data["images"], splits, coco_key, tmp_path / "vocab.txt")
    assert {image for image, _, _ in got.values()} == LITERAL_IMAGES[split]
    assert json.loads((tmp_path / "db_0" / "txt" / "txt2img.json").read_text()) == {i: r[0] for i, r in got.items()}


def test_karpathy_flickr30k_records_key_pattern_and_exclusion(tmp_path) -> None:
    data = karpathy_flickr()
    path = write(tmp_path / "dataset_flickr30k.json", data)
    key = lambda im: f"flickr30k_{int(im['filename'][:-4]):012d}"  # noqa: E731
    status, txt, stderr = build(tmp_path, "karpathy-flickr30k", [path], [key(im) for im in data["images"]])
    assert status == 0, stderr
    assert records(txt) == expected(data["images"], {"train"}, key, tmp_path / "vocab.txt")
    assert records(txt)["0"][0] == "flickr30k_001000092795.npz"
    stems = [im["filename"][:-4] for im in data["images"]]
    exclude = write(tmp_path / "ex.txt", "flickr30k:1007129816\n")
    options = ["--split", "val,test", "--image_key", "{stem}", "--exclude", exclude]
    status, txt, stderr = build(tmp_path, "karpathy-flickr30k", [path], stems, *options)
    assert status == 0, stderr
    assert records(txt) == expected(data["images"], {"test"}, lambda im: im["filename"][:-4], tmp_path / "vocab.txt")


def coco_captions(split: str, ids: list[int], first_ann: int) -> dict:
    """captions_<split>2014.json: images with COCO's fields, two annotations per image."""
    images = [
        {
            "license": 3,
            "file_name": f"COCO_{split}2014_{i:012d}.jpg",
            "coco_url": "http://x",
            "height": 480,
            "width": 640,
            "date_captured": "2013-11-14 11:18:45",
            "flickr_url": "http://y",
            "id": i,
        }  # fmt: skip
        for i in ids
    ]
    annotations = [
        {"image_id": i, "id": first_ann + 2 * n + k, "caption": TEXTS[(2 * n + k) % 8]}
        for n, i in enumerate(ids)
        for k in range(2)
    ]
    return {"info": {}, "images": images, "licenses": [], "annotations": annotations}


def test_coco_captions_two_files_and_exclusion(tmp_path) -> None:
    train, val = coco_captions("train", [9, 25], 48), coco_captions("val", [42, 73], 900)
    paths = [write(tmp_path / "captions_train2014.json", train), write(tmp_path / "captions_val2014.json", val)]
    images = {im["id"]: im["file_name"][:-4].lower() for data in (train, val) for im in data["images"]}
    exclude = write(tmp_path / "exclude.txt", "# downstream val / test\ncoco:73\n\ncoco:25  # another\n")
    status, txt, stderr = build(tmp_path, "coco-captions", paths, list(images.values()), "--exclude", exclude)
    assert status == 0, stderr
    toker = WordPiece(str(tmp_path / "vocab.txt"))
    want = {
        str(a["id"]): (images[a["image_id"]] + ".npz", a["caption"], toker.encode(a["caption"]))
        for data in (train, val)
        for a in data["annotations"]
        if a["image_id"] not in (73, 25)
    }
    assert records(txt) == want and len(want) == 4
    assert records(txt)["48"][0] == "coco_train2014_000000000009.npz"


def vg_files(tmp_path) -> tuple[str, str, dict]:
    """region_descriptions.json (version 1.2: image "id") and image_data.json (image_id, coco_id, flickr_id)."""
    regions = [
        {
            "regions": [
                {
                    "region_id": 1382 + 10 * i + k,
                    "width": 82,
                    "height": 139,
                    "image_id": i,
                    "phrase": TEXTS[i + k],
                    "y": 57,
                    "x": 421,
                }
                for k in range(3)
            ],
            "id": i,
        }  # fmt: skip
        for i in (1, 2, 3)
    ]
    data = [
        {"width": 800, "url": "https://x/1.jpg", "height": 600, "image_id": 1, "coco_id": None, "flickr_id": None},
        {"width": 800, "url": "https://x/2.jpg", "height": 600, "image_id": 2, "coco_id": 73, "flickr_id": None},
        {
            "width": 800,
            "url": "https://x/3.jpg",
            "height": 600,
            "image_id": 3,
            "coco_id": None,
            "flickr_id": 1009434119,
        },
    ]
    return write(tmp_path / "region_descriptions.json", regions), write(tmp_path / "image_data.json", data), regions


def test_vg_regions_records_and_exclusion_through_image_data(tmp_path) -> None:
    regions_path, data_path, regions = vg_files(tmp_path)
    keys = [f"vg_{i:012d}" for i in (1, 2, 3)]
    toker = WordPiece(write_vocab(str(tmp_path / "vocab.txt")))
    want = {
        str(r["region_id"]): (f"vg_{im['id']:012d}.npz", r["phrase"], toker.encode(r["phrase"]))
        for im in regions
        for r in im["regions"]
    }
    status, txt, stderr = build(tmp_path, "vg-regions", [regions_path], keys)
    assert status == 0, stderr
    assert records(txt) == want and len(want) == 9
    exclude = write(tmp_path / "exclude.txt", "coco:73\nflickr30k:1009434119\n")
    status, txt, stderr = build(tmp_path, "vg-regions", [regions_path, data_path], keys, "--exclude", exclude)
    assert status == 0, stderr
    assert records(txt) == {k: v for k, v in want.items() if v[0] == "vg_000000000001.npz"}
    status, txt, stderr = build(
        tmp_path, "vg-regions", [regions_path], keys, "--exclude", write(tmp_path / "vg.txt", "vg:1\n")
    )
    assert status == 0, stderr
    assert records(txt) == {k: v for k, v in want.items() if v[0] != "vg_000000000001.npz"}


def one_line_error(status: int, stderr: str, *parts: str) -> None:
    """A user's mistake: exit status 2 and one ``error:`` line holding every part."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert status == 2 and len(lines) == 1, stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_mistakes_are_one_line_naming_the_file_or_option(tmp_path) -> None:
    data = karpathy_coco()
    path = write(tmp_path / "dataset_coco.json", data)
    keys = [coco_key(im) for im in data["images"]]
    one_line_error(*build(tmp_path, "karpathy-coco", [path], keys, "--split", "tset")[::2], "--split 'tset'", "'test'")
    one_line_error(
        *build(tmp_path, "karpathy-coco", [path], keys, "--image_key", "{cocoid}")[::2], "--image_key", "'id'"
    )
    flickr = write(tmp_path / "dataset_flickr30k.json", karpathy_flickr())
    one_line_error(*build(tmp_path, "karpathy-coco", [flickr], keys)[::2], "flickr30k", "karpathy-flickr30k")
    del data["images"][1]["sentences"][1]["raw"]
    broken = write(tmp_path / "broken.json", data)
    one_line_error(*build(tmp_path, "karpathy-coco", [broken], keys)[::2], "images[1] sentences[1]", "'raw'")
    bad_exclude = write(tmp_path / "ex.txt", "coco:9\ncocoid 42\n")
    one_line_error(
        *build(tmp_path, "karpathy-coco", [path], keys, "--exclude", bad_exclude)[::2], "line 2", "'cocoid 42'"
    )
    captions = coco_captions("train", [9], 1)
    captions["annotations"][1]["image_id"] = 10
    one_line_error(*build(tmp_path, "coco-captions", [write(tmp_path / "c.json", captions)], keys)[::2],
                   "annotations[1]", "image_id 10")  # fmt: skip
    regions_path, _, _ = vg_files(tmp_path)
    one_line_error(*build(tmp_path, "vg-regions", [regions_path], keys, "--exclude", bad_exclude)[::2],
                   "line 2")  # fmt: skip
    coco_only = write(tmp_path / "coco_only.txt", "coco:73\n")
    one_line_error(*build(tmp_path, "vg-regions", [regions_path], keys, "--exclude", coco_only)[::2], "image_data.json")
    (tmp_path / "not_json.json").write_text("{")
    one_line_error(*build(tmp_path, "karpathy-coco", [str(tmp_path / "not_json.json")], keys)[::2], "not_json.json")
