"""VCR (the original ``model/vcr.py``, ``data/vcr.py``, ``train_vcr.py``, ``inf_vcr.py``): multiple-choice Q->A and
QA->R over GT + detected regions, with object tags in the text.

Model: ``vcr_output`` = Linear(H, 2H), ReLU, LayerNorm(2H), Linear(2H, 2) on the pooled [CLS] of each (question,
choice) sequence; loss cross-entropy over the two classes (1 = right choice), mean over sequences; a choice's score
is its class-1 logit. The type table grows to 4 rows (0 question, 1 region, 2 answer, 3 rationale; rows 2 and 3 start
as copies of the text row) and the word table by 81 tag rows (``init_word_embedding``); a VCR second-stage
checkpoint (``finetune.py --task vcr_pretrain``) already has both.

Sequences: Q->A ``[CLS] q [SEP] a_i [SEP]`` (types 0, 0.., 2..); QA->R ``[CLS] q [SEP] a* [SEP] r_i [SEP]`` (types
0, 0.., 2.., 3..) with the right answer a*; regions: the GT boxes, then the detected ones. Training uses a Q->A and a
QA->R dataset per txt_db (four sequences per example). Evaluation: split "val" scores 4 answers + the 4 rationales of
the right answer; split "test" scores 4 answers + 16 rationales (every answer's), as ``VcrEvalDataset("test")``.
Metrics: Q->A, QA->R and Q->AR accuracy (both right) and the two losses. Predictions: ``results.json`` {annot_id:
scores}; with 20 scores also ``results.csv`` in the leaderboard layout of ``inf_vcr.py``.
"""

from __future__ import annotations

import csv
import logging
import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.data import DetectFeatLmdb
from uniter_fast.data.memory_db import memory_img_db, memory_txt_writer
from uniter_fast.data.task_db import GT_BOX_SETTINGS, Record, check_image, write_records
from uniter_fast.data.task_records import field, image_key, vcr_lengths, vcr_record
from uniter_fast.data.vcr_db import NUM_SPECIAL_TOKENS, VcrTxtTokLmdb, split_vcr_img_dirs
from uniter_fast.errors import CheckpointError, DataError
from uniter_fast.files import write_json_atomic
from uniter_fast.losses import cross_entropy_mean
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
    TYPE_TABLE,
    WORD_TABLE,
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
from uniter_fast.tasks.synthetic.vcr import vcr_annotations

if TYPE_CHECKING:
    from uniter_fast.data.tokenizer import WordPiece

BERT_BASE_CASED_VOCAB = 28996  # the default special_token_base: bert-base-cased's word table, as the original's
TYPE_ROWS = (0, 1, 0, 0)  # init_type_embedding: answer and rationale types start as the text type
QUESTION, ANSWER, RATIONALE = 0, 2, 3

logger = logging.getLogger(__name__)


class UniterForVisualCommonsenseReasoning(UniterPreTrainedModel):
    """UNITER + ``vcr_output`` (keys ``vcr_output.0`` Linear, ``.2`` LayerNorm, ``.3`` Linear)."""

    captures = True

    def __init__(self, config: UniterConfig, fast: bool = False) -> None:
        super().__init__(config, fast)
        hidden = config.hidden_size
        self.vcr_output = nn.Sequential(
            nn.Linear(hidden, hidden * 2),
            nn.ReLU(),
            nn.LayerNorm(hidden * 2, eps=config.layer_norm_eps),
            nn.Linear(hidden * 2, 2),
        )
        self.init_head_weights(self.vcr_output)

    def forward(
        self, batch: dict[str, Any], task: Any = None, compute_loss: bool = True, with_logits: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"loss": 0-dim}`` (CE mean over sequences) or ``{"scores": [N, 1]}`` (class-1 logits, as the
        original's ``rank_scores[:, 1:]``); ``with_logits`` adds ``"logits"``, the two-class scores [N, 2] of each
        (question, choice) sequence, which the loss takes (adversarial training's KL is over their softmax)."""
        rank_scores = self.vcr_output(self._pooled(batch, self._encode(batch)))
        if not compute_loss:
            return {"scores": rank_scores[:, 1:]}
        require(batch, ("targets",), "vcr")
        loss = cross_entropy_mean(rank_scores, batch["targets"], batch.get("example_weights"))
        return {"loss": loss, **({"logits": rank_scores} if with_logits else {})}


def check_vcr_tables(type_rows: int, words: int, base: int, finished: bool = False) -> None:
    """``ValueError`` unless a model with ``type_rows`` type rows and ``words`` word rows can take VCR's tables for
    object tags from id ``base``: pretrained tables (2 type rows) with at most ``base`` words or ``base`` + 81, or VCR
    tables (4 type rows) with ``base`` (+ 81) words; ``finished``: the VCR tables already (4 rows, ``base`` + 81, a
    fine-tuned VCR model)."""
    if type_rows not in (2, len(TYPE_ROWS)) or (finished and type_rows != len(TYPE_ROWS)):
        wanted = f"{len(TYPE_ROWS)}" if finished else f"2 (pretrained) or {len(TYPE_ROWS)}"
        raise ValueError(f"a VCR model has {wanted} type rows, this one has {type_rows}")
    if type_rows == 2 and words < base:
        return  # grown to the db's words first
    if words != base + NUM_SPECIAL_TOKENS and (finished or words != base):
        raise ValueError(
            f"the VCR db's object tags start at id {base} (meta.json special_token_base), so the model "
            f"needs {base} words before the {NUM_SPECIAL_TOKENS} tags are added; it has {words}. "
            f"Rebuild the db with --special_token_base {words - NUM_SPECIAL_TOKENS if finished else words}, or use "
            "a model of that vocabulary"
        )


def prepare_vcr_tables(model: UniterPreTrainedModel, special_token_base: int) -> None:
    """Grow a pretrained model's tables for VCR: 4 type rows and ``special_token_base`` + 81 words (a pretrained word
    table smaller than ``special_token_base`` first grows to it, with a warning: the db's words beyond the pretraining
    vocabulary get fresh rows). Tables that already have those sizes (a VCR checkpoint) are kept; any other size is
    an error naming both (:func:`check_vcr_tables`)."""
    rows = model.uniter.embeddings.token_type_embeddings.num_embeddings
    words = model.uniter.embeddings.word_embeddings.num_embeddings
    check_vcr_tables(rows, words, special_token_base)
    if rows == 2:
        model.init_type_embedding(TYPE_ROWS)
        if words < special_token_base:
            logger.warning(
                "word table grown from %d to %d rows (the VCR db's words) before the tags", words, special_token_base
            )
            model.init_word_embedding(special_token_base - words)
            words = special_token_base
    if words == special_token_base:
        model.init_word_embedding(NUM_SPECIAL_TOKENS)


def special_token_base(dbs: DbCache, txt_paths: list[str]) -> int:
    """The id of object tag 0 shared by the VCR txt_dbs (``meta.json``); ``DataError`` when they disagree or hold
    more tags than a VCR model's 81 rows."""
    opened = [dbs.txt(VcrTxtTokLmdb, p, False) for p in txt_paths]
    bases = {db.special_token_base for db in opened}
    if len(bases) != 1:
        raise DataError(f"the VCR dbs {txt_paths} disagree on meta.json special_token_base: {sorted(bases)}")
    for db in opened:
        if db.num_special_tokens > NUM_SPECIAL_TOKENS:
            raise DataError(
                f"{os.path.join(db.path, 'meta.json')}: num_special_tokens is {db.num_special_tokens}, but a VCR "
                f"model has {NUM_SPECIAL_TOKENS} object-tag rows (the original's)"
            )
    return bases.pop()


def with_special_tokens(out: dict[str, Any], dbs: DbCache, txt_paths: list[str]) -> dict[str, Any]:
    """The VCR tasks' ``data_options``: the base's ``out`` and ``special_token_base`` (the dbs' meta.json)."""
    out[DATA_FACTS].files["special_token_base"] = os.path.join(txt_paths[0], "meta.json")
    return {**out, "special_token_base": special_token_base(dbs, txt_paths)}


def check_special_tokens(
    checkpoint: CheckpointView, options: dict[str, Any], data: Optional[DataFacts], finished: bool
) -> None:
    """``CheckpointError`` naming the checkpoint and the db's meta.json unless the checkpoint's tables fit the db's
    object tags (``check_vcr_tables``; ``finished``: they must be VCR's already) and its task.json, if any, saved the
    db's ``special_token_base``."""
    base = options.get("special_token_base")
    words, rows = checkpoint.rows(WORD_TABLE), checkpoint.rows(TYPE_TABLE)
    if base is None or words is None or rows is None:
        return
    meta = data_file(data, "special_token_base")
    saved = checkpoint.saved_options.get("special_token_base")
    if saved is not None and saved != base:
        raise CheckpointError(
            f"VCR special tokens mismatch: the checkpoint's object tags start at id {saved} ({checkpoint.task_file} "
            f"special_token_base), the databases' at {base} ({meta} special_token_base): rebuild the dbs with "
            f"--special_token_base {saved}"
        )
    try:
        check_vcr_tables(rows, words, base, finished)
    except ValueError as err:
        raise CheckpointError(f"VCR special tokens mismatch: {checkpoint.path} and {meta}: {err}") from None


class VcrDataset(TaskDataset):
    """VCR examples of one txt_db read as ``task`` "qa" / "qar" (training) or for evaluation (``eval_mode`` "val" /
    "test"). Every item holds the sequences of its choices; ``lens`` = text + GT boxes + detected boxes."""

    task = "vcr"

    def __init__(
        self,
        txt_db: VcrTxtTokLmdb,
        img_db_gt: DetectFeatLmdb,
        img_db: DetectFeatLmdb,
        eval_mode: str = "",
        seed: int = 0,
    ) -> None:
        if eval_mode not in ("", "val", "test") or (not eval_mode and txt_db.task == "qa,qar"):
            raise ValueError(
                f"training reads a VCR db as 'qa' or 'qar', evaluation as 'qa,qar' with eval_mode "
                f"'val' / 'test'; got task {txt_db.task!r}, eval_mode {eval_mode!r}"
            )
        ids = list(txt_db.id2len)
        fnames = txt_db.txt2img
        check_images_exist(txt_db, ids, [fnames[i] for i in ids], [img_db_gt, img_db])
        lens = [txt_db.id2len[i] + img_db_gt.name2nbb[fnames[i][0]] + img_db.name2nbb[fnames[i][1]] for i in ids]
        super().__init__(txt_db, ids, np.array(lens), seed)
        self.img_db_gt, self.img_db, self.eval_mode = img_db_gt, img_db, eval_mode

    def images(self, id_: str, record: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """GT-box then detected-box features [n, 2048] and boxes [n, 7]."""
        gt = image_inputs(self.img_db_gt, record["img_fname"][0], f"VCR example {id_!r}")
        det = image_inputs(self.img_db, record["img_fname"][1], f"VCR example {id_!r}")
        return torch.cat([gt[0], det[0]]), torch.cat([gt[1], det[1]])

    def sequence(self, question: list[int], answer: list[int], rationale: list[int] | None = None) -> tuple:
        """(input_ids, txt_type_ids) int64 of [CLS] q [SEP] a [SEP] (r [SEP])."""
        db = self.txt_db
        ids = [db.cls_, *question, db.sep, *answer, db.sep]
        types = [QUESTION] * (len(question) + 1) + [ANSWER] * (len(answer) + 2)
        if rationale is not None:
            ids += [*rationale, db.sep]
            types += [RATIONALE] * (len(rationale) + 1)
            types[len(question) + len(answer) + 2] = RATIONALE  # the [SEP] after the answer opens the rationale
        return torch.tensor(ids), torch.tensor(types)

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        record = self.record(index)
        feat, pos = self.images(id_, record)
        q, answers, rationales = record["input_ids"], record["input_ids_as"], record["input_ids_rs"]
        if self.eval_mode:
            texts = [self.sequence(q, a) for a in answers]
            if self.eval_mode == "val":
                texts += [self.sequence(q, answers[self._label(id_, record, "qa_target")], r) for r in rationales]
            else:
                texts += [self.sequence(q, a, r) for a in answers for r in rationales]
            rows = [row(ids, feat, pos, txt_type_ids=types) for ids, types in texts]
            return {"rows": rows, "qid": id_, "qa": record["qa_target"], "qar": record["qar_target"]}
        if self.txt_db.task == "qa":
            texts, label = [self.sequence(q, a) for a in answers], self._label(id_, record, "qa_target")
        else:
            answer = answers[self._label(id_, record, "qa_target")]
            texts, label = [self.sequence(q, answer, r) for r in rationales], self._label(id_, record, "qar_target")
        rows = [row(ids, feat, pos, txt_type_ids=types) for ids, types in texts]
        return {"rows": rows, "targets": [int(i == label) for i in range(len(rows))]}

    def _label(self, id_: str, record: dict[str, Any], field: str) -> int:
        label = record[field]
        if not 0 <= label < 4:
            raise DataError(
                f"txt_db {self.txt_db.path!r} record {id_!r}: '{field}' must be in [0, 4) here, got {label}"
            )
        return label

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Joint layout of every choice's sequence (example-major) with ``txt_type_ids``; ``targets`` int64 [N]
        (training) or ``qa_targets`` / ``qar_targets`` [B] and ``qids`` (evaluation)."""
        batch = collate_rows([r for it in items for r in it["rows"]], self.task)
        if "targets" in items[0]:
            batch["targets"] = torch.tensor([t for it in items for t in it["targets"]], dtype=torch.long)
        else:
            batch["qa_targets"] = torch.tensor([it["qa"] for it in items], dtype=torch.long)
            batch["qar_targets"] = torch.tensor([it["qar"] for it in items], dtype=torch.long)
            batch["qids"] = [it["qid"] for it in items]
        return batch


def vcr_scores(scores: torch.Tensor, qa_targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q->A scores [B, 4], QA->R scores [B, 4]) from per-question scores [B, 8] or [B, 20] (then the right
    answer's four rationales, columns 4 + 4 * answer + i, as the original)."""
    qa = scores[:, :4]
    if scores.size(1) > 8:
        index = 4 + 4 * qa_targets[:, None] + torch.arange(4, device=scores.device)[None, :]
        return qa, scores.gather(1, index)
    return qa, scores[:, 4:]


class VcrTask(Task):
    """VCR fine-tuning (Q->A and QA->R)."""

    adversarial = True
    name = "vcr"
    heads = ("vcr_output",)
    head_lr_mul = True
    sums = ("loss_qa", "loss_qar", "correct_qa", "correct_qar", "correct", "count")
    headline = "acc_qa"

    def data_options(self, dbs: DbCache, txt_paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
        return with_special_tokens(super().data_options(dbs, txt_paths, options), dbs, txt_paths)

    def check_data(self, checkpoint: CheckpointView, options: dict[str, Any], data: Optional[DataFacts]) -> None:
        """The base checks, then the object tags: a fine-tuned VCR checkpoint holds VCR's tables for the db's
        ``special_token_base``, a pretrained one can grow to them."""
        super().check_data(checkpoint, options, data)
        check_special_tokens(checkpoint, options, data, finished=checkpoint.finetuned)

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        return UniterForVisualCommonsenseReasoning(config, fast)

    def prepare_model(self, model: UniterPreTrainedModel, options: dict[str, Any]) -> None:
        prepare_vcr_tables(model, options["special_token_base"])

    def _dbs(self, dbs: DbCache, img_path: str) -> tuple[DetectFeatLmdb, DetectFeatLmdb]:
        gt, det = split_vcr_img_dirs(img_path)
        return dbs.img(gt, gt=True), dbs.img(det)

    def train_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int
    ) -> TaskDataset | list[TaskDataset]:
        gt, det = self._dbs(dbs, img_path)
        return [VcrDataset(dbs.txt(VcrTxtTokLmdb, txt_path, True, task=t), gt, det, seed=seed) for t in ("qa", "qar")]

    def eval_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], split: str, seed: int = 0
    ) -> Any:
        gt, det = self._dbs(dbs, img_path)
        mode = "test" if split == "test" else "val"
        return VcrDataset(dbs.txt(VcrTxtTokLmdb, txt_path, False, task="qa,qar"), gt, det, eval_mode=mode)

    def eval_batch(
        self, model: Any, batch: dict[str, Any], options: dict[str, Any]
    ) -> tuple[dict[str, float], list[Any]]:
        """A batch with unlabelled (test) questions adds zero sums: scores only, as ``inf_vcr.py``."""
        scores = scores_of(model, batch).reshape(len(batch["qids"]), -1)
        preds = [{"qid": q, "scores": s} for q, s in zip(batch["qids"], scores.tolist())]
        qa_targets, qar_targets = batch["qa_targets"], batch["qar_targets"]
        labelled = qa_targets >= 0
        if not bool(labelled.all()):  # unlabelled (test-set) questions: scores only, as inf_vcr.py
            return dict.fromkeys(self.sums, 0.0), preds
        qa, qar = vcr_scores(scores, qa_targets)
        right_qa, right_qar = qa.argmax(1) == qa_targets, qar.argmax(1) == qar_targets
        sums = {
            "loss_qa": float(F.cross_entropy(qa, qa_targets, reduction="sum")),
            "loss_qar": float(F.cross_entropy(qar, qar_targets, reduction="sum")),
            "correct_qa": float(right_qa.sum()),
            "correct_qar": float(right_qar.sum()),
            "correct": float((right_qa & right_qar).sum()),
            "count": float(len(preds)),
        }
        return sums, preds

    def metrics(self, sums: dict[str, float], predictions: list[Any]) -> dict[str, float]:
        n = sums["count"]
        return {
            "acc_qa": ratio(sums["correct_qa"], n),
            "acc_qar": ratio(sums["correct_qar"], n),
            "acc_q_ar": ratio(sums["correct"], n),
            "loss_qa": ratio(sums["loss_qa"], n),
            "loss_qar": ratio(sums["loss_qar"], n),
        }

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        path = write_json_results(directory, stem, {p["qid"]: p["scores"] for p in predictions})
        if not predictions or len(predictions[0]["scores"]) != 20:
            return [path]
        csv_path = os.path.join(directory, f"{stem}.csv")
        groups = ["answer"] + [f"rationale_conditioned_on_a{i}" for i in range(4)]
        ordered = sorted(predictions, key=lambda p: _annot_order(p["qid"]))
        with open(csv_path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["annot_id", *(f"{g}_{i}" for g in groups for i in range(4))])
            writer.writerows([p["qid"], *p["scores"]] for p in ordered)
        return [path, csv_path]

    def example(
        self,
        config: UniterConfig,
        size: int,
        rng: np.random.Generator,
        txt_range: tuple[int, int] = (10, 60),
        img_range: tuple[int, int] = (10, 100),
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Four rows per example (random type ids 0-3), the first the right one; tags after ``config``'s words."""
        rows = random_rows(size, 4, config.vocab_size, rng, txt_range, img_range, txt_types=True)
        batch = collate_rows(rows, self.name)
        batch["targets"] = torch.tensor([int(i % 4 == 0) for i in range(batch["input_ids"].size(0))])
        return {"special_token_base": config.vocab_size}, batch

    # ------------------------------------------------------------------ databases
    build_options = {
        "special_token_base": (
            int,
            BERT_BASE_CASED_VOCAB,
            "id of object tag 0 (= the model's word-table size before VCR's 81 tags are added)",
        ),
    }
    gt_features = True
    bundled_stream = 4

    def annotation_images(self, annotations: Any) -> tuple[dict[str, str], dict[str, str]]:
        """Detected boxes of ``image``; GT boxes of ``gt_image`` (default: ``image``)."""
        det, gt = set(), set()
        for where, raw in annotations:
            image = field(raw, "image", str, where)
            det.add(image_key(image))
            gt.add(image_key(str(raw.get("gt_image", image))))
        return {k: k for k in det}, {k: k for k in gt}

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
        """Records of :meth:`txt_records`, the tag range in ``meta.json`` and the ``id2len_qa.json`` /
        ``id2len_qar.json`` length tables."""
        base = int(options.get("special_token_base", BERT_BASE_CASED_VOCAB))
        meta, records, lengths = self.txt_records(annotations, toker, images, set(gt_rows), meta_name, base)
        count = write_records(out, meta, records, desc=f"{self.name} texts")
        for key, table in lengths.items():
            write_json_atomic(os.path.join(out, f"id2len_{key}.json"), table)
        return count

    def txt_records(
        self, annotations: Any, toker: Any, images: set[str], gt_images: set[str], meta_name: str, base: int
    ) -> tuple[dict[str, Any], list[Record], dict[str, dict[str, int]]]:
        """(meta.json, records of ``vcr_record`` with object references as tag ids from ``base``, the "qa" / "qar"
        length tables); image keys checked against ``images`` (detected boxes) and ``gt_images``."""
        meta = {**toker.meta(meta_name), "special_token_base": base, "num_special_tokens": NUM_SPECIAL_TOKENS}
        records, lengths = [], {"qa": {}, "qar": {}}
        for where, raw in annotations:
            id_, ids, names, fields = vcr_record(raw, toker, base, NUM_SPECIAL_TOKENS, where)
            lengths["qa"][id_], lengths["qar"][id_] = vcr_lengths(ids, fields)
            check_image(names[0], gt_images, "GT-box", where)
            check_image(names[1], images, "detected-box", where)
            records.append((where, id_, ids, names, fields))
        return meta, records, lengths

    # ------------------------------------------------------------------ new images
    def query_dataset(
        self,
        queries: list[Query],
        toker: WordPiece,
        features: dict[str, dict[str, np.ndarray]],
        box_settings: tuple[float, int, int, int],
        options: dict[str, Any],
    ) -> TaskDataset:
        """A question with four answers and four rationales as a test-split annotation (labels -1), through
        :meth:`txt_records` with the checkpoint's ``special_token_base``, read by ``VcrDataset`` ("test": every
        answer, then every rationale after each answer). The image's detected boxes stand in for VCR's GT boxes
        too (stored as a GT-box img_db keeps them), as new photos have no annotated boxes."""
        annotations = []
        for q in queries:
            if len(q.answers) != 4 or len(q.rationales) != 4:
                raise ValueError(
                    f"answers / rationales (--answer / --rationale): VCR takes 4 of each per question, got "
                    f"{len(q.answers)} and {len(q.rationales)} for question {q.text!r}"
                )
            raw = {
                "annot_id": q.id,
                "image": q.images[0],
                "question": [q.text],
                "answer_choices": [[a] for a in q.answers],
                "rationale_choices": [[r] for r in q.rationales],
                "answer_label": -1,
                "rationale_label": -1,
            }
            annotations.append((f"query {q.id!r}", raw))
        img_db = memory_img_db(features, box_settings)
        gt_db = memory_img_db(features, GT_BOX_SETTINGS, "<memory GT-box img_db>")
        meta, records, lengths = self.txt_records(
            annotations,
            toker,
            set(img_db.name2nbb),
            set(gt_db.name2nbb),
            QUERY_VOCAB_NAME,
            options["special_token_base"],
        )
        txt_db = VcrTxtTokLmdb.from_writer(*memory_txt_writer(meta, records), lengths["qar"])
        return VcrDataset(txt_db, gt_db, img_db, eval_mode="test")

    def query_results(
        self, scores: torch.Tensor, batch: dict[str, Any], options: dict[str, Any], top_k: int
    ) -> list[dict[str, Any]]:
        """The probability of each answer (softmax over the four Q->A scores), the chosen answer, and the
        probability of each rationale given that answer (softmax over its four QA->R scores)."""
        per_question = scores.reshape(len(batch["qids"]), -1)
        answer_probs = torch.softmax(per_question[:, :4], dim=1)
        chosen = answer_probs.argmax(dim=1)
        _, rationale_scores = vcr_scores(per_question, chosen)
        rationale_probs = torch.softmax(rationale_scores, dim=1)
        return [
            {"answer": int(a), "answer_probs": p.tolist(), "rationale": int(r.argmax()), "rationale_probs": r.tolist()}
            for a, p, r in zip(chosen.tolist(), answer_probs, rationale_probs)
        ]

    def bundled_split(self, scenes: list[Any], rng: np.random.Generator, split: str) -> Optional[tuple[Any, dict]]:
        """``vcr_annotations`` of the split (none for test, as VCR's test labels are hidden); tags after the tiny
        model's word table."""
        if split == "test":
            return None
        records = vcr_annotations(scenes, rng, split)
        pairs = [(f"bundled {self.name} {split} record {i}", r) for i, r in enumerate(records)]
        return pairs, {"special_token_base": UniterConfig.tiny().vocab_size}


def _annot_order(qid: str) -> tuple:
    """Sort key of ``inf_vcr.py`` (the number after the split, e.g. ``val-12``), falling back to the text."""
    tail = qid.split("-")[-1]
    return (0, int(tail), qid) if tail.isdigit() else (1, 0, qid)
