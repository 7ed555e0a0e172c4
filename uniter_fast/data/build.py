"""Build a txt_db + img_db from your own data (the CLI of uniter.md §3.1-3.2).

    python -m uniter_fast.data.build --captions captions.jsonl --features feats_dir/ --vocab vocab.txt --out db/
    python -m uniter_fast.data.build --task vqa --annotations vqa.jsonl --features feats/ --vocab vocab.txt --out db/

(``--task vqa|ve|nlvr2|re|vcr``: the downstream task dbs, see ``uniter_fast.data.build_tasks``.)

captions.jsonl: one ``{"id", "image", "caption"}`` object a line (``image`` = the .npz name, ".npz" optional).
feats_dir: one ``.npz`` per image with ``features`` [n, 2048], ``norm_bb`` [n, 6], ``conf`` [n], ``soft_labels``
[n, 1601] (BUTD ``generate_npz.py`` output). Writes ``db/txt`` and ``db/img`` (the directory appears atomically).
Bad records are skipped with a warning and counted; the counts are printed as JSON at the end.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import warnings
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from uniter_fast.data.img_db import ImgDbWriter
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.files import atomic_directory


def _write_images(feats_dir: str, writer: ImgDbWriter) -> int:
    paths = sorted(glob.glob(os.path.join(feats_dir, "*.npz")))
    if not paths:
        raise ValueError(f"features: no .npz files in {feats_dir!r}")
    corrupt = 0
    for path in tqdm(paths, desc="images"):
        name = os.path.basename(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in ("features", "norm_bb", "conf", "soft_labels")}
        except Exception as exc:  # any unreadable file is a skipped record, as convert_imgdir.py does
            corrupt += 1
            warnings.warn(f"features: {path!r} is unreadable or lacks a field ({exc}); skipped", stacklevel=2)
            continue
        writer.add(name, **arrays)
    return corrupt


def _write_captions(path: str, toker: WordPiece, images: set[str], writer: TxtDbWriter) -> dict[str, int]:
    counts = {"malformed_line": 0, "missing_image": 0}
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    for lineno, line in enumerate(tqdm(lines, desc="captions"), 1):
        try:
            rec = json.loads(line)
            id_, image, caption = str(rec["id"]), str(rec["image"]), str(rec["caption"])
        except (ValueError, KeyError, TypeError) as exc:
            counts["malformed_line"] += 1
            warnings.warn(f"captions line {lineno}: not a {{id, image, caption}} object ({exc}); skipped", stacklevel=2)
            continue
        image = image if image.endswith(".npz") else image + ".npz"
        if image not in images:
            counts["missing_image"] += 1
            warnings.warn(f"caption {id_!r}: image {image!r} has no usable features; skipped", stacklevel=2)
            continue
        if not writer.add(id_, toker.encode(caption), image, sent=caption):
            warnings.warn(f"caption {id_!r}: empty after tokenisation or duplicate id; skipped", stacklevel=2)
    return counts


def build_dbs(
    captions: str,
    features: str,
    vocab: str,
    out: str,
    conf_th: float = 0.2,
    max_bb: int = 100,
    min_bb: int = 10,
    num_bb: int = 36,
    compress: bool = False,
    toker_name: Optional[str] = None,
) -> dict[str, Any]:
    """Write ``out/txt`` and ``out/img``; returns the written and skipped counts. ``out`` must not exist."""
    if os.path.exists(out):
        raise FileExistsError(f"out {out!r} already exists; choose a new directory")
    for name, path in (("captions", captions), ("vocab", vocab)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} file {path!r} does not exist")
    if not os.path.isdir(features):
        raise FileNotFoundError(f"features directory {features!r} does not exist")
    toker = WordPiece(vocab)
    with atomic_directory(out) as tmp:
        with ImgDbWriter(os.path.join(tmp, "img"), conf_th, max_bb, min_bb, num_bb, compress) as img_w:
            corrupt = _write_images(features, img_w)
        meta = toker.meta(toker_name or os.path.basename(os.path.dirname(os.path.abspath(vocab))) or "wordpiece")
        with TxtDbWriter(os.path.join(tmp, "txt"), meta) as txt_w:
            txt_counts = _write_captions(captions, toker, set(img_w.name2nbb), txt_w)
    return {
        "images": len(img_w.name2nbb),
        "texts": len(txt_w.id2len),
        "skipped_images": {**img_w.skipped, "unreadable": corrupt},
        "skipped_texts": {**txt_w.skipped, **txt_counts},
    }


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point (see the module docstring; ``--task`` builds a downstream task's dbs instead, see
    ``uniter_fast.data.build_tasks``)."""
    ap = argparse.ArgumentParser(prog="python -m uniter_fast.data.build", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--task",
        default="pretrain",
        choices=["pretrain", "vqa", "ve", "nlvr2", "re", "vcr"],
        help="pretrain (captions; the default) or a downstream task's annotations",
    )
    ap.add_argument("--captions", help="pretrain: captions.jsonl with {id, image, caption} lines")
    ap.add_argument("--annotations", help="tasks: annotation JSONL (vqa, ve, nlvr2, vcr) or refs directory (re)")
    ap.add_argument("--gt_features", help="re / vcr: directory of per-image GT-box .npz files")
    ap.add_argument("--ans2label", help="vqa: answer vocabulary JSON {answer: label} (default: built from the answers)")
    ap.add_argument(
        "--special_token_base",
        type=int,
        default=28996,
        help="vcr: id of object tag 0 (= the model's word-table size before VCR's 81 tags are added)",
    )
    ap.add_argument("--features", required=True, help="directory of per-image .npz files")
    ap.add_argument("--vocab", required=True, help="WordPiece vocab.txt (bert-base-cased's for real runs)")
    ap.add_argument("--out", required=True, help="output directory (must not exist); gets txt/ and img/")
    ap.add_argument("--conf_th", type=float, default=0.2)
    ap.add_argument("--max_bb", type=int, default=100)
    ap.add_argument("--min_bb", type=int, default=10)
    ap.add_argument("--num_bb", type=int, default=36, help="boxes per image when --conf_th -1")
    ap.add_argument("--compress", action="store_true", help="store np.savez_compressed records")
    ap.add_argument("--toker_name", default=None, help="tokenizer name written to meta.json (default: vocab dir)")
    args = ap.parse_args(argv)
    if args.task != "pretrain":
        from uniter_fast.data.build_tasks import build_task_dbs

        if not args.annotations:
            ap.error(f"--task {args.task} needs --annotations")
        report = build_task_dbs(
            args.task,
            args.annotations,
            args.features,
            args.vocab,
            args.out,
            args.gt_features,
            args.ans2label,
            args.special_token_base,
            args.conf_th,
            args.max_bb,
            args.min_bb,
            args.num_bb,
            args.toker_name,
        )
        print(json.dumps(report, indent=2))
        return
    if not args.captions:
        ap.error("--captions is required (or give --task and --annotations for a downstream task)")
    report = build_dbs(
        args.captions,
        args.features,
        args.vocab,
        args.out,
        args.conf_th,
        args.max_bb,
        args.min_bb,
        args.num_bb,
        args.compress,
        args.toker_name,
    )
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
