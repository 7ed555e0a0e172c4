"""Read speed of every importer of the public benchmark files (``uniter_fast.importers``), on synthetic files written
in each published schema at a share of the published sizes: how long ``python -m uniter_fast.build --from <format>``
spends reading the annotations before it tokenises and writes the databases.

    python bench/importers_bench.py               # --scale 0.1: a tenth of each published size, about 30 s
    python bench/importers_bench.py --scale 1     # the published sizes (Visual Genome's parsed JSON: several GB)

The files (``PUBLISHED``: the published counts each is scaled from): VQA v2 train2014 + val2014 questions and
annotations (10 answers each, drawn from 20,000 distinct answers and a few frequent ones, so that the answer
normalisation's cache sees VQA-like repetition), SNLI-VE train, NLVR2 train, VCR train (object references in every
text), Karpathy's ``dataset_coco.json`` and ``dataset_flickr30k.json`` (``--split train``), COCO's
``captions_train2014.json``, Visual Genome's ``region_descriptions.json`` (50 regions an image) and RefCOCO's
``refs(unc).p`` + ``instances.json`` (``--split train``). One read each with the importer's default options, timed
in wall and CPU seconds of this process (JSON parsing included); the rate is records per CPU second, steadier than
wall time on a shared machine. Writes importers_bench_cpu.json to output/bench/ (bench/results/ with
``--refresh-results``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import sys
import tempfile
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_arguments, output_dir, print_table, proc_status, write_json  # noqa: E402

from uniter_fast.data.task_db import Imported  # noqa: E402
from uniter_fast.importers import get_importer  # noqa: E402

PUBLISHED = {
    "vqa2": "443,757 train2014 + 214,354 val2014 questions",
    "snli-ve": "529,527 train pairs",
    "nlvr2": "86,373 train examples",
    "vcr": "212,923 train questions",
    "karpathy-coco": "123,287 images x 5 sentences (113,287 in train + restval)",
    "karpathy-flickr30k": "31,014 images x 5 sentences (29,000 in train)",
    "coco-captions": "414,113 captions of 82,783 images (captions_train2014.json)",
    "vg-regions": "108,077 images x 50 regions",
    "refcoco": "50,000 refs, 142,209 sentences, 19,994 images (RefCOCO, UNC splits)",
}
WORDS = "a man riding a red bike down the street next to a parked car".split()


def _text(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + i % 5))


def _json(path: str, data: Any) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def _jsonl(path: str, rows: Any) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def _n(count: int, scale: float) -> int:
    return max(1, round(count * scale))


def vqa2_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """train2014 and val2014 questions files and their annotations files."""
    pool = [f"answer {k}." for k in range(20000)] + ["yes"] * 20000 + ["no"] * 15000 + ["2"] * 5000
    paths, start = [], 0
    for subtype, count in (("train2014", 443757), ("val2014", 214354)):
        ids = range(start, start + _n(count, scale))
        start = ids.stop
        questions = [
            {"image_id": i // 5, "question": "What color is the dog on the mat?", "question_id": i} for i in ids
        ]
        annotations = [
            {
                "question_id": i,
                "image_id": i // 5,
                "multiple_choice_answer": rng.choice(pool),
                "answers": [
                    {"answer": rng.choice(pool), "answer_confidence": "yes", "answer_id": j + 1} for j in range(10)
                ],
                "question_type": "what color is the",
                "answer_type": "other",
            }
            for i in ids
        ]
        for kind, rows in (("questions", questions), ("annotations", annotations)):
            paths.append(
                _json(os.path.join(directory, f"v2_{kind}_{subtype}.json"), {"data_subtype": subtype, kind: rows})
            )
    return paths, {}


def snli_ve_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """snli_ve_train.jsonl."""
    rows = (
        {
            "pairID": f"{i // 17}.jpg#{i % 17}r1e",
            "Flikr30kID": f"{i // 17}.jpg",
            "sentence1": "A man sits on a bench in a park.",
            "sentence2": "A man is sitting outside on a bench.",
            "gold_label": rng.choice(["entailment", "neutral", "contradiction"]),
            "annotator_labels": ["entailment"],
        }
        for i in range(_n(529527, scale))
    )
    return [_jsonl(os.path.join(directory, "snli_ve_train.jsonl"), rows)], {}


def nlvr2_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """NLVR2's train.json (JSON lines)."""
    rows = (
        {
            "identifier": f"train-{i // 8}-{i % 4}-{i % 2}",
            "sentence": "The left image contains two dogs on a red mat.",
            "label": rng.choice(["True", "False"]),
            "left_url": "https://example.org/l.jpg",
            "right_url": "https://example.org/r.jpg",
            "writer": "1",
            "synset": "n02084071",
            "query": "dogs",
            "directory": 1,
            "validation": {},
        }
        for i in range(_n(86373, scale))
    )
    return [_jsonl(os.path.join(directory, "train.json"), rows)], {}


def vcr_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """VCR's train.jsonl: a question, 4 answers and 4 rationales with object references."""
    line = {
        "objects": ["person", "person", "car", "dog", "person"],
        "img_fn": "movie/clip@0.jpg",
        "metadata_fn": "movie/clip@0.json",
        "question": ["What", "is", [0], "doing", "with", [2, 3], "?"],
        "answer_choices": [[[0], "is", "driving", "the", [2], "."]] * 4,
        "rationale_choices": [[[1], "and", [4], "are", "in", "the", "car", "."]] * 4,
        "answer_label": 1,
        "rationale_label": 2,
    }
    rows = ({**line, "annot_id": f"train-{i}"} for i in range(_n(212923, scale)))
    return [_jsonl(os.path.join(directory, "train.jsonl"), rows)], {}


def _karpathy_image(i: int, split: str, filename: str, **extra: Any) -> dict[str, Any]:
    sentences = [
        {"tokens": _text(s).split(), "raw": _text(s), "imgid": i, "sentid": s} for s in range(5 * i, 5 * i + 5)
    ]
    return {"filename": filename, "imgid": i, "split": split, "sentids": [5 * i + k for k in range(5)],
            "sentences": sentences, **extra}  # fmt: skip


def karpathy_coco_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """dataset_coco.json: train, restval, val and test images, five sentences each."""
    counts = {"train": 82783, "restval": 30504, "val": 5000, "test": 5000}
    splits = [split for split, count in counts.items() for _ in range(_n(count, scale))]
    images = [
        _karpathy_image(i, split, f"COCO_train2014_{i:012d}.jpg", filepath="train2014", cocoid=i)
        for i, split in enumerate(splits)
    ]
    return [_json(os.path.join(directory, "dataset_coco.json"), {"images": images, "dataset": "coco"})], {}


def karpathy_flickr30k_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """dataset_flickr30k.json: train, val and test images, five sentences each."""
    counts = {"train": 29000, "val": 1014, "test": 1000}
    splits = [split for split, count in counts.items() for _ in range(_n(count, scale))]
    images = [_karpathy_image(i, split, f"{1000000 + i}.jpg") for i, split in enumerate(splits)]
    data = {"images": images, "dataset": "flickr30k"}
    return [_json(os.path.join(directory, "dataset_flickr30k.json"), data)], {}


def coco_captions_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """captions_train2014.json."""
    n_images = _n(82783, scale)
    images = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640} for i in range(n_images)
    ]
    annotations = [{"id": k, "image_id": k % n_images, "caption": _text(k)} for k in range(_n(414113, scale))]
    data = {"info": {}, "images": images, "annotations": annotations}
    return [_json(os.path.join(directory, "captions_train2014.json"), data)], {}


def vg_regions_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """region_descriptions.json, 50 regions an image, written image by image (its whole list would take GBs)."""
    path = os.path.join(directory, "region_descriptions.json")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(_n(108077, scale)):
            regions = [
                {"region_id": 50 * i + k, "width": 10, "height": 10, "image_id": i, "phrase": _text(50 * i + k),
                 "y": 0, "x": 0}
                for k in range(50)
            ]  # fmt: skip
            f.write(("[" if i == 0 else ", ") + json.dumps({"id": i, "regions": regions}))
        f.write("]")
    return [path], {}


def refcoco_files(directory: str, scale: float, rng: random.Random) -> tuple[list[str], dict[str, Any]]:
    """refs(unc).p + instances.json, 10 annotations an image, the UNC splits' shares."""
    n_images, n_refs = _n(19994, scale), _n(50000, scale)
    images = [
        {"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640} for i in range(n_images)
    ]
    anns = [
        {"id": 10 * i + k, "image_id": i, "bbox": [k, k, 20.0, 30.0], "area": 600.0, "category_id": 1, "iscrowd": 0}
        for i in range(n_images)
        for k in range(10)
    ]
    refs, sent = [], 0
    for r in range(n_refs):
        n = 3 if r < 0.84418 * n_refs else 2  # 142,209 sentences over 50,000 refs
        share = r / n_refs
        split = "train" if share < 0.84808 else "val" if share < 0.9243 else "testA" if share < 0.9638 else "testB"
        refs.append({"ref_id": r, "ann_id": 10 * (r % n_images) + r // n_images % 10, "image_id": r % n_images,
                     "split": split, "category_id": 1, "file_name": "x.jpg", "sent_ids": [sent + k for k in range(n)],
                     "sentences": [{"sent_id": sent + k, "sent": _text(sent + k), "raw": _text(sent + k),
                                    "tokens": []} for k in range(n)]})  # fmt: skip
        sent += n
    with open(os.path.join(directory, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    data = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    paths = [os.path.join(directory, "refs(unc).p"), _json(os.path.join(directory, "instances.json"), data)]
    return paths, {"dataset": "refcoco", "split": "train"}


WRITERS: dict[str, Callable[[str, float, random.Random], tuple[list[str], dict[str, Any]]]] = {
    "vqa2": vqa2_files,
    "snli-ve": snli_ve_files,
    "nlvr2": nlvr2_files,
    "vcr": vcr_files,
    "karpathy-coco": karpathy_coco_files,
    "karpathy-flickr30k": karpathy_flickr30k_files,
    "coco-captions": coco_captions_files,
    "vg-regions": vg_regions_files,
    "refcoco": refcoco_files,
}
"""Each importer's file writer: ``(directory, scale, rng) -> (paths, options other than the defaults)``."""


def count_records(read: Any) -> int:
    """The records an importer's read gave: annotations, or (RE) the sentences of the refs."""
    annotations = read.annotations if isinstance(read, Imported) else read
    if isinstance(annotations, dict):
        return sum(len(ref["sentences"]) for ref in annotations["refs"])
    return len(annotations)


def measure(name: str, directory: str, scale: float, seed: int) -> dict[str, Any]:
    """Write importer ``name``'s files at ``scale`` and time one read with its default options."""
    paths, extra = WRITERS[name](directory, scale, random.Random(seed))
    importer = get_importer(name)
    options = {key: default for key, (_, default, _) in importer.options.items()}
    options.update({"ans2label": None} if importer.task == "vqa" else {}, **extra)
    wall, cpu = time.perf_counter(), time.process_time()
    records = count_records(importer.read(paths, options))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
    for path in paths:
        os.remove(path)
    return {
        "format": name,
        "records": records,
        "MB": megabytes,
        "s": wall,
        "cpu_s": cpu,
        "records/cpu_s": records / cpu,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=0.1, help="share of the published sizes (1: all of them)")
    parser.add_argument("--formats", nargs="+", choices=list(WRITERS), default=list(WRITERS), help="importers to time")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    if not 0 < args.scale <= 1:
        parser.error(f"--scale must be in (0, 1], got {args.scale}")
    with tempfile.TemporaryDirectory() as directory:
        rows = [measure(name, directory, args.scale, args.seed) for name in args.formats]
    print_table(rows, ["format", "records", "MB", "s", "cpu_s", "records/cpu_s"])
    meta = {
        "scale": args.scale,
        "published": {name: PUBLISHED[name] for name in args.formats},
        "seed": args.seed,
        "peak_rss_bytes": proc_status("VmHWM"),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(write_json("importers_bench", torch.device("cpu"), rows, meta, output_dir(args)))


if __name__ == "__main__":
    main()
