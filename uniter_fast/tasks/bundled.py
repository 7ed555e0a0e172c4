"""The bundled task sets: every registered task's bundled synthetic set (``Task.bundled_split``), generated from the
pretraining corpus's world.

``task_sets()`` builds them on first use (about a minute on a laptop CPU, then cached beside the corpus under
``$UNITER_FAST_CACHE`` or ``~/.cache/uniter_fast``) and returns the root; ``resolve_bundled("vqa/txt_train")`` gives
a path inside it. They go through the same builders as your own annotations (``Task.write_txt_db``), so the demo
exercises the real formats. Layout::

    vocab.txt                              corpus vocab + task words (corpus ids unchanged)
    pool/img_det  pool/img_gt  pool/scenes.json   1500 images (1200 train, 150 val, 150 test)
    vqa/txt_{train,val,test}  ve/...  nlvr2/...  re/...   vcr/txt_{train,val}
    itm/txt_{train,val,test}               5 captions per image (built on first use, ``synthetic/itm.py``)
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from uniter_fast.data.corpus import CORPUS_VERSION, DEFAULT_SEED, cache_dir, default_corpus
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.files import build_directory_once
from uniter_fast.tasks import TASKS
from uniter_fast.tasks.spec import Task
from uniter_fast.tasks.synthetic.itm import ITM_DIR, build_itm_sets
from uniter_fast.tasks.synthetic.pool import Scene, build_pool
from uniter_fast.tasks.synthetic.text import extend_vocab

TASK_SETS_VERSION = "tasks-v3"
IMAGES = {"train": 1200, "val": 150, "test": 150}
BUNDLED_PREFIX = "bundled:"


def bundled_annotations(scenes: list[Scene], seed: int) -> dict[str, dict[str, tuple[Any, dict]]]:
    """{task name: {split: (annotations, build options)}} of every task with a bundled set (deterministic in
    ``seed``: task t's split n draws from the generator seeded by (seed, 200 + t's ``bundled_stream``, n))."""
    tasks: list[Task] = [t for t in TASKS.values() if t.bundled_stream is not None]
    out: dict[str, dict[str, tuple[Any, dict]]] = {t.name: {} for t in tasks}
    for n, split in enumerate(IMAGES):
        part = [s for s in scenes if s.split == split]
        if not part:
            continue
        for task in tasks:
            made = task.bundled_split(part, np.random.default_rng([seed, 200 + task.bundled_stream, n]), split)
            if made is not None:
                out[task.name][split] = made
    return out


def build_task_sets(out_dir: str, base_vocab: str, seed: int = DEFAULT_SEED) -> str:
    """Generate every bundled task set into ``out_dir`` (must not exist); returns ``out_dir``."""
    if os.path.exists(out_dir):
        raise FileExistsError(f"out_dir {out_dir!r} already exists")
    os.makedirs(out_dir)
    scenes = build_pool(os.path.join(out_dir, "pool"), seed, IMAGES)
    annotations = bundled_annotations(scenes, seed)
    texts = [
        text
        for name, splits in annotations.items()
        for records, _ in splits.values()
        for text in TASKS[name].annotation_texts(records)
    ]
    vocab = os.path.join(out_dir, "vocab.txt")
    extend_vocab(base_vocab, texts, vocab)
    toker = WordPiece(vocab)
    meta_name = f"synth-task-wordpiece-{seed}"
    det = {s.det_name for s in scenes}
    gt_rows = {s.gt_name: len(s.objects) for s in scenes}
    for name, splits in annotations.items():
        for split, (records, options) in splits.items():
            out = os.path.join(out_dir, name, f"txt_{split}")
            TASKS[name].write_txt_db(records, toker, out, det, gt_rows, meta_name, options)
    return out_dir


def task_sets_dir(root: Optional[str] = None) -> str:
    """Where the bundled task sets live (built or not) under the cache ``root``."""
    return os.path.join(root or cache_dir(), f"{TASK_SETS_VERSION}-{CORPUS_VERSION}")


def task_sets(root: Optional[str] = None) -> str:
    """The bundled task sets' directory, built on first use (safe under concurrent first calls: each builder writes
    a private temp dir and renames it into place)."""
    root = root or cache_dir()
    return build_directory_once(task_sets_dir(root), lambda out: build_task_sets(out, default_corpus(root).vocab))


def bundled_vocab(txt_paths: Sequence[str]) -> Optional[str]:
    """The bundled sets' WordPiece ``vocab.txt`` when every txt_db of ``txt_paths`` (resolved paths) lies in them (a
    model trained there reads its words), else None."""
    root = os.path.realpath(task_sets_dir())
    inside = [os.path.commonpath([root, os.path.realpath(path)]) == root for path in txt_paths]
    vocab = os.path.join(root, "vocab.txt")
    return vocab if inside and all(inside) and os.path.isfile(vocab) else None


def resolve_bundled(path: str) -> str:
    """``bundled:<rel>`` (e.g. ``bundled:vqa/txt_train``) -> the path inside :func:`task_sets`; other paths as given.
    Parts joined by ';' (VCR's ``gt;det`` img_db pair) are resolved one by one."""
    if ";" in path:
        return ";".join(resolve_bundled(p) for p in path.split(";"))
    if not path.startswith(BUNDLED_PREFIX):
        return path
    rel = path[len(BUNDLED_PREFIX) :]
    if rel.split("/", 1)[0] == ITM_DIR:
        build_itm_sets(task_sets())
    full = os.path.join(task_sets(), rel)
    if not os.path.exists(full):
        raise FileNotFoundError(f"{path!r}: the bundled task sets have no {rel!r} (see uniter_fast.tasks.synthetic)")
    return full
