"""Visual entailment (the original ``model/ve.py``, ``data/ve.py``, ``train_ve.py``): VQA with three answers.

``UniterForVisualEntailment`` is the VQA model with 3 outputs (contradiction 0, entailment 1, neutral 2; one-hot
BCE x 3); the txt_db records carry the one-hot ``target``. No separate head learning rate (``train_ve.py`` uses the
plain two groups). Metric: accuracy (the VQA soft score of one-hot targets). Predictions: ``results.json``
{pair id: label}, as ``train_ve.py``'s validation output.
"""

from __future__ import annotations

import json
import os
from typing import Any

from uniter_fast.config import UniterConfig
from uniter_fast.data.files import write_json_atomic
from uniter_fast.data.task_db import check_image, write_records
from uniter_fast.data.task_records import VE_ENT2IDX, ve_record
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.synthetic.vqa_ve import BUNDLED_PER_IMAGE, ve_annotations
from uniter_fast.tasks.vqa import ANS2LABEL, UniterForVisualQuestionAnswering, VqaTask


class UniterForVisualEntailment(UniterForVisualQuestionAnswering):
    """The VQA model with 3 answers (the original subclasses it the same way)."""

    def __init__(self, config: UniterConfig, fast: bool = False) -> None:
        super().__init__(config, len(VE_ENT2IDX), fast)


class VeTask(VqaTask):
    """Visual entailment."""

    name = "ve"
    options: dict[str, Any] = {}
    head_lr_mul = False

    def data_options(self, dbs: DbCache, txt_paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
        return {"ans2label_table": dict(VE_ENT2IDX), "num_answers": len(VE_ENT2IDX)}

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        if options.get("num_answers", 3) != 3:
            raise ValueError(f"a VE model has 3 answers, the checkpoint has {options['num_answers']}")
        return UniterForVisualEntailment(config, fast)

    def eval_batch(self, model: Any, batch: dict[str, Any], options: dict[str, Any]):
        sums, preds = super().eval_batch(model, batch, options)
        return sums, [{"id": q, "answer": p["answer"]} for q, p in zip(batch["qids"], preds)]

    def write_predictions(self, predictions: list[Any], directory: str, stem: str) -> list[str]:
        path = os.path.join(directory, f"{stem}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({p["id"]: p["answer"] for p in predictions}, f)
        return [path]

    example_answers = len(VE_ENT2IDX)

    # ------------------------------------------------------------------ databases
    build_options: dict[str, tuple[type, Any, str]] = {}
    bundled_stream = 1

    def write_txt_db(self, annotations, toker, out, images, gt_rows, meta_name, options) -> int:
        """Records of ``ve_record`` (one-hot ``target``), and the class table as ``ans2label.json``."""
        records = []
        for where, raw in annotations:
            id_, ids, image, fields = ve_record(raw, toker, where)
            check_image(image, images, "detected-box", where)
            records.append((where, id_, ids, image, fields))
        count = write_records(out, toker.meta(meta_name), records, desc=f"{self.name} texts")
        write_json_atomic(os.path.join(out, ANS2LABEL), VE_ENT2IDX)
        return count

    def bundled_split(self, scenes, rng, split):
        """``ve_annotations`` of the split's scenes (2-3 hypotheses an image)."""
        records = ve_annotations(scenes, rng, BUNDLED_PER_IMAGE[split])
        return [(f"bundled {self.name} {split} record {i}", r) for i, r in enumerate(records)], {}
