"""Build a pretraining txt_db + img_db from your own captions and features (the original's
``scripts/convert_imgdir.py`` and ``prepro.py``, in one call; the CLI is ``python -m uniter_fast.build``).

captions.jsonl: one ``{"id", "image", "caption"}`` object a line (``image`` = the .npz name, ".npz" optional).
feats_dir: one ``.npz`` per image with ``features`` [n, 2048], ``norm_bb`` [n, 6], ``conf`` [n], ``soft_labels``
[n, 1601] (BUTD ``generate_npz.py`` output). Writes ``db/txt`` and ``db/img`` (the directory appears atomically).
Bad records are skipped with a warning and counted; the counts are printed as JSON at the end. A build that would
write no image or no caption is a :class:`~uniter_fast.errors.DataError` saying why, and leaves nothing behind.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from typing import Any, Optional, Union

from tqdm import tqdm

from uniter_fast.data.img_db import ImgDbWriter, load_npz
from uniter_fast.data.task_db import Imported
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.errors import DataError
from uniter_fast.files import atomic_directory


def _write_images(feats_dir: str, writer: ImgDbWriter) -> int:
    paths = sorted(glob.glob(os.path.join(feats_dir, "*.npz")))
    if not paths:
        raise DataError(f"features: no .npz files in {feats_dir!r}")
    corrupt = 0
    for path in tqdm(paths, desc="images"):
        try:
            arrays = load_npz(path)
        except DataError as exc:  # an unreadable file is a skipped record, as convert_imgdir.py does
            corrupt += 1
            warnings.warn(f"{exc}; skipped", stacklevel=2)
            continue
        writer.add(os.path.basename(path), **arrays)
    return corrupt


def _caption_lines(path: str) -> list[tuple[str, Any]]:
    """(where, the line's JSON object, or the line's bytes when it is not JSON) per non-empty line of ``path``."""
    out: list[tuple[str, Any]] = []
    with open(path, "rb") as f:
        for lineno, line in enumerate((line for line in f if line.strip()), 1):
            try:
                out.append((f"captions line {lineno}", json.loads(line.decode("utf-8"))))
            except ValueError:
                out.append((f"captions line {lineno}", line))
    return out


def _write_captions(
    captions: list[tuple[str, Any]], toker: WordPiece, images: set[str], writer: TxtDbWriter
) -> dict[str, int]:
    counts = {"malformed_line": 0, "missing_image": 0}
    for where, rec in tqdm(captions, desc="captions"):
        try:
            id_, image, caption = str(rec["id"]), str(rec["image"]), str(rec["caption"])
        except (KeyError, TypeError, IndexError) as exc:
            counts["malformed_line"] += 1
            warnings.warn(f"{where}: not a {{id, image, caption}} object ({exc!r}); skipped", stacklevel=2)
            continue
        image = image if image.endswith(".npz") else image + ".npz"
        if image not in images:
            counts["missing_image"] += 1
            warnings.warn(f"caption {id_!r}: image {image!r} has no usable features; skipped", stacklevel=2)
            continue
        try:
            if not writer.add(id_, toker.encode(caption), image, sent=caption):
                warnings.warn(f"caption {id_!r}: empty after tokenisation or duplicate id; skipped", stacklevel=2)
        except DataError as exc:
            counts["malformed_line"] += 1
            warnings.warn(f"{where}: {exc}; skipped", stacklevel=2)
    return counts


def build_dbs(
    captions: Union[str, Imported],
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
    """Write ``out/txt`` and ``out/img`` from the captions file ``captions`` (or caption records an importer read);
    returns the written and skipped counts. ``out`` must not exist."""
    if os.path.exists(out):
        raise FileExistsError(f"out {out!r} already exists; choose a new directory")
    files = [("vocab", vocab)] if isinstance(captions, Imported) else [("captions", captions), ("vocab", vocab)]
    for name, path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{name} file {path!r} does not exist")
    if not os.path.isdir(features):
        raise FileNotFoundError(f"features directory {features!r} does not exist")
    toker = WordPiece(vocab)
    with atomic_directory(out) as tmp:
        with ImgDbWriter(os.path.join(tmp, "img"), conf_th, max_bb, min_bb, num_bb, compress) as img_w:
            unreadable = _write_images(features, img_w)
        skipped_images = {**img_w.skipped, "unreadable": unreadable}
        if not img_w.name2nbb:
            raise DataError(
                f"features: none of the .npz files in {features!r} is usable (skipped: {_counts(skipped_images)}; the "
                "warnings name each file); nothing written"
            )
        meta = toker.meta(toker_name or os.path.basename(os.path.dirname(os.path.abspath(vocab))) or "wordpiece")
        with TxtDbWriter(os.path.join(tmp, "txt"), meta) as txt_w:
            records = captions.annotations if isinstance(captions, Imported) else _caption_lines(captions)
            caption_counts = _write_captions(records, toker, set(img_w.name2nbb), txt_w)
        skipped_texts = {**txt_w.skipped, **caption_counts}
        if not txt_w.id2len:
            why = f"skipped: {_counts(skipped_texts)}" if _counts(skipped_texts) else "the file holds none"
            source = captions.source if isinstance(captions, Imported) else captions
            raise DataError(f"captions {source!r}: no caption is usable ({why}); nothing written")
    return {
        "images": len(img_w.name2nbb),
        "texts": len(txt_w.id2len),
        "skipped_images": skipped_images,
        "skipped_texts": skipped_texts,
    }


def _counts(skipped: dict[str, int]) -> str:
    """The non-zero counts of ``skipped`` as "name n, ..." (a builder's reason for writing nothing)."""
    return ", ".join(f"{name} {n}" for name, n in skipped.items() if n)
