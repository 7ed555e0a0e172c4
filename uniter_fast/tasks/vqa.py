"""VQA (the original ``model/vqa.py``, ``data/vqa.py``, ``train_vqa.py``, ``inf_vqa.py``).

Model: ``vqa_output`` = Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, num_answers) on the pooled [CLS]; loss
BCE-with-logits against the soft scores, mean over elements times the number of answers (= summed over answers,
averaged over questions, as ``train_vqa.py``'s "instance-level bce"). Data: a txt_db whose records carry ``target``
{labels, scores} over the answer vocabulary ``ans2label.json`` (kept in the txt_db directory). Metric: soft accuracy,
the score of the argmax answer, averaged (``compute_score_with_logits``). Predictions: ``results.json``, a list of
{"answer", "question_id"} as ``inf_vqa.py``.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.data.memory_db import memory_img_db, memory_txt_writer
from uniter_fast.data.task_db import Record, check_image, write_records
from uniter_fast.data.task_records import build_ans2label, vqa_record
from uniter_fast.errors import CheckpointError, DataError
from uniter_fast.files import read_json, write_json_atomic
from uniter_fast.losses import weighted_mean
from uniter_fast.model.activations import Gelu
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks.data import (
    DbCache,
    TaskDataset,
    check_images_exist,
    collate_rows,
    image_inputs,
    random_rows,
    row,
)
from uniter_fast.tasks.spec import (
    DATA_FACTS,
    QUERY_VOCAB_NAME,
    CheckpointView,
    DataFacts,
    Query,
    Task,
    data_file,
    ratio,
    require,
    scores_of,
    write_json_results,
)
from uniter_fast.tasks.synthetic.vqa_ve import BUNDLED_PER_IMAGE, VQA_ANSWERS, vqa_annotations

if TYPE_CHECKING:
    from uniter_fast.data.tokenizer import WordPiece

ANS2LABEL = "ans2label.json"
HEAD_OUTPUT = "vqa_output.3.weight"  # [num_answers, 2H]: the head's answer count

logger = logging.getLogger(__name__)


class UniterForVisualQuestionAnswering(UniterPreTrainedModel):
    """UNITER + ``vqa_output`` (keys ``vqa_output.0`` Linear, ``.2`` LayerNorm, ``.3`` Linear)."""

    captures = True

    def __init__(self, config: UniterConfig, num_answer: int, fast: bool = False) -> None:
        super().__init__(config, fast)
        hidden = config.hidden_size
        self.vqa_output = nn.Sequential(
            nn.Linear(hidden, hidden * 2),
            Gelu(config.gelu),
            nn.LayerNorm(hidden * 2, eps=config.layer_norm_eps),
            nn.Linear(hidden * 2, num_answer),
        )
        self.init_head_weights(self.vqa_output)

    def forward(
        self, batch: dict[str, Any], task: Any = None, compute_loss: bool = True, with_logits: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"loss": 0-dim}`` (BCE mean x num_answers) or ``{"scores": [B, num_answers]}`` logits; ``with_logits``
        adds ``"logits"``, the scores [B, num_answers] (adversarial training's KL is over their softmax, as VILLA)."""
        scores = self.vqa_output(self._pooled(batch, self._encode(batch)))
        if not compute_loss:
            return {"scores": scores}
        require(batch, ("targets",), "vqa")
        weights = batch.get("example_weights")  # a fixed-shape batch's (uniter_fast.data.buckets)
        if weights is None:
            loss = F.binary_cross_entropy_with_logits(scores.float(), batch["targets"], reduction="mean")
        else:
            bce = F.binary_cross_entropy_with_logits(scores.float(), batch["targets"], reduction="none")
            loss = weighted_mean(bce, weights)
        return {"loss": loss * scores.size(1), **({"logits": scores} if with_logits else {})}


def soft_target(record: dict[str, Any], num_answers: int) -> torch.Tensor:
    """float32 [num_answers]: ``target.scores`` scattered at ``target.labels`` (zeros when there are none)."""
    target = torch.zeros(num_answers)
    labels, scores = record["target"]["labels"], record["target"]["scores"]
    if labels:
        target.scatter_(0, torch.tensor(labels, dtype=torch.long), torch.tensor(scores, dtype=torch.float32))
    return target


def check_target(txt_db: TxtTokLmdb, id_: str, record: dict[str, Any], num_answers: int) -> None:
    """``DataError`` naming the db, the record and the field unless ``target`` is valid for ``num_answers``."""
    where = f"txt_db {txt_db.path!r} record {id_!r}"
    target = record.get("target")
    if not isinstance(target, dict) or "labels" not in target or "scores" not in target:
        raise DataError(f"{where}: field 'target' must be {{'labels': [...], 'scores': [...]}}, got {target!r}")
    labels, scores = target["labels"], target["scores"]
    if len(labels) != len(scores):
        raise DataError(
            f"{where}: 'target.labels' ({len(labels)}) and 'target.scores' ({len(scores)}) differ in length"
        )
    bad = [lab for lab in labels if not isinstance(lab, int) or not 0 <= lab < num_answers]
    if bad:
        raise DataError(f"{where}: 'target.labels' {bad} outside the {num_answers} answers of ans2label.json")


class VqaDataset(TaskDataset):
    """Questions with soft targets; ``lens`` = wordpieces + boxes. ``eval`` items carry the question id."""

    task = "vqa"

    def __init__(
        self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, num_answers: int, seed: int = 0, eval: bool = False
    ) -> None:
        ids = list(txt_db.id2len)
        fnames = txt_db.txt2img
        check_images_exist(txt_db, ids, [[fnames[i]] for i in ids], [img_db])
        for id_ in ids if not eval else []:
            check_target(txt_db, id_, txt_db[id_], num_answers)
        lens = np.array([txt_db.id2len[i] + img_db.name2nbb[fnames[i]] for i in ids])
        super().__init__(txt_db, ids, lens, seed)
        self.img_db, self.num_answers, self.eval, self.fnames = img_db, num_answers, eval, fnames

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        record = self.record(index)
        feat, pos = image_inputs(self.img_db, record["img_fname"], f"text {id_!r}")
        item = row(self.txt_db.combine_inputs(record["input_ids"]), feat, pos)
        item["qid"] = id_
        if "target" in record:
            check_target(self.txt_db, id_, record, self.num_answers)
            item["target"] = soft_target(record, self.num_answers)
        elif not self.eval:
            raise DataError(f"txt_db {self.txt_db.path!r} record {id_!r}: missing field 'target'")
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Joint layout + ``targets`` float32 [B, num_answers] (when every item has one) + ``qids``."""
        batch = collate_rows(items, self.task)
        if all("target" in it for it in items):
            batch["targets"] = torch.stack([it["target"] for it in items])
        batch["qids"] = [it["qid"] for it in items]
        return batch


def soft_score(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[B] target score of each row's argmax answer (``compute_score_with_logits`` summed over answers)."""
    return targets.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)


def read_ans2label(txt_path: str) -> dict[str, int]:
    """The answer vocabulary stored with a VQA/VE txt_db; labels must be 0..N-1."""
    path = os.path.join(txt_path, ANS2LABEL)
    if not os.path.isfile(path):
        raise DataError(
            f"{path} is missing: give the answer vocabulary with the 'ans2label' option (a JSON path; the original "
            "keeps it in utils/ans2label.json), or build the db with python -m uniter_fast.build --task vqa"
        )
    ans2label = read_json(path)
    if sorted(ans2label.values()) != list(range(len(ans2label))):
        raise DataError(f"{path}: labels must be 0..{len(ans2label) - 1}, each once")
    return ans2label


def has_ans2label(txt_path: str) -> bool:
    """Whether the txt_db at ``txt_path`` keeps its own answer map (``ans2label.json``)."""
    return os.path.isfile(os.path.join(txt_path, ANS2LABEL))


def map_difference(first: dict[str, int], second: dict[str, int], shown: int = 3) -> str:
    """The first labels whose answers differ between two answer maps ({answer: label}), e.g. ``label 5: 'two' vs
    'three'`` (None: no such label), and how many more."""
    answers_1 = {label: answer for answer, label in first.items()}
    answers_2 = {label: answer for answer, label in second.items()}
    labels = sorted(set(answers_1) | set(answers_2))
    differing = [label for label in labels if answers_1.get(label) != answers_2.get(label)]
    text = "; ".join(f"label {lab}: {answers_1.get(lab)!r} vs {answers_2.get(lab)!r}" for lab in differing[:shown])
    return text + (f" (and {len(differing) - shown} more labels)" if len(differing) > shown else "")


def qid_value(qid: str) -> Any:
    """A question id as the original writes it: an int when it is one."""
    return int(qid) if qid.lstrip("-").isdigit() else qid


class VqaTask(Task):
    """VQA: ``vqa_output`` head with lr_mul, soft-score accuracy, ``results.json``."""

    adversarial = True
    name = "vqa"
    heads = ("vqa_output",)
    options = {"ans2label": None}
    head_lr_mul = True
    sums = ("loss", "score", "count")
    headline = "acc"

    original_ans2label: Optional[dict[str, int]] = None
    """The answer map of an original checkpoint (no ``task.json``) and of databases without ``ans2label.json``, when
    the task fixes it (VE); None: unknown (the original VQA checkpoints were trained on ``utils/ans2label.json``,
    which the weights do not name)."""

    def options_from_state(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {"num_answers": int(state[HEAD_OUTPUT].shape[0])} if HEAD_OUTPUT in state else {}

    def data_options(self, dbs: DbCache, txt_paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
        """The answer vocabulary: ``options["ans2label"]`` (a JSON path) or the txt_dbs' (all must agree, and agree
        with the given one: their records' labels index their own map)."""
        out = super().data_options(dbs, txt_paths, options)
        given = options.get("ans2label")
        tables = [(given, read_json(given, "ans2label"))] if given else []
        for path in txt_paths:  # VQA: each db keeps its map unless one is given; VE: the fixed classes by default
            if has_ans2label(path) or not (given or self.original_ans2label):
                tables.append((os.path.join(path, ANS2LABEL), read_ans2label(path)))
        tables = tables or [(f"the original {self.name} classes", dict(self.original_ans2label or {}))]
        for path, table in tables[1:]:
            if table != tables[0][1]:
                raise DataError(
                    f"answer maps differ: {path} and {tables[0][0]}: {map_difference(table, tables[0][1])}; the "
                    "records' labels index their db's own ans2label.json, so every db (and the 'ans2label' option) "
                    "must share one map"
                )
        source, ans2label = tables[0]
        out[DATA_FACTS].files["ans2label_table"] = source
        return {**out, "ans2label_table": ans2label, "num_answers": len(ans2label)}

    def check_data(self, checkpoint: CheckpointView, options: dict[str, Any], data: Optional[DataFacts]) -> None:
        """The fine-tuned checkpoint's answer map (its task.json ``ans2label_table``, or :attr:`original_ans2label`
        for an original checkpoint) must be the databases' and its head as large (``CheckpointError`` naming both
        files and the first differing answers); then the base checks."""
        super().check_data(checkpoint, options, data)
        table = options.get("ans2label_table")
        head = checkpoint.rows(HEAD_OUTPUT)
        if not checkpoint.finetuned or table is None or head is None:
            return
        db_file = data_file(data, "ans2label_table")
        saved = checkpoint.saved_options.get("ans2label_table")
        if saved is None and checkpoint.task_file is None:
            saved = self.original_ans2label
        if saved is not None and saved != table:
            raise CheckpointError(
                f"answer map mismatch: the checkpoint's ({checkpoint.options_file}, {len(saved)} answers) and the "
                f"databases' ({db_file}, {len(table)} answers) differ: {map_difference(saved, table)} (checkpoint vs "
                "databases); its predictions would be scored against other answers: use databases built with the "
                "checkpoint's answer map"
            )
        if head != len(table):
            raise CheckpointError(
                f"answer map mismatch: the head of {checkpoint.path} has {head} answers, the databases' map "
                f"({db_file}) has {len(table)}: use databases built with the checkpoint's answer map"
            )
        if saved is None:
            logger.info(
                "%s: its answer map is unknown (no task.json): only its size (%d answers, as %s) is checked",
                checkpoint.path,
                head,
                db_file,
            )

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        return UniterForVisualQuestionAnswering(config, options["num_answers"], fast)

    def train_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int
    ) -> TaskDataset | list[TaskDataset]:
        return VqaDataset(dbs.txt(TxtTokLmdb, txt_path, True), dbs.img(img_path), options["num_answers"], seed)

    def eval_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], split: str, seed: int = 0
    ) -> Any:
        txt = dbs.txt(TxtTokLmdb, txt_path, False)
        return VqaDataset(txt, dbs.img(img_path), options["num_answers"], eval=True)

    def eval_batch(
        self, model: Any, batch: dict[str, Any], options: dict[str, Any]
    ) -> tuple[dict[str, float], list[Any]]:
        """A batch without ``targets`` (test questions) adds zero sums: predictions only."""
        scores = scores_of(model, batch)
        label2ans = {v: k for k, v in options["ans2label_table"].items()}
        answers = [label2ans[int(i)] for i in scores.argmax(dim=1).tolist()]
        preds = [{"answer": a, "question_id": qid_value(q)} for q, a in zip(batch["qids"], answers)]
        if "targets" not in batch:
            return {"loss": 0.0, "score": 0.0, "count": 0.0}, preds
        targets = batch["targets"]
        loss = F.binary_cross_entropy_with_logits(scores, targets, reduction="sum")
        sums = {"loss": float(loss), "score": float(soft_score(scores, targets).sum()), "count": float(len(answers))}
        return sums, preds

    def metrics(self, sums: dict[str, float], predictions: list[Any]) -> dict[str, float]:
        return {"acc": ratio(sums["score"], sums["count"]), "loss": ratio(sums["loss"], sums["count"])}

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        return [write_json_results(directory, stem, predictions)]

    example_answers = 3129  # the original's VQA answer vocabulary

    def example(
        self,
        config: UniterConfig,
        size: int,
        rng: np.random.Generator,
        txt_range: tuple[int, int] = (10, 60),
        img_range: tuple[int, int] = (10, 100),
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Soft targets over :attr:`example_answers` answers, about 0.3 % of them scored."""
        batch = collate_rows(random_rows(size, 1, config.vocab_size, rng, txt_range, img_range), self.name)
        rows, answers = batch["input_ids"].size(0), self.example_answers
        scores = rng.random((rows, answers), dtype=np.float32) * (rng.random((rows, answers)) < 0.003)
        batch["targets"] = torch.from_numpy(scores)
        return {"num_answers": answers}, batch

    # ------------------------------------------------------------------ databases
    build_options = {
        "ans2label": (str, None, "answer vocabulary JSON {answer: label} (default: built from the answers)"),
    }
    bundled_stream = 0

    def answer_table(self, annotations: Any, options: dict[str, Any]) -> dict[str, int]:
        """The answer vocabulary of a new db: ``options["ans2label"]`` (a table or a JSON path), else every scored
        answer of the annotations, most frequent first."""
        given = options.get("ans2label")
        ans2label = given if isinstance(given, dict) else read_json(given) if given else None
        if ans2label is None:
            ans2label = build_ans2label((raw for _, raw in annotations), "annotations")
        if not ans2label:
            raise DataError("VQA needs an answer vocabulary: give --ans2label, or annotations with scored answers")
        return ans2label

    def convert(self, raw: dict[str, Any], toker: Any, ans2label: dict[str, int], where: str) -> tuple:
        """One annotation -> (id, input_ids, image key, fields) (``uniter_fast.data.task_records.vqa_record``)."""
        return vqa_record(raw, toker, ans2label, where)

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
        """Records of :meth:`txt_records` (``target`` over :meth:`answer_table`), and the table as
        ``ans2label.json`` beside them."""
        ans2label = self.answer_table(annotations, options)
        records = self.txt_records(annotations, toker, images, ans2label)
        count = write_records(out, toker.meta(meta_name), records, desc=f"{self.name} texts")
        write_json_atomic(os.path.join(out, ANS2LABEL), ans2label)
        return count

    def txt_records(self, annotations: Any, toker: Any, images: set[str], ans2label: dict[str, int]) -> list[Record]:
        """The txt_db records of ``annotations`` (:meth:`convert`), each image key checked against ``images``."""
        records = []
        for where, raw in annotations:
            id_, ids, image, fields = self.convert(raw, toker, ans2label, where)
            check_image(image, images, "detected-box", where)
            records.append((where, id_, ids, image, fields))
        return records

    # ------------------------------------------------------------------ new images
    def query_annotation(self, query: Query) -> dict[str, Any]:
        """A query as a VQA annotation (no answers: an empty target)."""
        return {"question_id": query.id, "image": query.images[0], "question": query.text, "answers": {}}

    def query_dataset(
        self,
        queries: list[Query],
        toker: WordPiece,
        features: dict[str, dict[str, np.ndarray]],
        box_settings: tuple[float, int, int, int],
        options: dict[str, Any],
    ) -> TaskDataset:
        """Records of :meth:`txt_records` over the checkpoint's answer map, read by ``VqaDataset`` (evaluation)."""
        annotations = [(f"query {q.id!r}", self.query_annotation(q)) for q in queries]
        img_db = memory_img_db(features, box_settings)
        records = self.txt_records(annotations, toker, set(img_db.name2nbb), self.answer_map(options))
        txt_db = TxtTokLmdb.from_writer(*memory_txt_writer(toker.meta(QUERY_VOCAB_NAME), records))
        return VqaDataset(txt_db, img_db, options["num_answers"], eval=True)

    def answer_map(self, options: dict[str, Any]) -> dict[str, int]:
        """The loaded checkpoint's answer map: its task.json ``ans2label_table``, else the ``ans2label`` option (a
        JSON file), else the task's fixed one (VE); a CheckpointError saying what to give when there is none."""
        table = options.get("ans2label_table")
        if table is None and options.get("ans2label"):
            table = read_json(options["ans2label"], "ans2label")
        table = table or self.original_ans2label
        if not table:
            raise CheckpointError(
                f"task {self.name}: the checkpoint names no answer map (no task.json with 'ans2label_table'): give "
                "the option ans2label (--option ans2label=<the ans2label.json it was trained with>)"
            )
        return table

    def query_results(
        self, scores: torch.Tensor, batch: dict[str, Any], options: dict[str, Any], top_k: int
    ) -> list[dict[str, Any]]:
        """The ``top_k`` answers of each question with their probabilities (sigmoid of the logits: the head is
        trained with binary cross-entropy against soft scores), best first."""
        label2ans = {v: k for k, v in self.answer_map(options).items()}
        probs = torch.sigmoid(scores)
        best = probs.topk(min(top_k, probs.size(1)), dim=1)
        return [
            {"answers": [{"answer": label2ans[int(i)], "score": float(p)} for p, i in zip(values, indices)]}
            for values, indices in zip(best.values.tolist(), best.indices.tolist())
        ]

    def bundled_split(self, scenes: list[Any], rng: np.random.Generator, split: str) -> Optional[tuple[Any, dict]]:
        """``vqa_annotations`` of the split's scenes (2-3 questions an image), over the bundled answer list."""
        records = vqa_annotations(scenes, rng, BUNDLED_PER_IMAGE[split])
        pairs = [(f"bundled {self.name} {split} record {i}", r) for i, r in enumerate(records)]
        return pairs, {"ans2label": {a: i for i, a in enumerate(VQA_ANSWERS)}}
