"""VCR second-stage pretraining (the original ``pretrain_vcr.py``, ``model/pretrain_vcr.py``,
``data/pretrain_vcr.py``): MLM, MRFR and MRC-kl on VCR's question + right answer + right rationale and its GT +
detected regions, before fine-tuning on VCR.

The model is ``UniterForPretraining`` as it is, with the VCR tables (4 type rows, 81 tag words; see
``tasks.vcr.prepare_vcr_tables``); the MLM decoder stays tied to the grown word table and its bias grows with zeros
(the original re-creates the whole MLM head at that point, losing the loaded transform; here it is kept). The text is
``[CLS] q [SEP] a [SEP] r [SEP]`` with the original's types (q and the first [SEP] 0, a and the second [SEP] 2, r 3;
[CLS] / last [SEP] as their neighbours); MLM masks q, a and r each with ``random_word`` (so each has a masked token);
regions are masked as in pretraining. Batches are the pretraining collates with ``txt_type_ids`` added, so losses,
validation and export are the pretraining ones. The original builds a Q->A and a Q->A->R loader per task but stores
both under one name, so only the Q->A->R one trains; this module reads the dbs as "qar" accordingly.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Optional

import torch
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.data.masking import MASK_PROB, mask_regions, mask_words
from uniter_fast.data.vcr_db import VcrTxtTokLmdb, split_vcr_img_dirs
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.pretraining.model import WITHOUT_LOGITS, UniterForPretraining, task_kind
from uniter_fast.pretraining.validate import validate
from uniter_fast.tasks.data import ConcatTaskDatasets, DbCache, TaskDataset, box_inputs, collate_rows, eval_batches
from uniter_fast.tasks.spec import CheckpointView, DataFacts, Task
from uniter_fast.tasks.vcr import (
    ANSWER,
    QUESTION,
    RATIONALE,
    VcrDataset,
    check_special_tokens,
    prepare_vcr_tables,
    with_special_tokens,
)
from uniter_fast.training.logs import PRETRAINED_SUBDIR

PRETRAIN_TASKS = ("mlm", "mrfr", "mrc", "mrckl")


class VcrPretrainDataset(VcrDataset):
    """One VCR pretraining task (``kind``: mlm, mrfr, mrc or mrckl) over a VCR txt_db read as "qar"."""

    def __init__(self, txt_db: VcrTxtTokLmdb, img_db_gt: Any, img_db: Any, kind: str, mask_prob: float, seed: int):
        super().__init__(txt_db, img_db_gt, img_db, seed=seed)
        self.kind, self.mask_prob = kind, mask_prob
        self.task = kind

    def text(self, record: dict[str, Any], rng: Any) -> dict[str, torch.Tensor]:
        """input_ids, txt_type_ids (and txt_labels for MLM) of [CLS] q [SEP] a [SEP] r [SEP]."""
        db = self.txt_db
        parts = [record["input_ids"], record["input_ids_as"][record["qa_target"]]]
        parts.append(record["input_ids_rs"][record["qar_target"]])
        ids: list[int] = []
        labels: list[int] = []
        types: list[int] = []
        for n, (part, kind, sep_type) in enumerate(zip(parts, (QUESTION, ANSWER, RATIONALE), (QUESTION, ANSWER, 0))):
            if self.kind == "mlm":
                masked, part_labels = mask_words(part, [len(part)], db.v_range, db.mask, rng)
                part, part_labels = masked.tolist(), part_labels.tolist()
            else:
                part_labels = [-1] * len(part)
            ids += part + ([db.sep] if n < 2 else [])
            labels += part_labels + ([-1] if n < 2 else [])
            types += [kind] * len(part) + ([sep_type] if n < 2 else [])
        out = {
            "input_ids": torch.tensor([db.cls_, *ids, db.sep]),
            "txt_type_ids": torch.tensor([types[0], *types, types[-1]]),
        }
        if self.kind == "mlm":
            out["txt_labels"] = torch.tensor([-1, *labels, -1])
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        record = self.record(index)
        for field in ("qa_target", "qar_target"):
            self._label(id_, record, field)
        item = self.text(record, self.rng(index))
        if self.kind == "mlm":
            item["img_feat"], item["img_pos_feat"] = self.images(id_, record)
            return item
        dumps = [self.img_db_gt.get_dump(record["img_fname"][0]), self.img_db.get_dump(record["img_fname"][1])]
        boxes = [box_inputs(d) for d in dumps]
        item["img_feat"] = torch.cat([f for f, _ in boxes])
        item["img_pos_feat"] = torch.cat([p for _, p in boxes])
        item["soft_labels"] = torch.cat([torch.from_numpy(d["soft_labels"]) for d in dumps])
        num_bb = [item["img_feat"].size(0)]
        item["img_mask"] = torch.from_numpy(mask_regions(num_bb, self.rng(index), self.mask_prob))
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """The pretraining batch of the task, both layouts: MLM (``txt_labels``, ``mlm_index`` / ``mlm_labels``) or
        MRM (``img_masks``, ``img_mask_tgt``, ``mrm_index``, ``feat_targets``, ``label_targets``) keys, with
        ``txt_type_ids``."""
        return collate_rows(items, self.kind)


def prepare_vcr_pretraining(model: UniterForPretraining, special_token_base: int) -> None:
    """VCR tables on a pretraining model: types and tags as ``prepare_vcr_tables``, then the MLM head's bias grown
    with zeros and the decoder re-tied to the new word table."""
    words = model.uniter.embeddings.word_embeddings.num_embeddings
    prepare_vcr_tables(model, special_token_base)
    new_words = model.uniter.embeddings.word_embeddings.num_embeddings
    predictions = model.cls.predictions
    if predictions.bias.numel() != new_words:
        bias = torch.zeros(new_words, dtype=predictions.bias.dtype, device=predictions.bias.device)
        bias[:words] = predictions.bias.detach()
        predictions.bias = nn.Parameter(bias)
    model.tie_weights()


class VcrPretrainTask(Task):
    """VCR second-stage pretraining; options: ``tasks`` / ``mix_ratio`` (the original 2:1:1 mlm, mrfr, mrckl) and
    ``mrm_prob``. One training stream per objective (``mlm_vcr``, ...), drawn by ``mix_ratio`` one per optimizer
    step as in pretraining; evaluation is pretraining's validation of each objective (``mlm_acc``, ``mlm_loss``,
    ``mrfr_loss``, ``mrckl_acc``, ...); the export goes to ``output_dir/pretrained``, which ``--task vcr`` starts
    from."""

    name = "vcr_pretrain"
    heads = ("cls", "feat_regress", "region_classifier", "itm_output")
    grows_loaded_heads = True  # uniter-base.pt / a pretraining export: every key loads, then the tables grow
    options = {"tasks": ["mlm", "mrfr", "mrckl"], "mix_ratio": [2, 1, 1], "mrm_prob": MASK_PROB}
    headline = "mlm_acc"
    export_dir = PRETRAINED_SUBDIR  # beside a pretraining run's export, which it is
    adversarial = True  # APT on the second stage: pretraining's with_logits (MRFR: none)
    evaluates_pretrained = True  # its heads are the pretraining heads

    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        out = super().check_options(options, where)
        tasks, ratios = out["tasks"], out["mix_ratio"]
        if not tasks or any(t not in PRETRAIN_TASKS for t in tasks) or len(set(tasks)) != len(tasks):
            raise ValueError(f"{where}: 'tasks' must be distinct names from {PRETRAIN_TASKS}, got {tasks!r}")
        if len(ratios) != len(tasks) or any(not isinstance(r, int) or r <= 0 for r in ratios):
            raise ValueError(f"{where}: 'mix_ratio' needs a positive integer per task, got {ratios!r}")
        if not 0 < out["mrm_prob"] < 1:
            raise ValueError(f"{where}: 'mrm_prob' must be in (0, 1), got {out['mrm_prob']!r}")
        return out

    def kl_objectives(self, options: dict[str, Any]) -> list[str]:
        """The configured ``tasks`` with task logits (MRFR has none)."""
        return [kind for kind in options["tasks"] if kind not in WITHOUT_LOGITS]

    def data_options(self, dbs: DbCache, txt_paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
        return with_special_tokens(super().data_options(dbs, txt_paths, options), dbs, txt_paths)

    def check_data(self, checkpoint: CheckpointView, options: dict[str, Any], data: Optional[DataFacts]) -> None:
        """The base checks, then the object tags: the checkpoint's tables can grow to VCR's for the db's
        ``special_token_base`` (or are VCR's already)."""
        super().check_data(checkpoint, options, data)
        check_special_tokens(checkpoint, options, data, finished=False)

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        return UniterForPretraining(config, fast=fast)

    def prepare_model(self, model: UniterPreTrainedModel, options: dict[str, Any]) -> None:
        prepare_vcr_pretraining(model, options["special_token_base"])

    def datasets(self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], training: bool, seed: int):
        """{stream name (``mlm_vcr``, ...): dataset} of one (txt_db, "gt;det" img_db) pair."""
        gt, det = split_vcr_img_dirs(img_path)
        txt = dbs.txt(VcrTxtTokLmdb, txt_path, training, task="qar")
        img_gt, img = dbs.img(gt, gt=True), dbs.img(det)
        return {
            f"{kind}_vcr": VcrPretrainDataset(txt, img_gt, img, kind, options["mrm_prob"], seed)
            for kind in options["tasks"]
        }

    def train_streams(
        self, dbs: DbCache, pairs: list[tuple[str, str]], options: dict[str, Any], seed: int
    ) -> dict[str, tuple[TaskDataset, int]]:
        """One stream per objective, each over every pair (concatenated), with its ``mix_ratio``."""
        parts: dict[str, list[TaskDataset]] = defaultdict(list)
        for txt_path, img_path in pairs:
            for name, dataset in self.datasets(dbs, txt_path, img_path, options, True, seed).items():
                parts[name].append(dataset)
        return {
            name: (datasets[0] if len(datasets) == 1 else ConcatTaskDatasets(datasets), ratio)
            for (name, datasets), ratio in zip(parts.items(), options["mix_ratio"])
        }

    def eval_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], split: str, seed: int = 0
    ) -> Any:
        """{stream name: dataset} of the split, one per objective (masks drawn from ``seed``)."""
        return self.datasets(dbs, txt_path, img_path, options, False, seed)

    def evaluate_split(
        self,
        model: Any,
        dataset: Any,
        batch_size: int,
        options: dict[str, Any],
        rank: int,
        world: int,
        to_device: Callable[[dict[str, Any]], dict[str, Any]],
        desc: str = "eval",
    ) -> tuple[dict[str, float], list[Any]]:
        """Pretraining's validation of each objective on its dataset: ``{kind}_{metric}`` (``mlm_acc``,
        ``mlm_loss``, ``mrfr_loss``, ``mrckl_acc``, ...); no predictions."""
        loaders = {name: eval_batches(data, batch_size, rank, world) for name, data in dataset.items()}
        results = validate(model, loaders, to_device)
        metrics = {
            f"{task_kind(name)}_{key}": value for name, per_task in results.items() for key, value in per_task.items()
        }
        return metrics, []

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        """None: pretraining objectives have no prediction files."""
        return []
