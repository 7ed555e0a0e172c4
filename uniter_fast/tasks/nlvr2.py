"""NLVR2 (the original ``model/nlvr2.py``, ``data/nlvr2.py``, ``train_nlvr2.py``, ``inf_nlvr2.py``,
``scripts/eval_nlvr2.py``): a statement about two images, true or false, in the three original variants.

* ``paired``: the text with each image (two sequences); the two pooled outputs concatenated -> ``nlvr2_output``
  Linear(2H, 2).
* ``triplet``: one sequence, text + both images -> ``nlvr2_output`` Linear(H, 2).
* ``paired-attn`` (the original's best): the two sequences attend to each other (``attn1``: left queries the right,
  ``attn2``: right queries the left; ``torch.nn.MultiheadAttention``, the same parameters as the original's copy:
  ``in_proj_weight``, ``in_proj_bias``, ``out_proj``), ``fc`` = Linear(2H, H) + ReLU + Dropout on [attended; own],
  ``attn_pool`` (score = ReLU(Linear(H, 1)), masked softmax) per side, ``nlvr2_output`` Linear(2H, 2).

The type table grows to 3 rows (row 2 a copy of the image row); with ``use_img_type`` the left / right image
regions get types 1 / 2. Loss: cross-entropy, mean over pairs. Metrics: accuracy and consistency (the share of
sentences whose every image pair is right; identifiers ``{split}-{set}-{pair}-{k}`` grouped without the pair field,
as the official script). Predictions: ``results.csv`` lines ``identifier,True|False``.
"""

from __future__ import annotations

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
from uniter_fast.data.task_records import field, image_key, nlvr2_record
from uniter_fast.errors import DataError
from uniter_fast.layout import padded_index
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
from uniter_fast.tasks.spec import QUERY_VOCAB_NAME, Query, Task, ratio, require, scores_of
from uniter_fast.tasks.synthetic.nlvr2 import BUNDLED_SENTENCES, nlvr2_annotations

if TYPE_CHECKING:
    from uniter_fast.data.tokenizer import WordPiece

VARIANTS = ("paired", "triplet", "paired-attn")
TYPE_ROWS = (0, 1, 1)  # init_type_embedding: the second image's type starts as a copy of the image type


class AttentionPool(nn.Module):
    """Attention pooling: score = ReLU(Linear(H, 1)), softmax over unmasked positions, weighted sum."""

    def __init__(self, hidden_size: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden_size, 1), nn.ReLU())
        self.dropout = nn.Dropout(drop)

    def forward(self, input_: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """input_: [B, T, H]; mask: [B, T] bool, True at padding. Returns [B, H]."""
        score = self.fc(input_).squeeze(-1) + mask.to(input_.dtype) * -1e4
        weights = self.dropout(F.softmax(score, dim=1))
        return weights.unsqueeze(1).matmul(input_).squeeze(1)


class _Nlvr2Model(UniterPreTrainedModel):
    captures = True

    def forward(
        self, batch: dict[str, Any], task: Any = None, compute_loss: bool = True, with_logits: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"loss": 0-dim}`` (CE, mean over pairs) or ``{"scores": [B, 2]}`` (index 1 = true); ``with_logits`` adds
        ``"logits"``, the scores [B, 2] (adversarial training's KL is over their softmax, as VILLA)."""
        scores = self.scores(batch, self._encode(batch))
        if not compute_loss:
            return {"scores": scores}
        require(batch, ("targets",), "nlvr2")
        loss = cross_entropy_mean(scores, batch["targets"], batch.get("example_weights"))
        return {"loss": loss, **({"logits": scores} if with_logits else {})}

    def scores(self, batch: dict[str, Any], sequence_output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class UniterForNlvr2Paired(_Nlvr2Model):
    """Paired: [pooled(text + left); pooled(text + right)] -> ``nlvr2_output`` Linear(2H, 2)."""

    def __init__(self, config: UniterConfig, fast: bool = False) -> None:
        super().__init__(config, fast)
        self.nlvr2_output = nn.Linear(config.hidden_size * 2, 2)
        self.init_head_weights(self.nlvr2_output)

    def scores(self, batch: dict[str, Any], sequence_output: torch.Tensor) -> torch.Tensor:
        """[pairs, 2] from the two pooled outputs of each pair, side by side."""
        pooled = self._pooled(batch, sequence_output)
        return self.nlvr2_output(pooled.reshape(pooled.size(0) // 2, -1))


class UniterForNlvr2Triplet(_Nlvr2Model):
    """Triplet: pooled(text + left + right) -> ``nlvr2_output`` Linear(H, 2)."""

    def __init__(self, config: UniterConfig, fast: bool = False) -> None:
        super().__init__(config, fast)
        self.nlvr2_output = nn.Linear(config.hidden_size, 2)
        self.init_head_weights(self.nlvr2_output)

    def scores(self, batch: dict[str, Any], sequence_output: torch.Tensor) -> torch.Tensor:
        """[B, 2] from the pooled output of each (text, left, right) sequence."""
        return self.nlvr2_output(self._pooled(batch, sequence_output))


class UniterForNlvr2PairedAttn(_Nlvr2Model):
    """Paired with bidirectional attention between the two sequences, attention pooling and Linear(2H, 2)."""

    def __init__(self, config: UniterConfig, fast: bool = False) -> None:
        super().__init__(config, fast)
        hidden, heads = config.hidden_size, config.num_attention_heads
        self.attn1 = nn.MultiheadAttention(hidden, heads, dropout=config.attention_probs_dropout_prob)
        self.attn2 = nn.MultiheadAttention(hidden, heads, dropout=config.attention_probs_dropout_prob)
        self.fc = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Dropout(config.hidden_dropout_prob))
        self.attn_pool = AttentionPool(hidden, config.attention_probs_dropout_prob)
        self.nlvr2_output = nn.Linear(2 * hidden, 2)
        self.init_head_weights(self.attn1, self.attn2, self.fc, self.attn_pool, self.nlvr2_output)

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """The encoder's pairs plus ``out_proj``'s weight and bias of each ``nn.MultiheadAttention``, which its
        forward reads without calling ``out_proj``."""
        out = [(attn, p) for attn in (self.attn1, self.attn2) for p in (attn.out_proj.weight, attn.out_proj.bias)]
        return super().external_parameters() + out

    def scores(self, batch: dict[str, Any], sequence_output: torch.Tensor) -> torch.Tensor:
        """[pairs, 2] of the sequences [left_0, right_0, left_1, ...]: padded ([B, L, H], ``attn_masks``), or packed
        ([T, H]) gathered to [B, L, H] by the collate's ``seq_index`` / ``seq_pad`` (:func:`add_pair_layout`; a
        pad position holds token 0's output instead of zeros: masked, it weighs exactly 0 either way)."""
        if sequence_output.dim() == 2:
            packed = batch["packed"]
            require(packed, ("seq_index", "seq_pad"), "nlvr2", "paired-attn on the packed layout: add_pair_layout")
            sequence, pad = sequence_output[packed["seq_index"]], packed["seq_pad"]
        else:
            sequence, pad = sequence_output, batch["attn_masks"] == 0
        pairs, length, hidden = sequence.size(0) // 2, sequence.size(1), sequence.size(2)
        left, right = sequence.reshape(pairs, 2 * length, hidden).chunk(2, dim=1)
        pad = pad.reshape(pairs, 2 * length)
        left_pad, right_pad = pad.chunk(2, dim=1)
        left, right = left.transpose(0, 1), right.transpose(0, 1)  # [L, pairs, H], the layout of the original
        l2r, _ = self.attn1(left, right, right, key_padding_mask=right_pad, need_weights=False)
        r2l, _ = self.attn2(right, left, left, key_padding_mask=left_pad, need_weights=False)
        left = self.fc(torch.cat([l2r, left], dim=-1)).transpose(0, 1)
        right = self.fc(torch.cat([r2l, right], dim=-1)).transpose(0, 1)
        pooled = torch.cat([self.attn_pool(left, left_pad), self.attn_pool(right, right_pad)], dim=-1)
        return self.nlvr2_output(pooled)


def add_pair_layout(batch: dict[str, Any]) -> dict[str, Any]:
    """Add paired-attn's host-built gather of each sequence from the packed output to ``batch["packed"]`` (when it
    has one): ``seq_index`` int64 [S, L] and ``seq_pad`` bool [S, L] (:func:`uniter_fast.layout.padded_index` of
    the S sequences, L = ``max_seqlen``). Returns ``batch``."""
    packed = batch.get("packed")
    if packed is not None:
        bounds = packed["cu_seqlens"].long()
        index, pad = padded_index(bounds[:-1], bounds[1:] - bounds[:-1], int(packed["max_seqlen"]))
        packed["seq_index"], packed["seq_pad"] = index, pad
    return batch


MODELS = {"paired": UniterForNlvr2Paired, "triplet": UniterForNlvr2Triplet, "paired-attn": UniterForNlvr2PairedAttn}


class Nlvr2Dataset(TaskDataset):
    """Statements with their two images; ``paired`` items hold two sequences (text + each image), triplet items
    one (text + both). ``lens``: 2 x wordpieces + both images' boxes (paired) or wordpieces + boxes (triplet)."""

    task = "nlvr2"

    def __init__(
        self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, paired: bool, use_img_type: bool = True, seed: int = 0
    ) -> None:
        ids = list(txt_db.id2len)
        fnames = txt_db.txt2img
        for id_ in ids:
            if not isinstance(fnames[id_], list) or len(fnames[id_]) != 2:
                raise DataError(
                    f"txt_db {txt_db.path!r}: NLVR2 example {id_!r} needs two images in 'img_fname', got "
                    f"{fnames[id_]!r}"
                )
        check_images_exist(txt_db, ids, [fnames[i] for i in ids], [img_db, img_db])
        nbb = np.array([[img_db.name2nbb[f] for f in fnames[i]] for i in ids])
        text = np.array([txt_db.id2len[i] for i in ids])
        super().__init__(txt_db, ids, (2 if paired else 1) * text + nbb.sum(1), seed)
        self.img_db, self.paired, self.use_img_type = img_db, paired, use_img_type

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_ = self.ids[index]
        record = self.record(index)
        if record.get("target") not in (0, 1, True, False):
            raise DataError(
                f"txt_db {self.txt_db.path!r} record {id_!r}: field 'target' must be 0 or 1, got "
                f"{record.get('target')!r}"
            )
        text = self.txt_db.combine_inputs(record["input_ids"])
        images = [image_inputs(self.img_db, f, f"text {id_!r}") for f in record["img_fname"]]
        types = [
            torch.full((f.size(0),), k + 1, dtype=torch.long) if self.use_img_type else None
            for k, (f, _) in enumerate(images)
        ]
        if self.paired:
            rows = [row(text, f, p, img_type_ids=t) for (f, p), t in zip(images, types)]
        else:
            type_ids = torch.cat(types) if self.use_img_type else None
            rows = [
                row(text, torch.cat([f for f, _ in images]), torch.cat([p for _, p in images]), img_type_ids=type_ids)
            ]
        return {"rows": rows, "target": int(record["target"]), "qid": id_}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Joint layout of every sequence (paired: [left_0, right_0, left_1, ...], with :func:`add_pair_layout`),
        ``targets`` int64 [B], ``qids``."""
        batch = collate_rows([r for it in items for r in it["rows"]], self.task)
        if self.paired:
            add_pair_layout(batch)
        batch["targets"] = torch.tensor([it["target"] for it in items], dtype=torch.long)
        batch["qids"] = [it["qid"] for it in items]
        return batch


def consistency(predictions: list[dict[str, Any]]) -> float:
    """Share of sentences whose image pairs are all predicted right (``scripts/eval_nlvr2.py``'s rule: the
    identifier with its third field blanked names the sentence)."""
    sentences: dict[str, bool] = {}
    for p in predictions:
        parts = p["identifier"].split("-")
        if len(parts) > 2:
            parts[2] = ""
        key = "-".join(parts)
        sentences[key] = sentences.get(key, True) and p["prediction"] == p["label"]
    return ratio(sum(sentences.values()), len(sentences))


class Nlvr2Task(Task):
    """NLVR2: ``model`` (paired / triplet / paired-attn), ``use_img_type``."""

    adversarial = True
    name = "nlvr2"
    heads = ("nlvr2_output", "attn1", "attn2", "fc", "attn_pool")
    options = {"model": "paired-attn", "use_img_type": True}
    sums = ("loss", "correct", "count")
    headline = "acc"

    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        out = super().check_options(options, where)
        if out["model"] not in VARIANTS:
            raise ValueError(f"{where}: 'model' must be one of {VARIANTS}, got {out['model']!r}")
        return out

    def options_from_state(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        if "attn1.in_proj_weight" in state:
            return {"model": "paired-attn"}
        if "nlvr2_output.weight" in state:
            hidden = state["uniter.pooler.dense.weight"].shape[0]
            return {"model": "paired" if state["nlvr2_output.weight"].shape[1] == 2 * hidden else "triplet"}
        return {}

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        return MODELS[options["model"]](config, fast)

    def prepare_model(self, model: UniterPreTrainedModel, options: dict[str, Any]) -> None:
        rows = model.uniter.embeddings.token_type_embeddings.num_embeddings
        if rows == 2:
            model.init_type_embedding(TYPE_ROWS)
        elif rows != len(TYPE_ROWS):
            raise ValueError(f"an NLVR2 model has 2 (pretrained) or 3 type rows, this one has {rows}")

    def train_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int
    ) -> TaskDataset | list[TaskDataset]:
        txt = dbs.txt(TxtTokLmdb, txt_path, True)
        return Nlvr2Dataset(txt, dbs.img(img_path), options["model"] != "triplet", options["use_img_type"], seed)

    def eval_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], split: str, seed: int = 0
    ) -> Any:
        txt = dbs.txt(TxtTokLmdb, txt_path, False)
        return Nlvr2Dataset(txt, dbs.img(img_path), options["model"] != "triplet", options["use_img_type"])

    def eval_batch(
        self, model: Any, batch: dict[str, Any], options: dict[str, Any]
    ) -> tuple[dict[str, float], list[Any]]:
        scores = scores_of(model, batch)
        predicted = scores.argmax(dim=1)
        targets = batch["targets"]
        names = ("False", "True")
        preds = [
            {"identifier": q, "prediction": names[int(p)], "label": names[int(t)]}
            for q, p, t in zip(batch["qids"], predicted.tolist(), targets.tolist())
        ]
        sums = {
            "loss": float(F.cross_entropy(scores, targets, reduction="sum")),
            "correct": float((predicted == targets).sum()),
            "count": float(len(preds)),
        }
        return sums, preds

    def metrics(self, sums: dict[str, float], predictions: list[Any]) -> dict[str, float]:
        return {
            "acc": ratio(sums["correct"], sums["count"]),
            "loss": ratio(sums["loss"], sums["count"]),
            "consistency": consistency(predictions),
        }

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        path = os.path.join(directory, f"{stem}.csv")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(f"{p['identifier']},{p['prediction']}\n" for p in predictions)
        return [path]

    def example(
        self,
        config: UniterConfig,
        size: int,
        rng: np.random.Generator,
        txt_range: tuple[int, int] = (10, 60),
        img_range: tuple[int, int] = (10, 100),
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The paired-attn variant: two rows per example (image types 1 and 2), a true/false target each."""
        rows = random_rows(size, 2, config.vocab_size, rng, txt_range, img_range, img_types=True)
        batch = add_pair_layout(collate_rows(rows, self.name))
        batch["targets"] = torch.from_numpy(rng.integers(0, 2, size))
        return self.check_options({"model": "paired-attn"}, "example"), batch

    # ------------------------------------------------------------------ databases
    bundled_stream = 2

    def annotation_images(self, annotations: Any) -> tuple[dict[str, str], dict[str, str]]:
        """The two images of every record."""
        keys = {image_key(str(x)) for where, raw in annotations for x in field(raw, "images", list, where)}
        return {k: k for k in keys}, {}

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
        """Records of :meth:`txt_records`."""
        records = self.txt_records(annotations, toker, images)
        return write_records(out, toker.meta(meta_name), records, desc=f"{self.name} texts")

    def txt_records(self, annotations: Any, toker: Any, images: set[str]) -> list[Record]:
        """Records of ``nlvr2_record`` (``img_fname`` = [left, right], ``target`` 1 / 0), image keys checked
        against ``images``."""
        records = []
        for where, raw in annotations:
            id_, ids, names, fields = nlvr2_record(raw, toker, where)
            for name in names:
                check_image(name, images, "detected-box", where)
            records.append((where, id_, ids, names, fields))
        return records

    # ------------------------------------------------------------------ new images
    query_images = 2

    def query_dataset(
        self,
        queries: list[Query],
        toker: WordPiece,
        features: dict[str, dict[str, np.ndarray]],
        box_settings: tuple[float, int, int, int],
        options: dict[str, Any],
    ) -> TaskDataset:
        """Statements about (left, right) as annotations (the converter needs a label, which the scores never
        read: false stands for "unknown"), through :meth:`txt_records`, read by ``Nlvr2Dataset``."""
        annotations = [
            (f"query {q.id!r}", {"identifier": q.id, "images": q.images, "sentence": q.text, "label": False})
            for q in queries
        ]
        img_db = memory_img_db(features, box_settings)
        records = self.txt_records(annotations, toker, set(img_db.name2nbb))
        txt_db = TxtTokLmdb.from_writer(*memory_txt_writer(toker.meta(QUERY_VOCAB_NAME), records))
        return Nlvr2Dataset(txt_db, img_db, options["model"] != "triplet", options["use_img_type"])

    def query_results(
        self, scores: torch.Tensor, batch: dict[str, Any], options: dict[str, Any], top_k: int
    ) -> list[dict[str, Any]]:
        """P(the statement is true) (softmax over the head's two logits, false and true) and the verdict."""
        true = torch.softmax(scores, dim=1)[:, 1].tolist()
        return [{"label": p > 0.5, "prob_true": p} for p in true]

    def bundled_split(self, scenes: list[Any], rng: np.random.Generator, split: str) -> Optional[tuple[Any, dict]]:
        """``nlvr2_annotations``: sentences about image pairs of the split."""
        records = nlvr2_annotations(scenes, rng, BUNDLED_SENTENCES[split], split)
        return [(f"bundled {self.name} {split} record {i}", r) for i, r in enumerate(records)], {}
