"""The bundled task sets: VQA, VE, NLVR2, RE and VCR databases generated from the pretraining corpus's world.

``task_sets()`` builds them on first use (about a minute on a laptop CPU, then cached beside the corpus under
``$UNITER_FAST_CACHE`` or ``~/.cache/uniter_fast``) and returns the root; ``resolve_bundled("vqa/txt_train")`` gives
a path inside it. They go through the same builders as your own annotations (``uniter_fast.data.build_tasks``), so
the demo exercises the real formats. Layout::

    vocab.txt                              corpus vocab + task words (corpus ids unchanged)
    pool/img_det  pool/img_gt  pool/scenes.json   1500 images (1200 train, 150 val, 150 test)
    vqa/txt_{train,val,test}  ve/...  nlvr2/...  re/...   vcr/txt_{train,val}
    itm/txt_{train,val,test}               5 captions per image (built on first use, ``synthetic/itm.py``)
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from uniter_fast.config import UniterConfig
from uniter_fast.data.build_tasks import write_re_txt_db, write_task_txt_db
from uniter_fast.data.corpus import CORPUS_VERSION, DEFAULT_SEED, cache_dir, default_corpus
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.files import build_directory_once
from uniter_fast.tasks.synthetic.itm import ITM_DIR, build_itm_sets
from uniter_fast.tasks.synthetic.nlvr2 import nlvr2_annotations
from uniter_fast.tasks.synthetic.pool import Scene, build_pool
from uniter_fast.tasks.synthetic.re import re_annotations
from uniter_fast.tasks.synthetic.text import extend_vocab, texts_of
from uniter_fast.tasks.synthetic.vcr import vcr_annotations
from uniter_fast.tasks.synthetic.vqa_ve import VQA_ANSWERS, ve_annotations, vqa_annotations

TASK_SETS_VERSION = "tasks-v3"
IMAGES = {"train": 1200, "val": 150, "test": 150}
PER_IMAGE = {"train": 3, "val": 2, "test": 2}
NLVR2_SENTENCES = {"train": 1500, "val": 150, "test": 150}
VCR_SPECIAL_TOKEN_BASE = UniterConfig.tiny().vocab_size  # tags sit after the tiny model's word table
BUNDLED_PREFIX = "bundled:"


def _annotations(scenes: list[Scene], seed: int) -> dict[str, dict[str, object]]:
    """Every task's annotations by split (deterministic in ``seed``)."""
    out: dict[str, dict[str, object]] = {t: {} for t in ("vqa", "ve", "nlvr2", "re", "vcr")}
    for n, split in enumerate(IMAGES):
        part = [s for s in scenes if s.split == split]
        if not part:
            continue

        def rng(task: int, split_id: int = n) -> np.random.Generator:
            return np.random.default_rng([seed, 200 + task, split_id])

        out["vqa"][split] = vqa_annotations(part, rng(0), PER_IMAGE[split])
        out["ve"][split] = ve_annotations(part, rng(1), PER_IMAGE[split])
        out["nlvr2"][split] = nlvr2_annotations(part, rng(2), NLVR2_SENTENCES[split], split)
        out["re"][split] = re_annotations(part, rng(3), split)
        if split != "test":
            out["vcr"][split] = vcr_annotations(part, rng(4), split)
    return out


def build_task_sets(out_dir: str, base_vocab: str, seed: int = DEFAULT_SEED) -> str:
    """Generate every bundled task set into ``out_dir`` (must not exist); returns ``out_dir``."""
    if os.path.exists(out_dir):
        raise FileExistsError(f"out_dir {out_dir!r} already exists")
    os.makedirs(out_dir)
    scenes = build_pool(os.path.join(out_dir, "pool"), seed, IMAGES)
    annotations = _annotations(scenes, seed)
    texts = [t for task in annotations.values() for split in task.values() for t in texts_of(_records(split))]
    vocab = os.path.join(out_dir, "vocab.txt")
    extend_vocab(base_vocab, texts, vocab)
    toker = WordPiece(vocab)
    name = f"synth-task-wordpiece-{seed}"
    det = {s.det_name for s in scenes}
    gt_rows = {s.gt_name: len(s.objects) for s in scenes}
    ans2label = {a: i for i, a in enumerate(VQA_ANSWERS)}
    for task, splits in annotations.items():
        for split, records in splits.items():
            out = os.path.join(out_dir, task, f"txt_{split}")
            where = f"bundled {task} {split}"
            if task == "re":
                write_re_txt_db(records, toker, out, det, set(gt_rows), gt_rows, name, where)
                continue
            pairs = [(f"{where} record {i}", r) for i, r in enumerate(records)]
            write_task_txt_db(task, pairs, toker, out, det, set(gt_rows), name, ans2label, VCR_SPECIAL_TOKEN_BASE)
    return out_dir


def _records(split: object) -> list[dict]:
    """Annotation dicts of one split (RE keeps its sentences inside the refs)."""
    return split["refs"] if isinstance(split, dict) else split


def task_sets(root: Optional[str] = None) -> str:
    """The bundled task sets' directory, built on first use (safe under concurrent first calls: each builder writes
    a private temp dir and renames it into place)."""
    root = root or cache_dir()
    final = os.path.join(root, f"{TASK_SETS_VERSION}-{CORPUS_VERSION}")
    return build_directory_once(final, lambda out: build_task_sets(out, default_corpus(root).vocab))


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
