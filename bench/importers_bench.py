"""Read speed of the importers of the public benchmark files (``uniter_fast.importers``), on synthetic files written
in each published schema: how long ``python -m uniter_fast.build --from <format>`` spends reading the annotations
before it tokenises and writes the databases.

    python bench/importers_bench.py                 # about 1 min on 2 CPU cores
    python bench/importers_bench.py --lines 20000   # smaller files

Files: VQA v2 questions + annotations of ``--lines`` questions (10 answers each, drawn from 20,000 distinct answers
and a few frequent ones, so that the answer normalisation's cache sees VQA-like repetition), SNLI-VE and NLVR2 JSON
lines of ``--lines`` lines, VCR JSON lines of ``--lines`` / 5 questions (a question, 4 answers and 4 rationales with
object references). One timed read each (wall time, JSON parsing included); writes importers_bench_cpu.json to
output/bench/ (bench/results/ with ``--refresh-results``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import add_output_arguments, output_dir, print_table, write_json  # noqa: E402

from uniter_fast.importers import get_importer  # noqa: E402


def _jsonl(path: str, rows: list[dict[str, Any]]) -> list[str]:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return [path]


def vqa2_files(directory: str, n: int, rng: random.Random) -> list[str]:
    """A train2014 questions file and its annotations file of ``n`` questions."""
    pool = [f"answer {k}." for k in range(20000)] + ["yes"] * 20000 + ["no"] * 15000 + ["2"] * 5000
    questions = [
        {"image_id": i // 5, "question": "What color is the dog on the mat?", "question_id": i} for i in range(n)
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
        for i in range(n)
    ]
    paths = []
    for name, key, rows in (("questions", "questions", questions), ("annotations", "annotations", annotations)):
        paths.append(os.path.join(directory, f"v2_{name}_train2014.json"))
        with open(paths[-1], "w", encoding="utf-8") as f:
            json.dump({"data_subtype": "train2014", key: rows}, f)
    return paths


def snli_ve_files(directory: str, n: int, rng: random.Random) -> list[str]:
    rows = [
        {
            "pairID": f"{i // 17}.jpg#{i % 17}r1e",
            "Flikr30kID": f"{i // 17}.jpg",
            "sentence1": "A man sits on a bench in a park.",
            "sentence2": "A man is sitting outside on a bench.",
            "gold_label": rng.choice(["entailment", "neutral", "contradiction"]),
            "annotator_labels": ["entailment"],
        }
        for i in range(n)
    ]
    return _jsonl(os.path.join(directory, "snli_ve_train.jsonl"), rows)


def nlvr2_files(directory: str, n: int, rng: random.Random) -> list[str]:
    rows = [
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
        for i in range(n)
    ]
    return _jsonl(os.path.join(directory, "train.json"), rows)


def vcr_files(directory: str, n: int, rng: random.Random) -> list[str]:
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
    return _jsonl(os.path.join(directory, "train.jsonl"), [{**line, "annot_id": f"train-{i}"} for i in range(n)])


FORMATS = {"vqa2": (vqa2_files, 1), "snli-ve": (snli_ve_files, 1), "nlvr2": (nlvr2_files, 1), "vcr": (vcr_files, 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=100_000, help="questions / lines per file (VCR: a fifth)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for name, (write, divisor) in FORMATS.items():
            count = args.lines // divisor
            paths = write(directory, count, random.Random(args.seed))
            importer = get_importer(name)
            options = {key: default for key, (_, default, _) in importer.options.items()}
            start = time.perf_counter()
            importer.read(paths, options)
            seconds = time.perf_counter() - start
            megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
            rows.append({"format": name, "records": count, "MB": megabytes, "s": seconds, "records/s": count / seconds})
    print_table(rows, ["format", "records", "MB", "s", "records/s"])
    meta = {"lines": args.lines, "seed": args.seed, "load_average_1min_at_end": os.getloadavg()[0]}
    print(write_json("importers_bench", torch.device("cpu"), rows, meta, output_dir(args)))


if __name__ == "__main__":
    main()
