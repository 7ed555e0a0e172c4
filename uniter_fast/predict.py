"""Answer questions about your own images with a fine-tuned UNITER: photos in, JSON out (``uniter_fast.Pipeline``).

    python -m uniter_fast.predict --task vqa --checkpoint finetuned/ --detector bua-r101.pth --vocab vocab.txt \\
        --image photo.jpg --text "What is the man holding?"
    python -m uniter_fast.predict --task nlvr2 ... --image left.jpg --image right.jpg --text "Both photos show a dog."
    python -m uniter_fast.predict --task vcr ... --image p.jpg --text "Why?" --answer A1 ... --rationale R1 ...
    python -m uniter_fast.predict --task vqa ... --image photos/ --text "What is this?"     # every image of a folder
    python -m uniter_fast.predict --task vqa ... --questions questions.jsonl --out answers.json
    python -m uniter_fast.predict --task re ... --image photo.jpg --text "the man on the left" \\
        --boxes '[[10, 20, 200, 180], [300, 40, 620, 470]]'                           # or --boxes boxes.json

Prints a JSON list, one result per text and image (the task's fields, with "image" and "text"). A questions file
holds one {"image", "text"} object a line ("image": a path, relative to the file's folder, or a [left, right]
pair for NLVR2; VCR adds "answers" and "rationales"; any one-image task may add "boxes"). ``--boxes``: the regions
[[x1, y1, x2, y2], ...] (pixels of each --image, a JSON list or a JSON file holding one) instead of the detector's,
features as ``python -m uniter_fast.extract --boxes`` computes them. What each task returns: docs/own-images.md.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

from uniter_fast.entry import CommandParser, device_argument, parse_key_values, run_command
from uniter_fast.errors import ConfigError, DataError, closest
from uniter_fast.extract.config import add_detector_arguments, detector_config
from uniter_fast.files import check_new_output, write_text_atomic


def parser() -> argparse.ArgumentParser:
    """The command-line options (see ``--help``)."""
    ap = CommandParser(
        prog="python -m uniter_fast.predict", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from uniter_fast.tasks import answering_tasks

    ap.add_argument("--task", required=True, choices=answering_tasks(), help="the checkpoint's task")
    ap.add_argument("--checkpoint", required=True, help="finetune.py export folder (or an original model_step_N.pt)")
    ap.add_argument("--detector", required=True, help="BUTD Faster R-CNN weights (docs/extract.md lists them)")
    ap.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: the checkpoint folder's vocab.txt)")
    ap.add_argument("--image", action="append", default=[], help="an image file or a folder of them (repeatable)")
    ap.add_argument("--text", action="append", default=[], help="the question / statement / caption (repeatable)")
    ap.add_argument("--answer", action="append", default=[], help="vcr: one of the 4 answers (give 4)")
    ap.add_argument("--rationale", action="append", default=[], help="vcr: one of the 4 rationales (give 4)")
    ap.add_argument(
        "--boxes",
        default=None,
        help="the regions of every --image instead of the detector's: a JSON list [[x1, y1, x2, y2], ...] (pixels) "
        "or a JSON file holding one (re: the candidates)",
    )
    ap.add_argument("--questions", default=None, help='a JSON-lines file of {"image", "text"} objects (a batch)')
    ap.add_argument("--out", default=None, help="also write the JSON results to this file")
    ap.add_argument("--top-k", type=int, default=5, help="vqa: answers per question")
    ap.add_argument("--device", type=device_argument, default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--batch-size", type=int, default=16, help="images per detector call and queries per forward")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=JSON", help="a task option (repeatable)")
    add_detector_arguments(ap)
    ap.add_argument("--no-progress", action="store_true", help="no progress bar for batches")
    return ap


def expand_images(values: Sequence[str]) -> list[str]:
    """``--image`` values: files as given, folders replaced by their images (sorted); a ConfigError naming the
    value when it is neither or a folder holds none."""
    from uniter_fast.extract.images import list_images

    paths = []
    for value in values:
        if os.path.isdir(value):
            found = list_images(value)
            if not found:
                raise ConfigError(f"--image: expected image files in the folder {value!r}, found none")
            paths += found
        elif os.path.isfile(value):
            paths.append(value)
        else:
            raise ConfigError(f"--image: expected an image file or a folder of images, got {value!r} (not found)")
    return paths


def read_boxes(value: str) -> list[list[float]]:
    """``--boxes``: a JSON list of [x1, y1, x2, y2] boxes, or the path of a JSON file holding one; checked by
    ``given_boxes.check_boxes`` (a DataError naming --boxes)."""
    from uniter_fast.extract.given_boxes import check_boxes

    text = value
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            text = f.read()
    try:
        boxes = json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(
            f"--boxes: expected a JSON list [[x1, y1, x2, y2], ...] or a JSON file holding one, got {value[:60]!r}"
        ) from None
    return check_boxes(boxes, "--boxes").tolist()


def check_image_boxes(boxes: list[list[float]], path: str, where: str) -> None:
    """``given_boxes.check_inside`` for the image file ``path`` (its decoded size; unreadable: left to the
    extraction)."""
    import numpy as np

    from uniter_fast.extract.given_boxes import check_inside, decoded_size

    try:
        height, width = decoded_size(path)
    except (OSError, ValueError):
        return
    check_inside(np.asarray(boxes, dtype=np.float64), height, width, where)


QUESTION_KEYS = ("image", "text", "boxes", "answers", "rationales")
"""The keys of a questions-file line (the module docstring)."""


def read_questions(path: str, per_text: int = 1) -> list[dict[str, Any]]:
    """The queries of a questions file (see the module docstring): ``"image"`` as the file gives it (echoed in the
    results), ``"image_path"`` the path(s) read, a relative one taken from the file's folder; ``per_text`` images a
    line (NLVR2: 2, a [left, right] list). A ``DataError`` names the line of a malformed one."""
    from uniter_fast.data.task_db import read_jsonl

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--questions: {path!r} is not a file")
    base = os.path.dirname(os.path.abspath(path))
    resolve = lambda p: p if os.path.isabs(p) else os.path.join(base, p)  # noqa: E731
    queries = []
    for where, raw in read_jsonl(path):
        if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or "image" not in raw:
            raise DataError(f"--questions {where}: expected an object with 'image' and 'text' (a string), got {raw!r}")
        for key in raw:
            if key not in QUESTION_KEYS:
                raise DataError(
                    f"--questions {where}: unknown key {key!r}{closest(key, QUESTION_KEYS)}; the keys are "
                    f"{list(QUESTION_KEYS)}"
                )
        if not raw["text"].strip():
            raise DataError(f"--questions {where}: 'text' is empty")
        image = raw["image"]
        images = [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not images or not all(isinstance(p, str) for p in images):
            raise DataError(f"--questions {where}: 'image' must be a path or a list of paths, got {image!r}")
        if len(images) != per_text:
            raise DataError(f"--questions {where}: 'image' must name {per_text} image(s) for this task, got {image!r}")
        for p in images:
            if not os.path.isfile(resolve(p)):
                raise DataError(f"--questions {where}: image {p!r} is not a file (looked for {resolve(p)!r})")
        resolved = [resolve(p) for p in images]
        if "boxes" in raw:
            from uniter_fast.extract.given_boxes import check_boxes

            raw["boxes"] = check_boxes(raw["boxes"], f"--questions {where}: boxes").tolist()
            check_image_boxes(raw["boxes"], resolved[0], f"--questions {where}: boxes")
        queries.append({**raw, "image_path": resolved[0] if isinstance(image, str) else resolved})
    if not queries:
        raise DataError(f"--questions {path!r}: no question in the file")
    return queries


def command_queries(args: argparse.Namespace, per_text: int) -> list[dict[str, Any]]:
    """The queries of the command line (``image`` as given, ``image_path`` the path(s) read): the questions file, or
    every --text about the --image list (each image in
    turn; ``per_text`` > 1: the images together, NLVR2's left and right)."""
    if args.questions:
        if args.image or args.text or args.boxes is not None:
            raise ConfigError("--questions: expected either a questions file or --image/--text/--boxes, got both")
        return read_questions(args.questions, per_text)
    if not args.image or not args.text:
        missing = "--image" if not args.image else "--text"
        raise ConfigError(f"{missing}: expected at least one (or a --questions file), got none")
    for text in args.text:
        if not text.strip():
            raise ConfigError(f"--text: expected a non-empty text, got {text!r}")
    images = expand_images(args.image)
    if per_text > 1:
        if len(images) != per_text:
            raise ConfigError(f"--image: expected {per_text} images per text for --task {args.task}, got {len(images)}")
        groups: list[Any] = [images]
    else:
        groups = images
    extra: dict[str, Any] = (
        {"answers": args.answer, "rationales": args.rationale} if args.answer or args.rationale else {}
    )
    if args.boxes is not None:
        extra["boxes"] = read_boxes(args.boxes)
        if per_text > 1:
            raise ConfigError(f"--boxes: given boxes are for one-image tasks; --task {args.task} takes {per_text}")
        for image in images:
            check_image_boxes(extra["boxes"], image, f"--boxes ({image})")
    return [{"image": image, "image_path": image, "text": text, **extra} for text in args.text for image in groups]


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
    """Answer the queries; prints (and with --out writes) and returns the results."""
    args = parser().parse_args(argv)
    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {getattr(args, name)}")
    from uniter_fast.inference import Pipeline
    from uniter_fast.tasks import get_task

    if (args.answer or args.rationale) and args.task != "vcr":
        raise ConfigError(f"--answer/--rationale: only --task vcr takes them, got --task {args.task}")
    queries = command_queries(args, get_task(args.task).query_images)
    if args.out:
        check_new_output(args.out, "--out")
    for flag, path in (("--checkpoint", args.checkpoint), ("--detector", args.detector)):
        if not os.path.exists(path):
            raise ConfigError(f"{flag}: expected an existing path, got {path!r}")
    detector = detector_config(args)
    pipe = Pipeline.from_pretrained(
        args.task,
        args.checkpoint,
        args.detector,
        vocab=args.vocab,
        device=args.device,
        options=parse_key_values(args.option, "--option"),
        detector_config=detector,
        top_k=args.top_k,
        batch_size=args.batch_size,
    )
    answers = [q.get("answers") for q in queries] if any("answers" in q for q in queries) else None
    rationales = [q.get("rationales") for q in queries] if any("rationales" in q for q in queries) else None
    boxes = [q.get("boxes") for q in queries] if any("boxes" in q for q in queries) else None
    results = pipe(
        [q["image_path"] for q in queries],
        [q["text"] for q in queries],
        answers=answers,
        rationales=rationales,
        boxes=boxes,
        progress=len(queries) > 1 and not args.no_progress,
    )
    out = [{"image": q["image"], "text": q["text"], **r} for q, r in zip(queries, results)]
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return out


if __name__ == "__main__":
    run_command(main)
