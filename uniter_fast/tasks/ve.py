"""Visual entailment (the original ``model/ve.py``, ``data/ve.py``, ``train_ve.py``): VQA with three answers.

``UniterForVisualEntailment`` is the VQA model with 3 outputs (contradiction 0, entailment 1, neutral 2; one-hot
BCE x 3); the txt_db records carry the one-hot ``target``. No separate head learning rate (``train_ve.py`` uses the
plain two groups). Metric: accuracy (the VQA soft score of one-hot targets). Predictions: ``results.json``
{pair id: label}, as ``train_ve.py``'s validation output.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from uniter_fast.config import UniterConfig
from uniter_fast.data.task_records import VE_ENT2IDX, ve_record
from uniter_fast.errors import DataError
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.spec import DATA_FACTS, Query, write_json_results
from uniter_fast.tasks.synthetic.vqa_ve import BUNDLED_PER_IMAGE, ve_annotations
from uniter_fast.tasks.vqa import UniterForVisualQuestionAnswering, VqaTask


class UniterForVisualEntailment(UniterForVisualQuestionAnswering):
    """The VQA model with 3 answers (the original subclasses it the same way)."""

    def __init__(self, config: UniterConfig, fast: bool = False) -> None:
        super().__init__(config, len(VE_ENT2IDX), fast)


class VeTask(VqaTask):
    """Visual entailment."""

    name = "ve"
    options: dict[str, Any] = {}
    head_lr_mul = False

    original_ans2label = dict(VE_ENT2IDX)

    def data_options(self, dbs: DbCache, txt_paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
        """The three classes: the dbs' ``ans2label.json`` where they keep one (all must agree), else the original's
        (contradiction 0, entailment 1, neutral 2)."""
        out = super().data_options(dbs, txt_paths, options)
        if out["num_answers"] != len(VE_ENT2IDX):
            raise DataError(
                f"{out[DATA_FACTS].files['ans2label_table']}: a VE model has {len(VE_ENT2IDX)} classes "
                f"{sorted(VE_ENT2IDX)}, this answer map has {out['num_answers']}"
            )
        return out

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        if options.get("num_answers", 3) != 3:
            raise ValueError(f"a VE model has 3 answers, the checkpoint has {options['num_answers']}")
        return UniterForVisualEntailment(config, fast)

    def eval_batch(
        self, model: Any, batch: dict[str, Any], options: dict[str, Any]
    ) -> tuple[dict[str, float], list[Any]]:
        """VQA's sums, with prediction records {id, answer} (``train_ve.py``'s output)."""
        sums, preds = super().eval_batch(model, batch, options)
        return sums, [{"id": q, "answer": p["answer"]} for q, p in zip(batch["qids"], preds)]

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        return [write_json_results(directory, stem, {p["id"]: p["answer"] for p in predictions})]

    example_answers = len(VE_ENT2IDX)

    # ------------------------------------------------------------------ databases
    build_options: dict[str, tuple[type, Any, str]] = {}
    bundled_stream = 1

    def answer_table(self, annotations: Any, options: dict[str, Any]) -> dict[str, int]:
        """The three classes (contradiction 0, entailment 1, neutral 2)."""
        return dict(VE_ENT2IDX)

    def convert(self, raw: dict[str, Any], toker: Any, ans2label: dict[str, int], where: str) -> tuple:
        """One annotation -> (id, input_ids, image key, fields) with a one-hot ``target`` (``ve_record``)."""
        return ve_record(raw, toker, where)

    def query_annotation(self, query: Query) -> dict[str, Any]:
        """A query as a VE annotation; the converter needs a label, which evaluation never reads (the first class
        stands for "unknown")."""
        return {"id": query.id, "image": query.images[0], "hypothesis": query.text, "label": next(iter(VE_ENT2IDX))}

    def query_results(
        self, scores: torch.Tensor, batch: dict[str, Any], options: dict[str, Any], top_k: int
    ) -> list[dict[str, Any]]:
        """The probability of each class (softmax over the three logits), in the classes' order (contradiction,
        entailment, neutral), and the most likely one."""
        label2ans = {v: k for k, v in self.answer_map(options).items()}
        probs = torch.softmax(scores, dim=1).tolist()
        return [
            {
                "label": label2ans[max(range(len(p)), key=p.__getitem__)],
                "probs": {label2ans[i]: v for i, v in enumerate(p)},
            }
            for p in probs
        ]

    def bundled_split(self, scenes: list[Any], rng: np.random.Generator, split: str) -> Optional[tuple[Any, dict]]:
        """``ve_annotations`` of the split's scenes (2-3 hypotheses an image)."""
        records = ve_annotations(scenes, rng, BUNDLED_PER_IMAGE[split])
        return [(f"bundled {self.name} {split} record {i}", r) for i, r in enumerate(records)], {}
