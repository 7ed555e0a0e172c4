"""Build the downstream task databases from your own annotations (``python -m uniter_fast.data.build --task ...``).

    python -m uniter_fast.data.build --task vqa --annotations vqa_train.jsonl --features feats/ --vocab vocab.txt \\
        --out vqa_train/ [--ans2label ans2label.json]
    python -m uniter_fast.data.build --task re --annotations refcoco/ --features det_feats/ --gt_features gt_feats/ ...
    python -m uniter_fast.data.build --task vcr --annotations vcr_val.jsonl --features det/ --gt_features gt/ ...

Writes ``out/txt`` (the task txt_db as the original ``data/<task>.py`` reads it) and ``out/img`` (+ ``out/img_gt`` for
the GT-box features of RE and VCR) atomically. Unlike the pretraining builder, a bad annotation is an error naming
the file, the line and the field (a task db with silently dropped examples gives wrong metrics). Annotation formats:
``uniter_fast.data.task_records`` (VQA, VE, NLVR2, VCR) and ``uniter_fast.data.re_db`` (RE: a directory with the
four COCO-refer files, each ref holding its ``sentences`` [{sent_id, sent}]).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Optional

import numpy as np
from tqdm import tqdm

from uniter_fast.data.img_db import ImgDbWriter
from uniter_fast.data.lmdb_env import DataError
from uniter_fast.data.re_db import RE_SIDE_FILES, check_side_file, det_image_name, gt_image_name, write_re_side_files
from uniter_fast.data.task_records import (
    CONVERTERS,
    VE_ENT2IDX,
    build_ans2label,
    encode,
    field,
    image_key,
    vcr_lengths,
)
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.data.vcr_db import NUM_SPECIAL_TOKENS
from uniter_fast.files import atomic_directory, read_json, write_json_atomic

TASKS = ("vqa", "ve", "nlvr2", "re", "vcr")
BERT_BASE_CASED_VOCAB = 28996


def read_jsonl(path: str) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) per non-empty line of ``path``; a line that is not JSON is a DataError naming it."""
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                out.append((where, json.loads(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err})") from None
    return out


def _check_image(name: str, images: set[str], db: str, where: str) -> None:
    if name not in images:
        raise DataError(f"{where}: image {name!r} has no features in the {db} img_db")


def write_task_txt_db(
    task: str,
    annotations: Iterable[tuple[str, dict[str, Any]]],
    toker: WordPiece,
    out: str,
    images: set[str],
    gt_images: Optional[set[str]] = None,
    meta_name: str = "wordpiece",
    ans2label: Optional[dict[str, int]] = None,
    special_token_base: int = BERT_BASE_CASED_VOCAB,
) -> int:
    """Write the txt_db ``out`` of ``task`` (vqa / ve / nlvr2 / vcr) from (where, annotation) pairs; every image key
    must be in ``images`` (VCR: the GT key in ``gt_images`` too). Returns the number of records."""
    meta = toker.meta(meta_name)
    if task == "vcr":
        meta.update(special_token_base=special_token_base, num_special_tokens=NUM_SPECIAL_TOKENS)
    if task == "vqa" and not ans2label:
        raise ValueError("VQA needs an answer vocabulary (ans2label)")
    lengths: dict[str, dict[str, int]] = {"qa": {}, "qar": {}}
    with TxtDbWriter(out, meta) as writer:
        for where, raw in tqdm(list(annotations), desc=f"{task} texts"):
            if task == "vqa":
                id_, ids, img, fields = CONVERTERS[task](raw, toker, ans2label, where)
            elif task == "vcr":
                id_, ids, img, fields = CONVERTERS[task](raw, toker, special_token_base, NUM_SPECIAL_TOKENS, where)
                lengths["qa"][id_], lengths["qar"][id_] = vcr_lengths(ids, fields)
            else:
                id_, ids, img, fields = CONVERTERS[task](raw, toker, where)
            if task == "vcr":
                _check_image(img[0], gt_images or set(), "GT-box", where)
                _check_image(img[1], images, "detected-box", where)
            else:
                for name in [img] if isinstance(img, str) else img:
                    _check_image(name, images, "", where)
            if not writer.add(id_, ids, img, **fields):
                raise DataError(f"{where}: duplicate id {id_!r}")
        count = len(writer.id2len)
    if task in ("vqa", "ve"):
        write_json_atomic(os.path.join(out, "ans2label.json"), ans2label if task == "vqa" else VE_ENT2IDX)
    if task == "vcr":
        for key, table in lengths.items():
            write_json_atomic(os.path.join(out, f"id2len_{key}.json"), table)
    return count


def write_re_txt_db(
    side: dict[str, list[dict[str, Any]]],
    toker: WordPiece,
    out: str,
    images: set[str],
    gt_images: set[str],
    gt_rows: dict[str, int],
    meta_name: str = "wordpiece",
    where: str = "annotations",
) -> int:
    """Write an RE txt_db: one record per sentence of ``side["refs"]`` (each ref with ``sentences``
    [{sent_id, sent}]), plus the four side files. ``gt_rows`` (GT image key -> boxes) must match each image's
    ``ann_ids``. Returns the number of sentences."""
    for name in RE_SIDE_FILES:
        check_side_file(f"{where}/{name}.json", name, side.get(name))
    anns = {a["id"]: a for a in side["annotations"]}
    imgs = {i["id"]: i for i in side["images"]}
    with TxtDbWriter(out, toker.meta(meta_name)) as writer:
        for r, ref in enumerate(side["refs"]):
            at = f"{where}/refs.json record {r}"
            image = imgs.get(ref["image_id"])
            if image is None or ref["ann_id"] not in image["ann_ids"] or ref["ann_id"] not in anns:
                raise DataError(
                    f"{at}: ann_id {ref['ann_id']} of image {ref['image_id']} is not in images.json "
                    "ann_ids / annotations.json"
                )
            gt_name, det_name = gt_image_name(image["id"]), det_image_name(image["id"])
            _check_image(gt_name, gt_images, "GT-box", at)
            _check_image(det_name, images, "detected-box", at)
            if gt_rows[gt_name] != len(image["ann_ids"]):
                raise DataError(
                    f"{at}: image {image['id']} has {len(image['ann_ids'])} ann_ids but "
                    f"{gt_rows[gt_name]} GT-box features"
                )
            for sentence in field(ref, "sentences", list, at):
                sent_id = str(field(sentence, "sent_id", (str, int), at))
                sent = field(sentence, "sent", str, at)
                fields = {
                    "sent_id": sent_id,
                    "sent": sent,
                    "ref_id": ref["ref_id"],
                    "ann_id": ref["ann_id"],
                    "image_id": image["id"],
                    "bbox": anns[ref["ann_id"]]["bbox"],
                }
                if not writer.add(sent_id, encode(toker, sent, "sent", at), gt_name, **fields):
                    raise DataError(f"{at}: duplicate sent_id {sent_id!r}")
        count = len(writer.id2len)
    write_re_side_files(out, side)
    return count


def _write_npz_dir(directory: str, writer: ImgDbWriter, rename: dict[str, str]) -> dict[str, int]:
    """Store every ``<name>.npz`` of ``directory`` that ``rename`` maps (to its db key); returns key -> rows."""
    rows = {}
    for stem, key in tqdm(sorted(rename.items()), desc=f"features {os.path.basename(directory)}"):
        path = os.path.join(directory, stem if stem.endswith(".npz") else stem + ".npz")
        if not os.path.isfile(path):
            raise DataError(f"features: {path!r} is missing (needed for image {key!r})")
        with np.load(path, allow_pickle=False) as npz:
            try:
                arrays = {k: npz[k] for k in ("features", "norm_bb", "conf", "soft_labels")}
            except KeyError as err:
                raise DataError(f"features: {path!r} lacks the array {err.args[0]!r}") from None
        if not writer.add(key, **arrays):
            raise DataError(f"features: {path!r} was rejected (see the warning above)")
        rows[key] = len(arrays["features"])
    return rows


def build_task_dbs(
    task: str,
    annotations: str,
    features: str,
    vocab: str,
    out: str,
    gt_features: Optional[str] = None,
    ans2label: Optional[str] = None,
    special_token_base: int = BERT_BASE_CASED_VOCAB,
    conf_th: float = 0.2,
    max_bb: int = 100,
    min_bb: int = 10,
    num_bb: int = 36,
    toker_name: Optional[str] = None,
) -> dict[str, Any]:
    """Write ``out/txt``, ``out/img`` (and ``out/img_gt``) for ``task``; returns the counts. ``out`` must not exist."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if os.path.exists(out):
        raise FileExistsError(f"out {out!r} already exists; choose a new directory")
    if task in ("re", "vcr") and not gt_features:
        raise ValueError(f"task {task!r} needs --gt_features (the GT-box features)")
    toker = WordPiece(vocab)
    name = toker_name or os.path.basename(os.path.dirname(os.path.abspath(vocab))) or "wordpiece"
    with atomic_directory(out) as tmp:
        return _build(
            task,
            annotations,
            features,
            gt_features,
            ans2label,
            special_token_base,
            toker,
            name,
            tmp,
            (conf_th, max_bb, min_bb, num_bb),
        )


def _build(
    task: str,
    annotations: str,
    features: str,
    gt_features: Optional[str],
    ans2label_path: Optional[str],
    base: int,
    toker: WordPiece,
    name: str,
    tmp: str,
    box_settings: tuple[float, int, int, int],
) -> dict[str, Any]:
    """The body of :func:`build_task_dbs`, writing into ``tmp``."""
    img_w = ImgDbWriter(os.path.join(tmp, "img"), *box_settings)
    gt_w = ImgDbWriter(os.path.join(tmp, "img_gt"), conf_th=-1, num_bb=100) if gt_features else None
    if task == "re":
        side = {n: read_json(os.path.join(annotations, f"{n}.json")) for n in RE_SIDE_FILES}
        for n in RE_SIDE_FILES:
            check_side_file(os.path.join(annotations, f"{n}.json"), n, side[n])
        stems = {os.path.splitext(i.get("file_name", str(i["id"])))[0]: i["id"] for i in side["images"]}
        with img_w:
            _write_npz_dir(features, img_w, {s: det_image_name(i) for s, i in stems.items()})
        with gt_w:
            gt_rows = _write_npz_dir(gt_features, gt_w, {s: gt_image_name(i) for s, i in stems.items()})
        count = write_re_txt_db(
            side, toker, os.path.join(tmp, "txt"), set(img_w.name2nbb), set(gt_rows), gt_rows, name, annotations
        )
        return {"texts": count, "images": len(img_w.name2nbb), "gt_images": len(gt_rows)}
    records = read_jsonl(annotations)
    keys, gt_keys = set(), set()
    for where, raw in records:
        img = field(raw, "images", list, where) if task == "nlvr2" else [field(raw, "image", str, where)]
        keys.update(image_key(str(x)) for x in img)
        if task == "vcr":
            gt_keys.add(image_key(str(raw.get("gt_image", img[0]))))
    with img_w:
        _write_npz_dir(features, img_w, {k: k for k in keys})
    gt_names: set[str] = set()
    if gt_w is not None:
        with gt_w:
            gt_names = set(_write_npz_dir(gt_features, gt_w, {k: k for k in gt_keys}))
    ans2label = None
    if task == "vqa":
        ans2label = (
            read_json(ans2label_path) if ans2label_path else build_ans2label((r for _, r in records), annotations)
        )
    count = write_task_txt_db(
        task, records, toker, os.path.join(tmp, "txt"), set(img_w.name2nbb), gt_names, name, ans2label, base
    )
    return {"texts": count, "images": len(img_w.name2nbb), "gt_images": len(gt_names)}
