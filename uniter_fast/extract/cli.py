"""``python -m uniter_fast.extract``: BUTD region features for a folder or list of images, in UNITER's npz format.

    python -m uniter_fast.extract --images photos/ --weights bua-caffe-frcn-r101-k10-100.pth --out feats/
    torchrun --nproc_per_node 8 -m uniter_fast.extract --images list.txt --weights W.pth --out feats/ --dtype bf16

Writes ``feats/<name>.npz`` per image (features [n, 2048], norm_bb [n, 6], conf [n], soft_labels [n, 1601], all
float16), which ``python -m uniter_fast.build --features feats/`` reads. Re-running skips finished images;
unreadable images are listed in ``feats/failed.txt``; a JSON summary is printed at the end. ``--boxes boxes.json``
computes the features of given boxes instead (``uniter_fast.extract.given_boxes`` has the schema).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Optional, Sequence

from uniter_fast.entry import CommandParser, device_argument
from uniter_fast.extract.config import BOX_SELECTIONS, add_detector_arguments, detector_config
from uniter_fast.extract.extractor import DTYPES, OPS
from uniter_fast.extract.run import default_device, extract_folder


def parser() -> argparse.ArgumentParser:
    """The command-line options (see ``--help``)."""
    ap = CommandParser(prog="python -m uniter_fast.extract", description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", required=True, help="folder of images (searched recursively) or a list file")
    ap.add_argument(
        "--weights", required=True, help="checkpoint: MILVLG .pth, airsplay/HF .pkl/.bin, violetteshev .pth"
    )
    ap.add_argument("--out", required=True, help="output folder for the npz files (created; finished files skipped)")
    ap.add_argument(
        "--device",
        type=device_argument,
        default=None,
        help="cpu, cuda, cuda:1 ... (default: cuda:LOCAL_RANK if available)",
    )
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="network precision (bf16: CUDA)")
    ap.add_argument(
        "--batch-size", type=int, default=None, help="images per detector call (default 1 on CPU, 4 on GPU)"
    )
    ap.add_argument("--workers", type=int, default=2, help="image-decoding DataLoader workers")
    ap.add_argument("--chunk", type=int, default=None, help="RoIs per res5 call (default 64 on CPU, 256 on GPU)")
    ap.add_argument("--ops", default="auto", choices=OPS, help="RoI pooling / RPN NMS: torchvision or plain torch")
    ap.add_argument("--reference", action="store_true", help="the reference path: unfolded BN, plain-torch ops")
    ap.add_argument(
        "--box-selection",
        default="uniter",
        choices=BOX_SELECTIONS,
        help="uniter: top 100 by confidence (UNITER's copy); anderson: conf >= 0.2, 10 to 100 boxes",
    )
    ap.add_argument("--min-boxes", type=int, default=-1, help="override MIN_BOXES of the selection")
    ap.add_argument("--max-boxes", type=int, default=-1, help="override MAX_BOXES of the selection")
    ap.add_argument("--conf-thresh", type=float, default=0.2)
    add_detector_arguments(ap, help_prefix="")
    ap.add_argument(
        "--boxes",
        default=None,
        help='boxes.json {"image path relative to --images": [[x1, y1, x2, y2], ...]} (original pixels): features of '
        "these boxes (all kept, in order) instead of detections, for the images it names",
    )
    ap.add_argument("--attributes", action="store_true", help="also store attr_prob [n, 401] in each npz")
    ap.add_argument("--prefix", default="", help="prepended to every npz name (UNITER's NLVR2 files: 'nlvr2_')")
    ap.add_argument("--overwrite", action="store_true", help="redo images whose npz exists")
    ap.add_argument("--allow-pickle", action="store_true", help="load pickled checkpoints (.pkl): trusted files only")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # added by the DeepSpeed launcher
    return ap


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the extraction; prints and returns the summary of this rank."""
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = detector_config(
        args,
        conf_thresh=args.conf_thresh,
        box_selection=args.box_selection,
        min_boxes=args.min_boxes,
        max_boxes=args.max_boxes,
    )
    summary = extract_folder(
        args.images,
        args.weights,
        args.out,
        device=args.device or default_device(args.local_rank),
        dtype=args.dtype,
        config=config,
        batch_size=args.batch_size,
        num_workers=args.workers,
        fast=not args.reference,
        ops=args.ops,
        chunk=args.chunk,
        attributes=args.attributes,
        prefix=args.prefix,
        overwrite=args.overwrite,
        allow_pickle=args.allow_pickle,
        progress=not args.no_progress,
        boxes=args.boxes,
    ).as_dict()
    print(json.dumps(summary, indent=2))
    return summary
