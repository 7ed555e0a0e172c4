"""Reading time of the public-file importers at the published sizes (``uniter_fast.importers``).

    python bench/importers_bench.py            # under two minutes on 2 CPU cores; --vg-scale 1: all 5.4M VG regions

Writes, in a temporary directory, files of each published schema with the published numbers of images and texts
(synthetic short texts; Visual Genome at ``--vg-scale`` of its 108,077 images x 50 regions), then times each
importer's ``read`` once (CPU time of this process: JSON parsing, checks, records) and prints a table. The build
that follows (tokenising, LMDB writes, the features) is the builders' and is not timed here.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
import time
from typing import Any

from uniter_fast.importers import importers

WORDS = "a man riding a red bike down the street next to a parked car".split()


def _text(i: int) -> str:
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + i % 5))


def karpathy_coco(path: str) -> int:
    """dataset_coco.json: 113,287 train + restval, 5,000 val, 5,000 test images, five sentences each."""
    splits = ["train"] * 82783 + ["restval"] * 30504 + ["val"] * 5000 + ["test"] * 5000
    images = [
        {
            "filepath": "train2014",
            "filename": f"COCO_train2014_{i:012d}.jpg",
            "imgid": i,
            "split": split,
            "cocoid": i,
            "sentids": list(range(5 * i, 5 * i + 5)),
            "sentences": [
                {"tokens": _text(s).split(), "raw": _text(s), "imgid": i, "sentid": s} for s in range(5 * i, 5 * i + 5)
            ],
        }  # fmt: skip
        for i, split in enumerate(splits)
    ]
    with open(path, "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    return sum(5 for s in splits if s in ("train", "restval"))


def vg_regions(path: str, scale: float) -> int:
    """region_descriptions.json: ``scale`` x 108,077 images, 50 regions each (5.4M regions at scale 1)."""
    n = int(108077 * scale)
    images = [
        {
            "id": i,
            "regions": [
                {
                    "region_id": 50 * i + k,
                    "width": 10,
                    "height": 10,
                    "image_id": i,
                    "phrase": _text(50 * i + k),
                    "y": 0,
                    "x": 0,
                }
                for k in range(50)
            ],
        }  # fmt: skip
        for i in range(n)
    ]
    with open(path, "w") as f:
        json.dump(images, f)
    return 50 * n


def refcoco(root: str) -> int:
    """refs(unc).p + instances.json: RefCOCO's 50,000 refs, 142,209 sentences, 19,994 images, 10 annotations each."""
    images = [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": 480, "width": 640} for i in range(19994)]
    anns = [
        {"id": 10 * i + k, "image_id": i, "bbox": [k, k, 20.0, 30.0], "area": 600.0, "category_id": 1, "iscrowd": 0}
        for i in range(19994)
        for k in range(10)
    ]
    refs, sent = [], 0
    for r in range(50000):
        n = 3 if r < 42209 else 2
        sentences = [
            {"sent_id": sent + k, "sent": _text(sent + k), "raw": _text(sent + k), "tokens": []} for k in range(n)
        ]
        split = "train" if r < 42404 else "val" if r < 46215 else "testA" if r < 48152 else "testB"
        refs.append({"ref_id": r, "ann_id": 10 * (r % 19994) + r // 19994, "image_id": r % 19994, "split": split,
                     "category_id": 1, "file_name": "x.jpg", "sent_ids": [sent + k for k in range(n)],
                     "sentences": sentences})  # fmt: skip
        sent += n
    with open(os.path.join(root, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    with open(os.path.join(root, "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}, f)
    return sum(len(ref["sentences"]) for ref in refs if ref["split"] == "train")


def timed(name: str, paths: list[str], options: dict[str, Any]) -> tuple[float, Any]:
    """(CPU seconds, result) of importer ``name``'s read of ``paths``."""
    start = time.process_time()
    result = importers()[name].read(paths, options)
    return time.process_time() - start, result


def main() -> None:
    """Write the files, time each read, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vg-scale", type=float, default=0.1, help="share of VG's 108,077 images (default 0.1)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "dataset_coco.json")
        want = karpathy_coco(path)
        options = {"split": "train", "image_key": "coco_{subset}_{id:012}", "exclude": None}
        seconds, records = timed("karpathy-coco", [path], options)
        assert len(records) == want
        rows.append(("dataset_coco.json, --split train", os.path.getsize(path), len(records), seconds))
        path = os.path.join(tmp, "region_descriptions.json")
        want = vg_regions(path, args.vg_scale)
        seconds, records = timed("vg-regions", [path], {"image_key": "vg_{id:012}", "exclude": None})
        assert len(records) == want
        rows.append((f"region_descriptions.json x {args.vg_scale}", os.path.getsize(path), len(records), seconds))
        want = refcoco(tmp)
        paths = [os.path.join(tmp, "refs(unc).p"), os.path.join(tmp, "instances.json")]
        seconds, side = timed("refcoco", paths, {"dataset": "refcoco", "split": "train"})
        assert sum(len(ref["sentences"]) for ref in side["refs"]) == want
        rows.append(("refs(unc).p + instances.json, --split train", sum(map(os.path.getsize, paths)), want, seconds))
    print(f"{'file':48s} {'MB':>8s} {'records':>10s} {'CPU s':>7s}")
    for name, size, count, seconds in rows:
        print(f"{name:48s} {size / 1e6:8.1f} {count:10d} {seconds:7.2f}")


if __name__ == "__main__":
    main()
