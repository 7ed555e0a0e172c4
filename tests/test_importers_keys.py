"""Image keys across the importers: the importers that read the same image collection give the same key for the same
image by default (COCO: vqa2, karpathy-coco, coco-captions; Flickr30k: snli-ve, karpathy-flickr30k), and the same
extractor file name with ``--image_key '{stem}'``; a pattern's mistake names its own option."""

from __future__ import annotations

import json
from typing import Any

import pytest

from uniter_fast.data.task_db import Imported
from uniter_fast.errors import ConfigError
from uniter_fast.importers import get_importer

COCO_FILE = "COCO_val2014_000000000042.jpg"  # COCO image 42 of val2014, as published
FLICKR_FILE = "1000092795.jpg"


def _write(path, data: Any) -> str:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _images(name: str, paths: list[str], **options: Any) -> set[str]:
    """The image keys of importer ``name``'s records of ``paths`` (its default options but ``options``)."""
    importer = get_importer(name)
    read = importer.read(paths, {**{k: v[1] for k, v in importer.options.items()}, "ans2label": None, **options})
    records = read.annotations if isinstance(read, Imported) else read
    return {record["image"] for _, record in records}


def _coco_files(tmp_path) -> dict[str, list[str]]:
    """One caption / question of COCO image 42 in each published format that names COCO images."""
    question = {"question_id": 7, "image_id": 42, "question": "What is it?"}
    answers = [{"answer": "dog", "answer_confidence": "yes", "answer_id": 1}]
    annotation = {"question_id": 7, "image_id": 42, "multiple_choice_answer": "dog", "answers": answers}
    sentence = {"raw": "A dog.", "tokens": ["a", "dog"], "sentid": 3, "imgid": 0}
    image = {"split": "test", "filename": COCO_FILE, "filepath": "val2014", "cocoid": 42, "imgid": 0}
    return {
        "vqa2": [
            _write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [question]}),
            _write(tmp_path / "a.json", {"data_subtype": "val2014", "annotations": [annotation]}),
        ],
        "karpathy-coco": [
            _write(tmp_path / "k.json", {"dataset": "coco", "images": [{**image, "sentences": [sentence]}]})
        ],
        "coco-captions": [
            _write(
                tmp_path / "c.json",
                {
                    "images": [{"id": 42, "file_name": COCO_FILE, "height": 480, "width": 640}],
                    "annotations": [{"id": 5, "image_id": 42, "caption": "A dog."}],
                },
            )
        ],
    }


def _flickr_files(tmp_path) -> dict[str, list[str]]:
    """One pair / caption of Flickr30k photo 1000092795 in each published format that names Flickr30k images."""
    line = {"pairID": "1000092795.jpg#0r1e", "Flikr30kID": FLICKR_FILE, "sentence2": "A dog.", "gold_label": "neutral"}
    sentence = {"raw": "A dog.", "tokens": ["a", "dog"], "sentid": 3, "imgid": 0}
    image = {"split": "train", "filename": FLICKR_FILE, "imgid": 0, "sentences": [sentence]}
    return {
        "snli-ve": [_write(tmp_path / "snli_ve_train.jsonl", json.dumps(line) + "\n")],
        "karpathy-flickr30k": [_write(tmp_path / "f.json", {"dataset": "flickr30k", "images": [image]})],
    }


def test_coco_images_have_one_key_in_every_importer(tmp_path) -> None:
    files = _coco_files(tmp_path)
    options = {"karpathy-coco": {"split": "test"}, "vqa2": {"min_answer_count": 1}}
    for name, paths in files.items():
        assert _images(name, paths, **options.get(name, {})) == {"coco_val2014_000000000042.npz"}, name
        stem = _images(name, paths, **options.get(name, {}), image_key="{stem}")
        assert stem == {"COCO_val2014_000000000042.npz"}, name  # what extract writes for val2014/COCO_val2014_...jpg


def test_flickr30k_images_have_one_key_in_every_importer(tmp_path) -> None:
    for name, paths in _flickr_files(tmp_path).items():
        assert _images(name, paths) == {"flickr30k_001000092795.npz"}, name
        assert _images(name, paths, image_key="{stem}") == {"1000092795.npz"}, name


def test_a_pattern_mistake_names_its_option(tmp_path) -> None:
    files = _flickr_files(tmp_path)
    with pytest.raises(ConfigError, match=r"^--image_key '\{image_id\}': unknown field 'image_id'"):
        _images("snli-ve", files["snli-ve"], image_key="{image_id}")
    with pytest.raises(ConfigError, match=r"^--image_key 'a/\{id\}': gives 'a/1000092795'"):
        _images("karpathy-flickr30k", files["karpathy-flickr30k"], image_key="a/{id}")
    line = {"annot_id": "val-0", "img_fn": "movie/clip@0.jpg", "objects": [], "question": ["Why", "?"]}
    line.update(answer_choices=[["a"]] * 4, rationale_choices=[["b"]] * 4)
    path = _write(tmp_path / "val.jsonl", json.dumps(line) + "\n")
    with pytest.raises(ConfigError, match=r"^--gt_image_key 'vcr_\{movie\}': unknown field 'movie'"):
        get_importer("vcr").read([path], {"image_key": "{stem}", "gt_image_key": "vcr_{movie}"})
