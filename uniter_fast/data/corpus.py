"""The bundled default corpus: the synthetic world of :mod:`world` written through the real txt_db / img_db writers.

``default_corpus()`` builds it on first use under ``$UNITER_FAST_CACHE`` (or ``~/.cache/uniter_fast``) and returns
the paths; later calls (and other processes) reuse the finished directory, which appears atomically.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
from tqdm import tqdm

from uniter_fast.data.img_db import ImgDbWriter
from uniter_fast.data.tokenizer import WordPiece, build_vocab
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.data.world import World
from uniter_fast.files import build_directory_once, write_json_atomic

CORPUS_VERSION = "synth-v5"
DEFAULT_SEED = 1234
CLASS_NAMES_FILE = "class_names.json"  # in the img_db: soft-label column -> class name of the synthetic world


@dataclasses.dataclass(frozen=True)
class CorpusPaths:
    """Where a built corpus lives: txt_db dirs (train / val), the shared img_db dir, the vocab file and its size."""

    root: str
    txt_db: str
    txt_db_val: str
    img_db: str
    vocab: str
    vocab_size: int


def _paths(root: str) -> CorpusPaths:
    vocab = os.path.join(root, "vocab.txt")
    with open(vocab, encoding="utf-8") as f:
        size = sum(1 for _ in f)
    return CorpusPaths(
        root=root,
        txt_db=os.path.join(root, "txt_train"),
        txt_db_val=os.path.join(root, "txt_val"),
        img_db=os.path.join(root, "img"),
        vocab=vocab,
        vocab_size=size,
    )


def cache_dir() -> str:
    """``$UNITER_FAST_CACHE`` or ``~/.cache/uniter_fast``."""
    return os.environ.get("UNITER_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "uniter_fast")


def build_corpus(
    out_dir: str,
    seed: int = DEFAULT_SEED,
    n_train_images: int = 1500,
    n_val_images: int = 150,
    captions_per_image: int = 2,
) -> CorpusPaths:
    """Generate the synthetic world into ``out_dir`` (must not exist): vocab.txt, txt_train/, txt_val/, img/.

    Deterministic in ``seed``. Pairs = images x ``captions_per_image``; img/ holds train and val images.
    """
    if os.path.exists(out_dir):
        raise FileExistsError(f"out_dir {out_dir!r} already exists")
    if not 1 <= captions_per_image <= 4:
        raise ValueError(f"captions_per_image must be in [1, 4], got {captions_per_image}")
    os.makedirs(out_dir)
    world = World(seed)
    splits = {"train": n_train_images, "val": n_val_images}

    def layout_rng(split_id: int, i: int) -> np.random.Generator:
        return np.random.default_rng([seed, 1, split_id, i])

    vocab = os.path.join(out_dir, "vocab.txt")
    texts = (c for i in range(n_train_images) for c in world.captions(layout_rng(0, i), captions_per_image))
    build_vocab(texts, vocab)
    toker = WordPiece(vocab)
    with ImgDbWriter(os.path.join(out_dir, "img")) as img_w:
        for split_id, (split, count) in enumerate(splits.items()):
            with TxtDbWriter(os.path.join(out_dir, f"txt_{split}"), toker.meta(f"synth-wordpiece-{seed}")) as txt_w:
                for i in tqdm(range(count), desc=f"corpus {split}"):
                    im = world.image(
                        layout_rng(split_id, i), np.random.default_rng([seed, 2, split_id, i]), captions_per_image
                    )
                    name = f"synth_{split}_{i:06d}.npz"
                    img_w.add(name, im.features, im.norm_bb, im.conf, im.soft_labels)
                    for j, ids in enumerate(toker.encode_batch(im.captions)):
                        txt_w.add(f"{split}_{i:06d}_{j}", ids, name, sent=im.captions[j])
    write_json_atomic(os.path.join(out_dir, "img", CLASS_NAMES_FILE), world.class_names())
    return _paths(out_dir)


def default_corpus(root: Optional[str] = None) -> CorpusPaths:
    """The bundled corpus (about 3000 train / 300 val pairs over 1650 images), built on first use.

    ``root`` defaults to :func:`cache_dir`. Safe under concurrent first calls: each builder writes a private temp dir
    and renames it into place; a loser of the race discards its copy.
    """
    root = root or cache_dir()
    return _paths(build_directory_once(os.path.join(root, CORPUS_VERSION), build_corpus))
