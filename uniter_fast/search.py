"""Search a gallery of your own photos with a text: index it once, then query it (``uniter_fast.inference``).

    python -m uniter_fast.search index --images photos/ --checkpoint itm-finetuned/ --detector bua-r101.pth \\
        --vocab vocab.txt --out photos.index
    python -m uniter_fast.search query --index photos.index --text "a dog catching a frisbee" --top-k 5

``index`` stores per image the regions an img_db keeps and the first-stage embedding of the retrieval model; run
again, it continues where it stopped (images it holds are skipped, new images of the folder added). ``query`` ranks
every image by the first stage, re-ranks the best ``--shortlist`` (default 5% of the gallery, at least --top-k) with
the cross-encoder and prints a JSON list: rank, path, score (sigmoid of the cross-encoder logit), logit,
first_stage_score, first_stage_rank. ``--exact`` scores every image with the cross-encoder. The checkpoint must
have a trained first stage (fine-tuned with first_stage_dim > 0; docs/retrieval.md). docs/own-images.md.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional, Sequence

from uniter_fast.entry import CommandParser, device_argument, run_command
from uniter_fast.errors import ConfigError
from uniter_fast.extract.config import add_detector_arguments, detector_config
from uniter_fast.files import check_new_output, write_text_atomic


def parser() -> argparse.ArgumentParser:
    """The command-line options of both subcommands (see ``--help``)."""
    ap = CommandParser(
        prog="python -m uniter_fast.search", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    index = sub.add_parser("index", help="index the images of a folder")
    index.add_argument("--images", required=True, help="the folder of images (searched recursively)")
    index.add_argument("--checkpoint", required=True, help="itm finetune.py export with a trained first stage")
    index.add_argument("--detector", required=True, help="BUTD Faster R-CNN weights (docs/extract.md lists them)")
    index.add_argument("--vocab", default=None, help="WordPiece vocab.txt (default: the checkpoint folder's)")
    index.add_argument("--out", required=True, help="the index folder (a new one, or one to continue)")
    index.add_argument("--device", type=device_argument, default="cpu", help="cpu, cuda, cuda:1 ...")
    index.add_argument("--batch-size", type=int, default=8, help="images per detector call")
    index.add_argument("--shard-size", type=int, default=64, help="images per shard (the unit of resuming)")
    add_detector_arguments(index)
    index.add_argument("--no-progress", action="store_true", help="no progress bar")
    query = sub.add_parser("query", help="the best images of an index for a text")
    query.add_argument("--index", required=True, help="an index folder made by `search index`")
    query.add_argument("--text", required=True, help="what to look for")
    query.add_argument("--top-k", type=int, default=5, help="results to print")
    query.add_argument("--shortlist", type=int, default=None, help="images re-ranked (default: 5%% of the gallery)")
    query.add_argument("--exact", action="store_true", help="score every image with the cross-encoder")
    query.add_argument("--checkpoint", default=None, help="default: the index's; another is an error")
    query.add_argument("--detector", default=None, help="optional: checked against the index's detector")
    query.add_argument("--vocab", default=None, help="default: the index's, else the checkpoint folder's")
    query.add_argument("--device", type=device_argument, default="cpu", help="cpu, cuda, cuda:1 ...")
    query.add_argument("--batch-size", type=int, default=8192, help="tokens (text + regions) per forward")
    query.add_argument("--out", default=None, help="also write the JSON results to this file")
    return ap


def check_positive(args: argparse.Namespace, names: Sequence[str]) -> None:
    """A ConfigError naming the first of the integer options ``names`` below 1."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")


def run_index(args: argparse.Namespace) -> dict[str, Any]:
    """``index``: add the folder's images the index lacks; returns {"index", "images", "added"}."""
    check_positive(args, ("batch_size", "shard_size"))
    if not os.path.isdir(args.images):
        raise ConfigError(f"--images: expected a folder of images, got {args.images!r} (not a folder)")
    if not os.path.isfile(args.detector):
        raise ConfigError(f"--detector: expected a BUTD weights file, got {args.detector!r} (not a file)")
    from uniter_fast.extract.extractor import Extractor
    from uniter_fast.extract.images import list_images
    from uniter_fast.inference.gallery import GalleryIndex
    from uniter_fast.inference.gallery_search import index_gallery, load_retrieval_model, made_with

    if not list_images(args.images):
        raise ConfigError(f"--images: expected a folder of images, found none in {args.images!r}")
    model, toker = load_retrieval_model(args.checkpoint, args.vocab, args.device)
    config = detector_config(args)
    extractor = Extractor(args.detector, device=args.device, config=config)
    identity = made_with(args.checkpoint, args.detector, extractor, model.first_stage_dim, toker.vocab_path)
    index = GalleryIndex.create_or_resume(args.out, args.images, identity)
    added = index_gallery(index, model, extractor, args.shard_size, args.batch_size, not args.no_progress)
    summary = {"index": args.out, "images": len(index.images), "added": added}
    print(json.dumps(summary))
    return summary


def run_query(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``query``: the best ``--top-k`` images of the index for ``--text`` (printed as JSON, returned)."""
    check_positive(args, ("top_k", "shortlist", "batch_size"))
    from uniter_fast.inference.gallery import GalleryIndex, check_made_with, file_digest
    from uniter_fast.inference.gallery_search import load_retrieval_model, search

    if args.out:
        check_new_output(args.out, "--out")
    index = GalleryIndex.open(args.index)
    saved = index.manifest["made_with"]
    given = dict(saved)
    checkpoint = args.checkpoint or saved["checkpoint"]  # its digest is checked even when taken from the index
    for key, path in (("checkpoint", checkpoint), ("detector", args.detector)):
        if path is not None:
            if not os.path.exists(path):
                raise ConfigError(f"--{key}: expected an existing path, got {path!r}")
            given.update({key: os.path.abspath(path), key + "_sha256": file_digest(path)})
    vocab = args.vocab or saved.get("vocab")
    if vocab is not None:
        if not os.path.isfile(vocab):
            raise ConfigError(f"--vocab: expected a vocab file, got {vocab!r} (not a file)")
        given.update(vocab=os.path.abspath(vocab), vocab_sha256=file_digest(vocab))
    check_made_with(args.index, saved, given, ("checkpoint", "detector", "vocab"))
    model, toker = load_retrieval_model(checkpoint, vocab, args.device)
    result = search(model, toker, index, args.text, args.top_k, args.shortlist, args.exact, args.batch_size)
    text = json.dumps(result.hits, indent=2)
    print(text)
    if args.out:
        write_text_atomic(args.out, text + "\n")
    return result.hits


def main(argv: Optional[Sequence[str]] = None) -> Any:
    """Run the subcommand of ``argv``; returns its summary (index) or results (query)."""
    args = parser().parse_args(argv)
    return run_index(args) if args.command == "index" else run_query(args)


if __name__ == "__main__":
    run_command(main)
