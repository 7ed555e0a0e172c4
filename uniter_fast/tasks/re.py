"""Referring expressions (the original ``model/re.py``, ``data/re.py``, ``train_re.py``, ``inf_re.py``).

Model: ``re_output`` scores every region output (Linear(H, 1), or with ``mlp`` 2 Linear, GELU, LayerNorm, Linear);
non-regions (padding) get -1e4. Losses: ``cls``, cross-entropy over the regions; ``rank``, max(0, margin +
sigmoid(s_neg) - sigmoid(s_pos)) with one negative per expression, the highest-scoring other region with
probability ``hard_ratio`` else a uniform other region. Both are summed over the batch (``train_re.py``:
``loss.sum()``), and batches count expressions (``train_batch_size`` 128), not tokens.

Data: ``ReTxtTokLmdb`` (one record per sentence, the COCO-refer side files) with GT-box features for training (the
target is the referent's row among the image's ``ann_ids``) and GT- or detected-box features for evaluation. An
img_db directory whose name contains "gt" is a GT-box db (as the original's ``"coco_gt" in img_path``). Metric:
accuracy, the share of expressions whose top region's box has IoU > 0.5 with the referent's box (``computeIoU``
with its inclusive-pixel convention). Predictions: ``results.json`` {"acc", "predictions": [{sent_id, pred_box,
tgt_box}]} as ``inf_re.py`` (boxes [x, y, w, h] in pixels).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.data import DetectFeatLmdb
from uniter_fast.data.memory_db import memory_img_db, memory_txt_writer
from uniter_fast.data.re_db import (
    ReTxtTokLmdb,
    det_image_name,
    gt_image_name,
    re_image_files,
    re_records,
    read_re_annotations,
    write_re_txt_db,
)
from uniter_fast.data.task_db import GT_BOX_SETTINGS
from uniter_fast.errors import DataError
from uniter_fast.layout import padded_index
from uniter_fast.model.activations import Gelu
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks.data import DbCache, TaskDataset, collate_rows, image_inputs, random_rows, row
from uniter_fast.tasks.spec import (
    QUERY_VOCAB_NAME,
    Query,
    Task,
    ratio,
    require,
    scores_of,
    write_json_results,
)
from uniter_fast.tasks.synthetic.re import re_annotations
from uniter_fast.tasks.synthetic.text import texts_of

if TYPE_CHECKING:
    from uniter_fast.data.tokenizer import WordPiece

NOT_A_REGION = -1e4
QUERY_ANN_STRIDE = 1000  # ann id of box k of query image i: i * QUERY_ANN_STRIDE + k (more than any box count)


class UniterForReferringExpressionComprehension(UniterPreTrainedModel):
    """UNITER + ``re_output`` on each region output; ``loss`` "cls" or "rank"."""

    def __init__(
        self,
        config: UniterConfig,
        loss: str = "cls",
        margin: float = 0.2,
        hard_ratio: float = 0.3,
        mlp: int = 1,
        fast: bool = False,
    ) -> None:
        super().__init__(config, fast)
        hidden = config.hidden_size
        if mlp == 1:
            self.re_output = nn.Linear(hidden, 1)
        elif mlp == 2:
            self.re_output = nn.Sequential(
                nn.Linear(hidden, hidden),
                Gelu(config.gelu),
                nn.LayerNorm(hidden, eps=config.layer_norm_eps),
                nn.Linear(hidden, 1),
            )
        else:
            raise ValueError(f"mlp must be 1 or 2 (layers of re_output), got {mlp!r}")
        if loss not in ("cls", "rank"):
            raise ValueError(f"loss must be 'cls' or 'rank', got {loss!r}")
        self.loss, self.margin, self.hard_ratio = loss, margin, hard_ratio
        self.init_head_weights(self.re_output)

    @property
    def captures(self) -> bool:  # type: ignore[override]
        """The ``cls`` loss reads only the packed layout and the host-built grids; ``rank`` draws its negatives per
        row from the batch's ``num_bbs`` after a host check of them (not in a fixed-shape batch, not capturable)."""
        return self.loss == "cls"

    def forward(
        self, batch: dict[str, Any], task: Any = None, compute_loss: bool = True, with_logits: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"loss": 0-dim}`` (summed over expressions) or ``{"scores": [B, Nb]}`` (-1e4 at non-regions);
        ``with_logits`` adds ``"logits"``, those scores (adversarial training's KL is over their softmax over the
        regions, where the non-regions get probability 0)."""
        regions = self._region_hidden(batch, self._encode(batch))
        scores = self.re_output(regions).squeeze(2).masked_fill(batch["obj_masks"], NOT_A_REGION)
        if not compute_loss:
            return {"scores": scores}
        require(batch, ("targets",), "re")
        targets = batch["targets"]
        logits = {"logits": scores} if with_logits else {}
        if self.loss == "cls":
            weights = batch.get("example_weights")  # a fixed-shape batch's (uniter_fast.data.buckets)
            if weights is None:
                return {"loss": F.cross_entropy(scores.float(), targets, reduction="sum"), **logits}
            terms = F.cross_entropy(scores.float(), targets, reduction="none")
            return {"loss": (terms * weights).sum(), **logits}
        negatives = self.sample_negatives(scores.detach(), targets, batch["num_bbs"])
        positive = torch.sigmoid(scores.gather(1, targets[:, None]).squeeze(1).float())
        negative = torch.sigmoid(scores.gather(1, negatives[:, None]).squeeze(1).float())
        return {"loss": torch.clamp(self.margin + negative - positive, min=0).sum(), **logits}

    def sample_negatives(self, scores: torch.Tensor, targets: torch.Tensor, num_bbs: torch.Tensor) -> torch.Tensor:
        """[B] one region != target per row: with ``hard_ratio`` the best-scoring other region, else a uniform
        other region of the row's ``num_bbs`` (the original's ``sample_neg_ix``, drawn from torch's generator)."""
        if int(num_bbs.min()) < 2:
            raise ValueError(f"the rank loss needs >= 2 regions per image, got num_bbs {num_bbs.tolist()}")
        others = scores.float().scatter(1, targets[:, None], float("-inf"))
        hardest = others.argmax(dim=1)
        uniform = (torch.rand(targets.shape, device=scores.device) * (num_bbs - 1)).long()
        uniform = uniform + (uniform >= targets).long()  # skip the target: uniform over the other regions
        hard = torch.rand(targets.shape, device=scores.device) < self.hard_ratio
        return torch.where(hard, hardest, uniform)


def add_regions(batch: dict[str, Any]) -> dict[str, Any]:
    """Add the region grid of a collated batch: ``obj_masks`` bool [B, Nb] (True at padding, Nb = the padded
    region count) and, with a packed layout, ``packed["region_index"]`` int64 [B, Nb], the packed position of
    region j of example i (0 at padding; :func:`uniter_fast.layout.padded_index`). Returns ``batch``."""
    width, num_bbs = batch["img_feat"].size(1), batch["num_bbs"]
    packed = batch.get("packed")
    starts = packed["cls_index"] + batch["txt_lens"] if packed is not None else torch.zeros_like(num_bbs)
    index, batch["obj_masks"] = padded_index(starts, num_bbs, width)
    if packed is not None:
        packed["region_index"] = index
    return batch


def is_gt_db(path: str) -> bool:
    """A GT-box img_db (named like the original's ``re_coco_gt``): "gt" in the directory name."""
    return "gt" in os.path.basename(os.path.normpath(path))


class ReDataset(TaskDataset):
    """Expressions with their image's regions. Training: GT boxes, ``target`` = the referent's row. Evaluation
    (``eval``): GT or detected boxes, with the boxes in pixels [x, y, w, h] (``obj_boxes``) and the referent's
    (``tgt_box``). ``lens`` are all 1: batches count expressions."""

    task = "re"

    def __init__(self, txt_db: ReTxtTokLmdb, img_db: DetectFeatLmdb, gt: bool, eval: bool = False, seed: int = 0):
        ids = txt_db.sent_ids()
        name = gt_image_name if gt else det_image_name
        missing = [i for i in ids if name(txt_db[i]["image_id"]) not in img_db] if ids else []
        if missing:
            raise DataError(
                f"txt_db {txt_db.path!r}: sentence {missing[0]!r} names image "
                f"{name(txt_db[missing[0]]['image_id'])!r}, which img_db {img_db.path!r} lacks"
            )
        super().__init__(txt_db, ids, np.ones(len(ids), dtype=np.int64), seed)
        self.img_db, self.gt, self.eval, self.image_name = img_db, gt, eval, name

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        record = self.record(index)
        feat, pos = image_inputs(self.img_db, self.image_name(record["image_id"]), f"sentence {id_!r}")
        image = self.txt_db.Images[record["image_id"]]
        if self.gt and feat.size(0) != len(image["ann_ids"]):
            raise DataError(
                f"img_db {self.img_db.path!r}: image {record['image_id']} has {feat.size(0)} GT boxes "
                f"but {len(image['ann_ids'])} ann_ids in images.json (use the GT-box features)"
            )
        item = row(self.txt_db.combine_inputs(record["input_ids"]), feat, pos)
        item["sent_id"] = id_
        if self.eval:
            size = torch.tensor([image["width"], image["height"]], dtype=torch.float64)
            item["obj_boxes"] = torch.cat([pos[:, 0:2] * size, pos[:, 4:6] * size], dim=1).numpy()
            item["tgt_box"] = np.asarray(record["bbox"], dtype=np.float64)
        else:
            item["target"] = self.txt_db.target_index(record)
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Joint layout with :func:`add_regions`, ``targets`` int64 [B] (training) or ``obj_boxes`` / ``tgt_box``
        (evaluation), ``sent_ids``."""
        batch = add_regions(collate_rows(items, self.task))
        if "target" in items[0]:
            batch["targets"] = torch.tensor([it["target"] for it in items], dtype=torch.long)
        else:
            batch["obj_boxes"] = [it["obj_boxes"] for it in items]
            batch["tgt_box"] = [it["tgt_box"] for it in items]
        batch["sent_ids"] = [it["sent_id"] for it in items]
        return batch


def compute_iou(box1: np.ndarray, box2: np.ndarray) -> float:
    """IoU of two [x, y, w, h] boxes with the original's inclusive-pixel intersection (x2 = x + w - 1) and the
    plain areas w * h in the union."""
    inter_x1, inter_y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1) if inter_x1 < inter_x2 and inter_y1 < inter_y2 else 0
    return float(inter) / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


class ReTask(Task):
    """Referring expressions: ``train_loss`` (cls / rank), ``margin``, ``hard_ratio``, ``mlp``."""

    adversarial = True
    name = "re"
    heads = ("re_output",)
    options = {"train_loss": "cls", "margin": 0.2, "hard_ratio": 0.3, "mlp": 1}
    head_lr_mul = True
    by_examples = True
    sums = ("correct", "count")
    headline = "acc"

    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        out = super().check_options(options, where)
        if out["train_loss"] not in ("cls", "rank") or out["mlp"] not in (1, 2):
            raise ValueError(
                f"{where}: train_loss must be 'cls' or 'rank' and mlp 1 or 2, got "
                f"{out['train_loss']!r} and {out['mlp']!r}"
            )
        return out

    def options_from_state(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        if "re_output.weight" in state:
            return {"mlp": 1}
        return {"mlp": 2} if "re_output.0.weight" in state else {}

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        return UniterForReferringExpressionComprehension(
            config, options["train_loss"], options["margin"], options["hard_ratio"], options["mlp"], fast
        )

    def train_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int
    ) -> TaskDataset | list[TaskDataset]:
        """GT-box features only (an img_db named like ``*gt*``; ``ValueError`` otherwise)."""
        if not is_gt_db(img_path):
            raise ValueError(f"RE trains on GT-box features (an img_db named like '*gt*'), got {img_path!r}")
        return ReDataset(dbs.txt(ReTxtTokLmdb, txt_path, True), dbs.img(img_path, gt=True), gt=True, seed=seed)

    def eval_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], split: str, seed: int = 0
    ) -> Any:
        """GT- or detected-box features, as the img_db's name says (``*gt*``: GT boxes)."""
        gt = is_gt_db(img_path)
        return ReDataset(dbs.txt(ReTxtTokLmdb, txt_path, False), dbs.img(img_path, gt=gt), gt=gt, eval=True)

    def eval_batch(
        self, model: Any, batch: dict[str, Any], options: dict[str, Any]
    ) -> tuple[dict[str, float], list[Any]]:
        best = scores_of(model, batch).argmax(dim=1).tolist()
        preds = []
        for ix, boxes, target, sent_id in zip(best, batch["obj_boxes"], batch["tgt_box"], batch["sent_ids"]):
            pred = boxes[ix]
            preds.append(
                {
                    "sent_id": int(sent_id) if sent_id.isdigit() else sent_id,
                    "pred_box": pred.tolist(),
                    "tgt_box": target.tolist(),
                    "correct": compute_iou(pred, target) > 0.5,
                }
            )
        return {"correct": float(sum(p["correct"] for p in preds)), "count": float(len(preds))}, preds

    def metrics(self, sums: dict[str, float], predictions: list[Any]) -> dict[str, float]:
        return {"acc": ratio(sums["correct"], sums["count"])}

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        acc = ratio(sum(p["correct"] for p in predictions), len(predictions))
        records = [{k: v for k, v in p.items() if k != "correct"} for p in predictions]
        return [write_json_results(directory, stem, {"acc": acc, "predictions": records})]

    def example(
        self,
        config: UniterConfig,
        size: int,
        rng: np.random.Generator,
        txt_range: tuple[int, int] = (10, 60),
        img_range: tuple[int, int] = (10, 100),
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The default options (cls loss, 1-layer head); the target a random region of each example."""
        batch = add_regions(collate_rows(random_rows(size, 1, config.vocab_size, rng, txt_range, img_range), self.name))
        batch["targets"] = (torch.from_numpy(rng.random(batch["input_ids"].size(0))) * batch["num_bbs"]).long()
        return self.check_options({}, "example"), batch

    # ------------------------------------------------------------------ databases
    gt_features = True
    bundled_stream = 3

    def read_annotations(self, path: str) -> Any:
        """The directory of the four COCO-refer side files (``uniter_fast.data.re_db.read_re_annotations``)."""
        return read_re_annotations(path)

    def annotation_images(self, annotations: Any) -> tuple[dict[str, str], dict[str, str]]:
        return re_image_files(annotations)

    def write_txt_db(
        self,
        annotations: Any,
        toker: WordPiece,
        out: str,
        images: set[str],
        gt_rows: dict[str, int],
        meta_name: str,
        options: dict[str, Any],
    ) -> int:
        """One record per sentence, plus the side files (``uniter_fast.data.re_db.write_re_txt_db``)."""
        where = annotations.get("where", "annotations")
        return write_re_txt_db(annotations, toker, out, images, set(gt_rows), gt_rows, meta_name, where)

    # ------------------------------------------------------------------ new images
    def query_dataset(
        self,
        queries: list[Query],
        toker: WordPiece,
        features: dict[str, dict[str, np.ndarray]],
        box_settings: tuple[float, int, int, int],
        options: dict[str, Any],
    ) -> TaskDataset:
        """Expressions over each image's detected boxes: the image as an RE annotation whose objects are its
        detected boxes (``ann_ids`` in their row order, ``bbox`` in pixels; stored as a GT-box img_db keeps them),
        the referent unknown (the converter needs one: object 0 stands for it, the scores never read it), through
        ``re_records``, read by ``ReDataset`` over the detected boxes (evaluation)."""
        ids = {key: i for i, key in enumerate(dict.fromkeys(k for q in queries for k in q.images))}
        sizes = {key: size for q in queries for key, size in zip(q.images, q.sizes)}
        detected = {det_image_name(i): features[key] for key, i in ids.items()}
        img_db = memory_img_db(detected, box_settings)
        gt_db = memory_img_db({gt_image_name(i): features[key] for key, i in ids.items()}, GT_BOX_SETTINGS)
        side: dict[str, list[dict[str, Any]]] = {"refs": [], "annotations": [], "categories": [], "images": []}
        for key, i in ids.items():
            if key not in sizes:
                raise ValueError(f"RE query on image {key!r}: its size (height, width) is needed for the boxes")
            height, width = sizes[key]
            norm_bb = features[key]["norm_bb"][: gt_db.name2nbb[gt_image_name(i)]].astype(np.float64)
            boxes = norm_bb[:, [0, 1, 4, 5]] * [width, height, width, height]
            ann_ids = [i * QUERY_ANN_STRIDE + k for k in range(len(boxes))]
            side["annotations"] += [
                {"id": a, "bbox": b.tolist(), "image_id": i, "category_id": 0} for a, b in zip(ann_ids, boxes)
            ]
            side["images"].append({"id": i, "file_name": key, "ann_ids": ann_ids, "height": height, "width": width})
        for q in queries:
            image = ids[q.images[0]]
            ref = {"ref_id": q.id, "sent_ids": [q.id], "ann_id": image * QUERY_ANN_STRIDE, "image_id": image}
            side["refs"].append({**ref, "sentences": [{"sent_id": q.id, "sent": q.text}]})
        records = re_records(side, toker, set(img_db.name2nbb), set(gt_db.name2nbb), gt_db.name2nbb, "queries")
        txt_db = ReTxtTokLmdb.from_writer(*memory_txt_writer(toker.meta(QUERY_VOCAB_NAME), records), side)
        return ReDataset(txt_db, img_db, gt=False, eval=True)

    def query_results(
        self, scores: torch.Tensor, batch: dict[str, Any], options: dict[str, Any], top_k: int
    ) -> list[dict[str, Any]]:
        """The referred box [x, y, w, h] (pixels) with its index and probability (softmax over the image's
        regions; the head is trained with cross-entropy over them) and every region's probability, in box order."""
        results = []
        for row_scores, n, boxes in zip(scores, batch["num_bbs"].tolist(), batch["obj_boxes"]):
            probs = torch.softmax(row_scores[:n], dim=0)
            best = int(probs.argmax())
            results.append(
                {"index": best, "box": boxes[best].tolist(), "prob": float(probs[best]), "probs": probs.tolist()}
            )
        return results

    def bundled_split(self, scenes: list[Any], rng: np.random.Generator, split: str) -> Optional[tuple[Any, dict]]:
        """``re_annotations``: expressions for objects of the split's scenes, in the side files' layout."""
        return {**re_annotations(scenes, rng, split), "where": f"bundled {self.name} {split}"}, {}

    def annotation_texts(self, annotations: Any) -> list[str]:
        return texts_of(annotations["refs"])
