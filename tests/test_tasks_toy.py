"""The task contract from outside the package: a toy task defined in this file alone (model, data, metric, db
builder) joins the registry and runs through the public CLIs: ``python -m uniter_fast.build`` builds its dbs,
``finetune.py`` trains it, ``python -m uniter_fast.evaluate`` evaluates the export. No file of the package names it.

The toy task: "is the scene bright?" A caption and an image; the label is 1 when the image's regions are bright
(the first half of the feature channels high) and 0 when dark (the second half high), whatever the caption says, so
a tiny model learns it in a few steps from the region features. Run as a script (``python tests/test_tasks_toy.py
build|finetune|evaluate ARGS``), this file registers the task and calls that CLI's ``main`` with ARGS, in a fresh
process as a user's own launcher would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.data import TxtTokLmdb
from uniter_fast.data.task_db import check_image, write_records
from uniter_fast.data.task_records import encode, field, image_key
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks import register
from uniter_fast.tasks.data import DbCache, TaskDataset, collate_rows, image_inputs, row
from uniter_fast.tasks.spec import Task, ratio, scores_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["a", "the", "scene", "is", "bright", "dark", "room", "with", "lamp", "sky"]


class UniterForToy(UniterPreTrainedModel):
    """UNITER + ``toy_output`` (Linear(H, 2)) on the pooled [CLS]; CE loss."""

    def __init__(self, config: UniterConfig, fast: bool = False) -> None:
        super().__init__(config, fast)
        self.toy_output = nn.Linear(config.hidden_size, 2)
        self.init_head_weights(self.toy_output)

    def forward(self, batch: dict[str, Any], task: Any = None, compute_loss: bool = True) -> dict[str, torch.Tensor]:
        scores = self.toy_output(self._pooled(batch, self._encode(batch)))
        if not compute_loss:
            return {"scores": scores}
        return {"loss": F.cross_entropy(scores.float(), batch["targets"])}


class ToyDataset(TaskDataset):
    """Captions with their image and label; ``lens`` = wordpieces + boxes."""

    task = "toy"

    def __init__(self, txt_db: TxtTokLmdb, img_db: Any, seed: int = 0) -> None:
        ids = list(txt_db.id2len)
        lens = np.array([txt_db.id2len[i] + img_db.name2nbb[txt_db.txt2img[i]] for i in ids])
        super().__init__(txt_db, ids, lens, seed)
        self.img_db = img_db

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.record(index)
        feat, pos = image_inputs(self.img_db, record["img_fname"], f"text {self.ids[index]!r}")
        item = row(self.txt_db.combine_inputs(record["input_ids"]), feat, pos)
        item.update(target=int(record["target"]), id=self.ids[index])
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_rows(items, self.task)
        batch["targets"] = torch.tensor([it["target"] for it in items])
        batch["ids"] = [it["id"] for it in items]
        return batch


class ToyTask(Task):
    """The contract, nothing more: model, datasets, metric, predictions, db builder."""

    name = "toy"
    heads = ("toy_output",)
    sums = ("loss", "correct", "count")
    headline = "acc"

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        return UniterForToy(config, fast)

    def train_dataset(self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int):
        return ToyDataset(dbs.txt(TxtTokLmdb, txt_path, True), dbs.img(img_path), seed)

    def eval_dataset(self, dbs, txt_path, img_path, options, split, seed=0):
        return ToyDataset(dbs.txt(TxtTokLmdb, txt_path, False), dbs.img(img_path))

    def eval_batch(self, model: Any, batch: dict[str, Any], options: dict[str, Any]):
        scores = scores_of(model, batch)
        predicted = scores.argmax(dim=1)
        sums = {
            "loss": float(F.cross_entropy(scores, batch["targets"], reduction="sum")),
            "correct": float((predicted == batch["targets"]).sum()),
            "count": float(len(batch["ids"])),
        }
        return sums, [{"id": i, "bright": int(p)} for i, p in zip(batch["ids"], predicted.tolist())]

    def metrics(self, sums: dict[str, float], predictions: list[Any]) -> dict[str, float]:
        return {"acc": ratio(sums["correct"], sums["count"]), "loss": ratio(sums["loss"], sums["count"])}

    def write_predictions(self, predictions: list[Any], directory: str, stem: str, meta: Any = None) -> list[str]:
        path = os.path.join(directory, f"{stem}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(sorted(predictions, key=lambda p: p["id"]), f)
        return [path]

    def write_txt_db(self, annotations, toker, out, images, gt_rows, meta_name, options) -> int:
        records = []
        for where, raw in annotations:
            image = image_key(field(raw, "image", str, where))
            check_image(image, images, "detected-box", where)
            label = field(raw, "label", int, where)
            ids = encode(toker, field(raw, "caption", str, where), "caption", where)
            records.append((where, str(field(raw, "id", (str, int), where)), ids, image, {"target": label}))
        return write_records(out, toker.meta(meta_name), records, desc="toy texts")


# ---------------------------------------------------------------------------------------------------- the data
def write_inputs(root: str, count: int, seed: int) -> dict[str, str]:
    """A vocab, ``count`` images' features (.npz, 10-14 boxes, bright or dark) and their captions (JSON lines)."""
    rng = np.random.default_rng(seed)
    feats = os.path.join(root, "feats")
    os.makedirs(feats, exist_ok=True)
    with open(os.path.join(root, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    lines = []
    for i in range(count):
        bright = int(rng.integers(2))
        boxes = int(rng.integers(10, 15))
        features = 0.5 * rng.random((boxes, 2048), dtype=np.float32)
        features[:, :1024] += 0.5 * bright  # a direction, not a scale: the image LayerNorm removes scales
        features[:, 1024:] += 0.5 * (1 - bright)
        corners = np.sort(rng.random((boxes, 4)), axis=1)[:, [0, 2, 1, 3]]
        norm_bb = np.concatenate([corners, corners[:, 2:] - corners[:, :2]], axis=1).astype(np.float32)
        soft = rng.dirichlet(np.ones(1601), size=boxes).astype(np.float32)
        conf = rng.random(boxes).astype(np.float32)
        np.savez(
            os.path.join(feats, f"img{i}.npz"),
            features=features.astype(np.float16),
            norm_bb=norm_bb,
            conf=conf,
            soft_labels=soft,
        )
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7))))
        lines.append(json.dumps({"id": f"t{i}", "image": f"img{i}", "caption": caption, "label": bright}))
    annotations = os.path.join(root, "toy.jsonl")
    with open(annotations, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return {"features": feats, "vocab": os.path.join(root, "vocab.txt"), "annotations": annotations}


def cli(tmp_path: Any, *args: str) -> subprocess.CompletedProcess:
    """This file as a script: register the toy task, then run the named CLI with ``args``."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_a_task_defined_outside_the_package_builds_trains_and_evaluates(tmp_path) -> None:
    root = str(tmp_path)
    for split, count, seed in (("train", 160, 1), ("val", 40, 2)):
        inputs = write_inputs(os.path.join(root, split), count, seed)
        proc = cli(
            tmp_path,
            "build",
            "--task",
            "toy",
            "--annotations",
            inputs["annotations"],
            "--features",
            inputs["features"],
            "--vocab",
            inputs["vocab"],
            "--out",
            os.path.join(root, f"db_{split}"),
        )
        assert json.loads(proc.stdout) == {"texts": count, "images": count, "gt_images": 0}
    config = {
        "task": "toy",
        "train_txt_db": "db_train/txt",
        "train_img_db": "db_train/img",
        "val_txt_db": "db_val/txt",
        "val_img_db": "db_val/img",
        "output_dir": "out",
        "train_batch_size": 1024,
        "val_batch_size": 4096,
        "learning_rate": 1e-3,
        "warmup_steps": 4,
        "valid_steps": 20,
        "num_train_steps": 40,
        "dropout": 0.0,
    }
    with open(os.path.join(root, "toy.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    proc = cli(tmp_path, "finetune", "--config", "toy.json", "--ds_config", os.path.join(REPO, "ds.json"))
    assert "final toy metrics after 40 steps (1 rank(s), ZeRO-2)" in proc.stdout
    log = [json.loads(line) for line in open(os.path.join(root, "out", "validation.jsonl"), encoding="utf-8")]
    first, last = log[0], log[-1]
    assert (first["step"], last["step"]) == (20, 40) and last["acc"] >= 0.9, log
    steps = [json.loads(line) for line in open(os.path.join(root, "out", "train_steps.jsonl"), encoding="utf-8")]
    assert len(steps) == 40 and np.mean([s["loss"] for s in steps[-5:]]) < np.mean([s["loss"] for s in steps[:5]])
    with open(os.path.join(root, "out", "results", "val_results_40.json"), encoding="utf-8") as f:
        assert [p["id"] for p in json.load(f)] == sorted(f"t{i}" for i in range(40))
    proc = cli(tmp_path, "evaluate", "--checkpoint", "out/finetuned", "--config", "toy.json")
    assert "toy evaluation of out/finetuned" in proc.stdout
    row_ = next(line.split() for line in proc.stdout.splitlines() if line.startswith("val "))
    assert float(row_[1]) == pytest.approx(last["acc"], abs=1e-4)  # the export holds the trained weights


if __name__ == "__main__":
    register(ToyTask())
    from uniter_fast import build, evaluate, finetune

    {"build": build.main, "finetune": finetune.main, "evaluate": evaluate.main}[sys.argv[1]](sys.argv[2:])
