"""Image-text retrieval (the original ``model/itm.py``, ``data/itm.py``, ``train_itm.py``,
``train_itm_hard_negatives.py``), with a cheap first stage for fast evaluation.

Model: ``itm_output`` Linear(H, 2) (the pretraining ITM head, unused by the loss) and ``rank_output`` Linear(H, 1) on
the pooled [CLS]; ``init_output`` copies ``itm_output``'s positive row (1) into ``rank_output`` after a pretrained
checkpoint is loaded (the zero-shot scorer). Loss (``triplet_loss``): scores come in groups of ``sample_size`` rows,
the positive pair first; per negative, max(0, margin + sigmoid(s_neg) - sigmoid(s_pos)); the training scripts take
the mean. ``itm``: each text with ``negative_size`` negative images and the same number of negative texts of its image
(``ItmRankDataset``). ``itm-hn``: each text with ``negative_size`` candidate images and each image with
``negative_size`` candidate texts, scored without gradient in eval mode; the ``hard_neg_size`` best-scoring
negatives of each group are trained on (``UniterForImageTextRetrievalHardNeg``).

First stage (ours, LightningDOT-style; off with ``first_stage_dim`` 0, as original checkpoints have it): ``txt_proj``
on the [CLS] output of a text-only UNITER pass and ``img_proj`` on the mean region output of an image-only pass, both
L2-normalised; trained alongside the triplet loss, weighted by ``first_stage_weight``, with ``first_stage_loss``
"contrastive" (in-batch contrastive loss, both directions, temperature ``temperature``, other captions of the same
image masked out), "distill" (``distill_loss``: KL from the cross-encoder's scores of every in-batch text x image,
scored without gradient in eval mode, to the first stage's similarities, both directions) or their sum
"contrastive+distill". With ``first_stage_tower`` the two passes run on ``first_stage_uniter``, an encoder of the
first stage's own (a copy of the checkpoint's at the start), so the first-stage loss no longer reaches the
cross-encoder; ``train_first_stage_only`` then freezes the cross-encoder and trains the tower alone (distilled from
the frozen cross-encoder's scores). Evaluation
(``uniter_fast.tasks.itm_eval``): ``exact`` scores every text x image pair with the cross-encoder; ``fast`` takes
the first stage's ``top_k`` images per text and ``top_k`` texts per image and re-ranks only those pairs.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.checkpoint import ENCODER_PREFIX
from uniter_fast.config import UniterConfig
from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.data.gallery import packed_pairs, region_rows, with_regions
from uniter_fast.data.memory_db import memory_img_db, memory_txt_writer
from uniter_fast.data.task_db import check_image
from uniter_fast.data.task_records import caption_record
from uniter_fast.errors import ConfigError, DataError
from uniter_fast.layout import joint_layout, pack_batch, packed_positions, padded_slots, segment_arange
from uniter_fast.losses import weighted_mean
from uniter_fast.model.base import UniterPreTrainedModel, eval_mode
from uniter_fast.model.uniter import Model
from uniter_fast.tasks.data import DbCache, TaskDataset, collate_rows, image_inputs, row
from uniter_fast.tasks.spec import QUERY_VOCAB_NAME, Query, Task, require

if TYPE_CHECKING:
    from uniter_fast.data.tokenizer import WordPiece

PADDED_ROW_KEYS = ("input_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index", "txt_lens", "num_bbs")
EVAL_MODES = ("exact", "fast")
FIRST_STAGE_LOSSES = ("contrastive", "distill", "contrastive+distill")
TOWER_PREFIX = "first_stage_uniter."
"""State-dict prefix of the first stage's own encoder (``first_stage_tower``)."""


def has_tower(state: dict[str, torch.Tensor]) -> bool:
    """Whether a checkpoint's ``state`` holds a first-stage tower (keys under :data:`TOWER_PREFIX`)."""
    return any(k.startswith(TOWER_PREFIX) for k in state)


def first_stage_terms(first_stage_loss: str) -> frozenset[str]:
    """The loss terms a ``first_stage_loss`` name combines: ``"contrastive+distill"`` -> {"contrastive", "distill"}."""
    return frozenset(first_stage_loss.split("+"))


def triplet_loss(scores: torch.Tensor, sample_size: int, margin: float) -> torch.Tensor:
    """[G, sample_size - 1] hinge terms max(0, margin + sigmoid(s_neg) - sigmoid(s_pos)) of ``scores`` [G *
    sample_size] (each group: the positive first, then its negatives), fp32."""
    if sample_size < 2 or scores.numel() % sample_size:
        raise ValueError(f"scores of {scores.numel()} pairs do not form groups of sample_size={sample_size} (>= 2)")
    grouped = torch.sigmoid(scores.float()).view(-1, sample_size)
    return torch.clamp(margin + grouped[:, 1:] - grouped[:, :1], min=0)


def side_means(terms: torch.Tensor, sides: int) -> torch.Tensor:
    """[sides] the mean of each side's hinge terms ``terms`` [G, n], whose groups come example by example, ``sides``
    groups each (``itm-hn``: the text side, then the image side)."""
    if terms.size(0) % sides:
        raise ValueError(f"{terms.size(0)} groups do not form examples of {sides} sides")
    return terms.reshape(-1, sides, terms.size(1)).mean(dim=(0, 2))


def contrastive_loss(
    txt: torch.Tensor,
    img: torch.Tensor,
    groups: torch.Tensor,
    temperature: float,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """In-batch contrastive loss (mean of text->image and image->text cross-entropy) of matching rows of ``txt`` /
    ``img`` [G, D] (L2-normalised); off-diagonal pairs of the same image (``groups`` int64 [G]) are masked out.
    ``weights`` [G] (a fixed-shape batch's ``example_weights``): the rows of weight 0 are padding, neither a
    candidate of a real row nor counted in the means."""
    logits = txt.float() @ img.float().t() / temperature
    same = groups[:, None] == groups[None, :]
    logits = logits.masked_fill(same & ~torch.eye(len(groups), dtype=torch.bool, device=logits.device), float("-inf"))
    target = torch.arange(len(groups), device=logits.device)
    if weights is None:
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    pad = weights == 0
    padded_candidate = ~pad[:, None] & pad[None, :]  # a padding row keeps its own diagonal: its terms stay finite
    per_dir = [
        weighted_mean(
            F.cross_entropy(x.masked_fill(padded_candidate, float("-inf")), target, reduction="none"), weights
        )
        for x in (logits, logits.t())
    ]
    return (per_dir[0] + per_dir[1]) / 2


MASKED_LOGIT = -1e9
"""A padded candidate's logit in the distillation's softmaxes: probability exactly 0, and finite, so that teacher and
student both holding it give a KL term of 0 (with -inf: 0 x (-inf - -inf) = NaN)."""


def distill_loss(
    txt: torch.Tensor,
    img: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    teacher_temperature: float,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Distillation of the cross-encoder into the first stage: mean over both directions (each text over the batch's
    images, each image over its texts) of KL(softmax(``teacher`` / ``teacher_temperature``) || softmax(``txt`` @
    ``img``.T / ``temperature``)), per query, averaged over queries. ``txt`` / ``img`` [G, D] (L2-normalised),
    ``teacher`` [G, G] cross-encoder scores of (text i, image j), no gradient taken through it; fp32 0-dim.
    ``weights`` [G] (a fixed-shape batch's ``example_weights``): the groups of weight 0 are padding, neither a
    candidate of a real query (:data:`MASKED_LOGIT` on both sides) nor counted in the means."""
    student = txt.float() @ img.float().t() / temperature
    target = teacher.detach().float() / teacher_temperature
    if weights is None:
        per_dir = [
            F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)
            for s, t in ((student, target), (student.t(), target.t()))
        ]
        return (per_dir[0] + per_dir[1]) / 2
    pad = weights == 0
    padded_candidate = ~pad[:, None] & pad[None, :]
    per_dir = []
    for s, t in ((student, target), (student.t(), target.t())):
        s, t = s.masked_fill(padded_candidate, MASKED_LOGIT), t.masked_fill(padded_candidate, MASKED_LOGIT)
        terms = F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="none", log_target=True)
        per_dir.append(weighted_mean(terms.sum(1), weights))
    return (per_dir[0] + per_dir[1]) / 2


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The pairs ``rows`` (int64 [R]) of a joint batch, padded keys sliced and the packed layout rebuilt."""
    out = {k: v for k, v in batch.items() if k not in PADDED_ROW_KEYS and k != "packed"}
    for key in PADDED_ROW_KEYS:
        out[key] = batch[key].index_select(0, rows)
    if "packed" in batch:
        out["packed"] = pack_batch(out)
    return out


class UniterForImageTextRetrieval(UniterPreTrainedModel):
    """UNITER + ``itm_output`` / ``rank_output`` (original names) + the optional first stage ``txt_proj`` /
    ``img_proj``. With ``hard_neg_size`` > 0 it trains as the original ``...HardNeg`` model."""

    def __init__(
        self,
        config: UniterConfig,
        margin: float = 0.2,
        hard_neg_size: int = 0,
        first_stage_dim: int = 0,
        first_stage_weight: float = 1.0,
        temperature: float = 0.05,
        fast: bool = False,
        first_stage_loss: str = "contrastive",
        distill_temperature: float = 1.0,
        first_stage_tower: bool = False,
        train_first_stage_only: bool = False,
    ) -> None:
        super().__init__(config, fast)
        hidden = config.hidden_size
        self.itm_output = nn.Linear(hidden, 2)
        self.rank_output = nn.Linear(hidden, 1)
        heads: list[nn.Module] = [self.itm_output, self.rank_output]
        if first_stage_dim < 0 or hard_neg_size < 0:
            raise ValueError(f"first_stage_dim and hard_neg_size must be >= 0, got {first_stage_dim}, {hard_neg_size}")
        if first_stage_loss not in FIRST_STAGE_LOSSES:
            raise ValueError(f"first_stage_loss must be one of {FIRST_STAGE_LOSSES}, got {first_stage_loss!r}")
        if first_stage_dim:
            self.txt_proj = nn.Linear(hidden, first_stage_dim)
            self.img_proj = nn.Linear(hidden, first_stage_dim)
            heads += [self.txt_proj, self.img_proj]
        if (first_stage_tower or train_first_stage_only) and not first_stage_dim:
            raise ValueError("first_stage_tower and train_first_stage_only need first_stage_dim > 0")
        if train_first_stage_only and (not first_stage_tower or hard_neg_size):
            raise ValueError("train_first_stage_only needs first_stage_tower true and hard_neg_size 0")
        if first_stage_tower:
            self.first_stage_uniter = Model(self.config)
        self.margin, self.hard_neg_size, self.first_stage_dim = margin, hard_neg_size, first_stage_dim
        self.first_stage_weight, self.temperature = first_stage_weight, temperature
        self.first_stage_loss, self.distill_temperature = first_stage_loss, distill_temperature
        self.train_first_stage_only = train_first_stage_only
        self._fresh_first_stage: Optional[torch.Tensor] = None  # see mark_first_stage_fresh
        self.init_head_weights(*heads)
        if train_first_stage_only:  # the cross-encoder is the teacher: its weights stay as loaded
            for module in (self.uniter, self.itm_output, self.rank_output):
                module.requires_grad_(False)

    @property
    def first_stage_encoder(self) -> Model:
        """The encoder of the first stage's text-only and image-only passes: its own tower ``first_stage_uniter``
        (``first_stage_tower``), else the cross-encoder's ``uniter``."""
        return getattr(self, "first_stage_uniter", self.uniter)

    def copy_encoder_to_tower(self) -> None:
        """Set the tower ``first_stage_uniter`` to a copy of the cross-encoder's weights (its start from a pretrained
        or fine-tuned checkpoint, as LightningDOT's towers start from UNITER)."""
        self.first_stage_uniter.load_state_dict(self.uniter.state_dict())

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """The cross-encoder's pairs, plus the tower's when the first stage has its own."""
        tower = getattr(self, "first_stage_uniter", None)
        return super().external_parameters() + (tower.external_parameters() if tower is not None else [])

    @property
    def captures(self) -> bool:  # type: ignore[override]
        """The ranking loss and the first stage read only packed layouts (``cls_index``; the collate's
        :func:`add_first_stage` and, for distillation, the teacher grid of :func:`add_cross_pairs`, whose regions
        are gathered on the device), groups weighted by a fixed-shape batch's ``example_weights``. Hard negatives
        pick and re-pack rows on the host (``select_rows``): such a model runs uncaptured."""
        return not self.hard_neg_size

    @property
    def distills(self) -> bool:
        """Whether ``first_stage_loss`` has the distillation term."""
        return "distill" in first_stage_terms(self.first_stage_loss)

    def mark_first_stage_fresh(self) -> None:
        """Remember the first stage's weights as freshly initialised (a pretrained checkpoint, which has none, was
        loaded): :attr:`first_stage_untrained` holds until they change (a training step, or trained weights loaded
        into the model or its engine)."""
        self._fresh_first_stage = self.txt_proj.weight.detach().clone() if self.first_stage_dim else None

    @property
    def first_stage_untrained(self) -> bool:
        """Whether the first stage still holds the fresh init of :meth:`mark_first_stage_fresh` (fast evaluation
        refuses such a model: its candidates would be random)."""
        fresh, weight = self._fresh_first_stage, getattr(self, "txt_proj", None)
        if fresh is None or weight is None or weight.weight.shape != fresh.shape:
            return False
        current = weight.weight.detach()
        return torch.equal(fresh.to(current.device, current.dtype), current)

    def init_output(self) -> None:
        """``rank_output`` = row 1 (match) of ``itm_output``, as the original after ``from_pretrained`` (a copy: the
        original shares the storage; ``itm_output`` takes no part in fine-tuning either way)."""
        with torch.no_grad():
            self.rank_output.weight.copy_(self.itm_output.weight[1:])
            self.rank_output.bias.copy_(self.itm_output.bias[1:])

    # ------------------------------------------------------------------ cross-encoder
    def rank_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-encoder scores [B] (logits before the sigmoid) of the joint pairs of ``batch``."""
        return self.rank_output(self._pooled(batch, self._encode(batch))).squeeze(1)

    def forward(
        self, batch: dict[str, Any], task: Any = None, compute_loss: bool = True, with_logits: bool = False
    ) -> dict[str, torch.Tensor]:
        """``{"scores": [B]}``, or ``{"loss", "rank_loss"[, "first_stage_loss"]}`` (0-dim) for a batch of
        ``sample_size`` groups: ``rank_loss`` is the mean hinge term of each side summed over the batch's ``sides``
        (``itm``: one side, the mean; ``itm-hn``: text side + image side, as the original back-propagates them
        separately), with ``text_side_loss`` / ``image_side_loss`` when there are two. ``with_logits`` adds
        ``"logits"``, the scores [G, sample_size] of each group's candidates (positive first; adversarial training's
        KL is over their softmax within the group)."""
        if not compute_loss:
            return {"scores": self.rank_scores(batch)}
        require(batch, ("sample_size",), "itm")
        if self.train_first_stage_only:
            first = self.first_stage_objective(batch)
            return {"loss": self.first_stage_weight * first, "first_stage_loss": first.detach()}
        sample_size, sides = int(batch["sample_size"]), int(batch.get("sides", 1))
        if self.hard_neg_size and self.training:
            batch, sample_size = self.hard_batch(batch, sample_size), self.hard_neg_size + 1
        scores = self.rank_scores(batch)
        terms = triplet_loss(scores, sample_size, self.margin)
        # every side has as many terms: the sum of the sides' means (a fixed-shape batch's: over its real groups)
        rank_loss = weighted_mean(terms, batch.get("example_weights")) * sides
        out = {"loss": rank_loss, "rank_loss": rank_loss.detach()}
        if with_logits:
            out["logits"] = scores.view(-1, sample_size)
        if sides == 2:
            per_side = side_means(terms.detach(), sides)
            out.update(text_side_loss=per_side[0], image_side_loss=per_side[1])
        if self.first_stage_dim and self.first_stage_weight > 0:
            first = self.first_stage_objective(batch)
            out["loss"] = rank_loss + self.first_stage_weight * first
            out["first_stage_loss"] = first.detach()
        return out

    def first_stage_objective(self, batch: dict[str, Any]) -> torch.Tensor:
        """The first stage's loss (fp32 0-dim, before ``first_stage_weight``) on each group's positive pair: the
        terms of ``first_stage_loss`` summed (contrastive; distillation from the cross-encoder's scores)."""
        txt, img = self.pair_embeddings(batch)
        parts = []
        if "contrastive" in first_stage_terms(self.first_stage_loss):
            weights = batch.get("example_weights")
            parts.append(contrastive_loss(txt, img, batch["pair_images"], self.temperature, weights))
        if self.distills:
            teacher, weights = self.teacher_scores(batch), batch.get("example_weights")
            parts.append(distill_loss(txt, img, teacher, self.temperature, self.distill_temperature, weights))
        return sum(parts[1:], parts[0])

    def teacher_scores(self, batch: dict[str, Any]) -> torch.Tensor:
        """Cross-encoder scores float32 [G, G] of the teacher grid (:meth:`teacher_batch`: every text of the batch's
        G positives with every positive image, row-major), without gradient in eval mode (no dropout), as
        ``hard_batch`` scores its candidates. A fixed-shape batch (``uniter_fast.data.buckets``) places its scores
        in the padded G' x G' grid by ``grid_index`` (padded groups' cells: pair 0's score)."""
        with torch.no_grad(), eval_mode(self):
            scores = self.rank_scores(self.teacher_batch(batch)).float()
        grid_index = batch["cross_pairs"].get("grid_index")
        if grid_index is not None:
            scores = scores.index_select(0, grid_index)
        groups = math.isqrt(scores.numel())
        return scores.view(groups, groups)

    def teacher_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The teacher grid of ``batch["cross_pairs"]`` (:func:`add_cross_pairs`) in the layout this model reads,
        its regions taken on the batch's device from the batch's own tensors: packed, the rows ``regions`` of the
        positives' image-only layout (``first_stage["img"]``); padded, the rows of the groups' positives
        (``pair_rows``: text of group i, image of group j at row i * G + j) with the grid's ``attn_masks`` /
        ``gather_index``."""
        require(batch, ("cross_pairs",), "itm", "first_stage_loss 'distill'")
        cross = batch["cross_pairs"]
        if self._uses_packed(batch):
            img = batch["first_stage"]["img"]
            return {"packed": with_regions(cross["packed"], cross["regions"], img["img_feat"], img["img_pos_feat"])}
        rows = batch["pair_rows"]
        grid = torch.arange(rows.numel() ** 2, device=rows.device)
        txt_rows, img_rows = rows[grid // rows.numel()], rows[grid % rows.numel()]
        return {
            "input_ids": batch["input_ids"].index_select(0, txt_rows),
            "position_ids": batch["position_ids"],
            "img_feat": batch["img_feat"].index_select(0, img_rows),
            "img_pos_feat": batch["img_pos_feat"].index_select(0, img_rows),
            "attn_masks": cross["attn_masks"],
            "gather_index": cross["gather_index"],
        }

    def hard_batch(self, batch: dict[str, Any], sample_size: int) -> dict[str, Any]:
        """Score every pair without gradient in eval mode (as the original), keep each group's positive and its
        ``hard_neg_size`` best-scoring negatives; the kept pairs, positives first, ``pair_rows`` remapped."""
        if sample_size - 1 < self.hard_neg_size:
            raise ValueError(f"hard_neg_size={self.hard_neg_size} is larger than the {sample_size - 1} candidates")
        with torch.no_grad(), eval_mode(self):
            scores = self.rank_scores(batch).float().view(-1, sample_size)
        hard = scores[:, 1:].topk(self.hard_neg_size, dim=1).indices + 1
        keep = torch.cat([torch.zeros_like(hard[:, :1]), hard], dim=1)
        starts = torch.arange(scores.size(0), device=keep.device)[:, None] * sample_size
        out = select_rows(batch, (starts + keep).flatten())
        if "pair_rows" in batch:  # positives sit at group starts in both layouts
            out["pair_rows"] = batch["pair_rows"] // sample_size * (self.hard_neg_size + 1)
        return out

    # ------------------------------------------------------------------ first stage
    def pair_embeddings(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first-stage embeddings (text [G, D], image [G, D], L2-normalised fp32) of each group's positive pair:
        on the packed path from the collate's ``first_stage`` layouts (:func:`add_first_stage`; a text-only and an
        image-only packed pass), else from the padded rows ``pair_rows`` (:meth:`text_embeddings`,
        :meth:`image_embeddings`). The same passes either way: text with its positions and type 0 alone, regions
        with type 1 alone, the image's mean region output."""
        require(batch, ("pair_images",), "itm", "the first-stage loss")
        if self._uses_packed(batch):
            require(batch, ("first_stage",), "itm", "the first stage on the packed layout: add_first_stage")
            stage, encoder = batch["first_stage"], self.first_stage_encoder
            txt_out = encoder.forward_packed(stage["txt"], check_values=self.check_values)
            txt = F.normalize(self.txt_proj(txt_out[stage["txt"]["cls_index"]]).float(), dim=-1)
            regions = encoder.forward_packed(stage["img"], check_values=self.check_values)
            regions = regions[stage["img"]["img_index"]]
            groups = stage["img_counts"].numel()  # row `groups` takes a fixed-shape batch's padding regions
            sums = regions.new_zeros(groups + 1, regions.size(1)).index_add_(0, stage["img_rows"], regions)
            mean = sums[:groups] / stage["img_counts"][:, None].to(sums.dtype)
            return txt, F.normalize(self.img_proj(mean).float(), dim=-1)
        require(batch, ("pair_rows",), "itm", "the first-stage loss")
        pairs = select_rows(batch, batch["pair_rows"])
        txt = self.text_embeddings(pairs["input_ids"], pairs["txt_lens"])
        return txt, self.image_embeddings(pairs["img_feat"], pairs["img_pos_feat"], pairs["num_bbs"])

    def text_embeddings(self, input_ids: torch.Tensor, txt_lens: torch.Tensor) -> torch.Tensor:
        """L2-normalised first-stage text embeddings [B, D] of input_ids int64 [B, Lt] ([CLS] .. [SEP])."""
        mask = torch.arange(input_ids.size(1), device=input_ids.device)[None, :] < txt_lens[:, None]
        hidden = self.first_stage_encoder(input_ids, None, None, None, mask.long(), output_all_encoded_layers=False)
        return F.normalize(self.txt_proj(hidden[:, 0]).float(), dim=-1)

    def image_embeddings(
        self, img_feat: torch.Tensor, img_pos_feat: torch.Tensor, num_bbs: torch.Tensor
    ) -> torch.Tensor:
        """L2-normalised first-stage image embeddings [B, D] of img_feat [B, Nb, 2048] / img_pos_feat [B, Nb, 7]:
        ``img_proj`` of the mean region output of an image-only pass."""
        mask = torch.arange(img_feat.size(1), device=img_feat.device)[None, :] < num_bbs[:, None]
        hidden = self.first_stage_encoder(
            None, None, img_feat, img_pos_feat, mask.long(), output_all_encoded_layers=False
        )
        mean = (hidden * mask[..., None].to(hidden.dtype)).sum(1) / num_bbs[:, None].to(hidden.dtype)
        return F.normalize(self.img_proj(mean).float(), dim=-1)


# ---------------------------------------------------------------------- data
def add_first_stage(batch: dict[str, Any]) -> dict[str, Any]:
    """Add the first stage's packed inputs of each group's positive pair (``pair_rows``) to a collated batch:
    ``batch["first_stage"]`` = {``txt``: the text-only packed layout of the positives' texts (no regions; positions
    0 .. t-1, as the padded text-only pass), ``img``: the image-only packed layout of their images (no text;
    ``cls_index`` = each image's first region), ``img_rows`` int64 [Sn] (the group of each region), ``img_counts``
    float32 [G] (regions per group)}, built on the host from the padded keys. Returns ``batch``."""
    rows = batch["pair_rows"]
    txt_lens, num_bbs = batch["txt_lens"][rows], batch["num_bbs"][rows]
    zeros, empty = torch.zeros_like(num_bbs), torch.zeros(0, dtype=torch.long)
    img_feat, img_pos_feat = batch["img_feat"][rows], batch["img_pos_feat"][rows]
    txt = packed_positions(txt_lens, zeros)
    txt["txt_ids"] = batch["input_ids"][rows].reshape(-1)[padded_slots(txt_lens, batch["input_ids"].size(1))]
    txt["txt_position_ids"] = segment_arange(txt_lens, zeros)
    txt["img_feat"], txt["img_pos_feat"] = img_feat.new_zeros(0, img_feat.size(2)), img_pos_feat.new_zeros(0, 7)
    img = packed_positions(zeros, num_bbs)
    slots = padded_slots(num_bbs, img_feat.size(1))
    img["img_feat"] = img_feat.reshape(-1, img_feat.size(2))[slots]
    img["img_pos_feat"] = img_pos_feat.reshape(-1, img_pos_feat.size(2))[slots]
    img["txt_ids"], img["txt_position_ids"] = empty, empty.clone()
    groups = torch.arange(rows.numel())
    stage = {"txt": txt, "img": img, "img_rows": groups.repeat_interleave(num_bbs), "img_counts": num_bbs.float()}
    batch["first_stage"] = stage
    return batch


def add_cross_pairs(batch: dict[str, Any]) -> dict[str, Any]:
    """Add the distillation teacher's grid to a collated batch with ``first_stage`` (:func:`add_first_stage`): every
    text of the G positives (``pair_rows``) with every positive image, row-major (pair i * G + j: text of group i,
    image of group j), by index, so that no region feature is copied on the host: ``batch["cross_pairs"]`` =
    {``packed``: the grid's packed layout without region features (``gallery.packed_pairs``), ``regions`` int64
    [R]: the rows of ``first_stage["img"]``'s regions it reads, ``attn_masks`` / ``gather_index`` int64 [G², L]:
    the padded layout's for the batch's text and region widths}; the model gathers the rest on the device
    (``UniterForImageTextRetrieval.teacher_batch``). Returns ``batch``."""
    rows = batch["pair_rows"]
    groups = rows.numel()
    txt_lens, num_bbs = batch["txt_lens"][rows].numpy(), batch["num_bbs"][rows].numpy()
    texts = [batch["input_ids"][r, :t] for r, t in zip(rows.tolist(), txt_lens.tolist())]
    txt_of, img_of = np.repeat(np.arange(groups), groups), np.tile(np.arange(groups), groups)
    grid = packed_pairs([texts[i] for i in txt_of], num_bbs[img_of], batch["task"])
    attn_masks, gather_index = joint_layout(
        txt_lens[txt_of], num_bbs[img_of], batch["input_ids"].size(1), batch["img_feat"].size(1)
    )
    first_row = np.cumsum(num_bbs) - num_bbs  # the positives' regions in first_stage["img"], group by group
    batch["cross_pairs"] = {
        "packed": grid["packed"],
        "regions": torch.from_numpy(region_rows(first_row, num_bbs, img_of)),
        "attn_masks": attn_masks,
        "gather_index": gather_index,
    }
    return batch


def read_pairs(txt_db: TxtTokLmdb, img_db: DetectFeatLmdb) -> tuple[dict[str, str], dict[str, list[str]]]:
    """(txt2img, img2txts) of ``txt_db``'s usable texts (after its max_txt_len filter); ``DataError`` naming a text
    whose image is missing from ``img_db`` or that names several images, ``ValueError`` for an empty split."""
    txt2img_all = txt_db.txt2img
    txt2img: dict[str, str] = {}
    for id_ in txt_db.id2len:
        image = txt2img_all.get(id_)
        if not isinstance(image, str):
            raise DataError(f"txt_db {txt_db.path!r}: text {id_!r} has image {image!r} in txt2img.json (need one key)")
        if image not in img_db:
            raise DataError(f"txt_db {txt_db.path!r}: text {id_!r} names image {image!r}, which {img_db.path!r} lacks")
        txt2img[id_] = image
    if not txt2img:
        raise ValueError(f"txt_db {txt_db.path!r}: no texts (empty split, or all longer than max_txt_len)")
    img2txts: dict[str, list[str]] = {}
    for id_, image in txt2img.items():
        img2txts.setdefault(image, []).append(id_)
    return txt2img, img2txts


def _sample_other(rng: np.random.Generator, pool: list[str], exclude: set[str], count: int, what: str) -> list[str]:
    """``count`` distinct items of ``pool`` outside ``exclude`` (the original's sample-and-retry, drawn directly)."""
    allowed = [p for p in pool if p not in exclude]
    if len(allowed) < count:
        raise ValueError(f"need {count} negative {what}, but only {len(allowed)} are available")
    return [allowed[int(i)] for i in rng.choice(len(allowed), size=count, replace=False)]


class ItmPairsBase(TaskDataset):
    """Shared by the ITM datasets: texts, their images, in-memory image features (read once per image). ``lens`` are
    all 1: training batches count texts (``train_batch_size``, as the original ``train_itm.py``), each bringing its
    group of pairs."""

    task = "itm"

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, seed: int = 0) -> None:
        self.txt2img, self.img2txts = read_pairs(txt_db, img_db)
        ids = list(self.txt2img)
        self.img_db, self.images = img_db, list(self.img2txts)
        super().__init__(txt_db, ids, np.ones(len(ids), dtype=np.int64), seed)  # batches count texts
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._texts: dict[str, torch.Tensor] = {}

    def text(self, id_: str) -> torch.Tensor:
        """[CLS] caption [SEP] int64 [t] of text ``id_``."""
        if id_ not in self._texts:
            self._texts[id_] = self.txt_db.combine_inputs(self.txt_db[id_]["input_ids"])
        return self._texts[id_]

    def image(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(img_feat [n, 2048], img_pos_feat [n, 7]) float32 of image ``name`` (cached)."""
        if name not in self._features:
            self._features[name] = image_inputs(self.img_db, name, f"txt_db {self.txt_db.path!r}")
        return self._features[name]

    def pair(self, txt_id: str, image: str) -> dict[str, Any]:
        """One joint row (text ``txt_id`` with image ``image``)."""
        return row(self.text(txt_id), *self.image(image))


class ItmNegativesBase(ItmPairsBase):
    """Training groups around one text: ``negative_size`` other images and texts drawn per item (0: the positive
    pair alone, for ``train_first_stage_only``, whose step reads no negatives)."""

    def __init__(
        self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb, negative_size: int, seed: int = 0, cross_pairs: bool = False
    ) -> None:
        if negative_size < 0:
            raise ValueError(f"negative_size must be >= 0, got {negative_size}")
        super().__init__(txt_db, img_db, seed)
        self.negative_size, self.cross_pairs = negative_size, cross_pairs

    def with_first_stage(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``batch`` with the first stage's layouts (:func:`add_first_stage`) and, with ``cross_pairs``
        (``first_stage_loss`` "distill"), the teacher grid (:func:`add_cross_pairs`)."""
        batch = add_first_stage(batch)
        return add_cross_pairs(batch) if self.cross_pairs else batch

    def negatives(self, index: int) -> tuple[str, str, list[str], list[str]]:
        """Text ``index``, its image, ``negative_size`` other images and as many texts of other images (seeded by
        ``index`` and the epoch)."""
        rng, id_ = self.rng(index), self.ids[index]
        image = self.txt2img[id_]
        neg_images = _sample_other(rng, self.images, {image}, self.negative_size, "images")
        neg_texts = _sample_other(rng, self.ids, set(self.img2txts[image]), self.negative_size, "texts")
        return id_, image, neg_images, neg_texts


class ItmRankDataset(ItmNegativesBase):
    """Training groups of ``itm``: (text, its image), (text, negative image) x n, (negative text, its image) x n."""

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_, image, neg_images, neg_texts = self.negatives(index)
        pairs = [(id_, image)] + [(id_, i) for i in neg_images] + [(t, image) for t in neg_texts]
        return {"rows": [self.pair(t, i) for t, i in pairs], "positive_image": self.images.index(image)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Joint layout of every group's pairs (group by group), ``sample_size``, and for the first stage
        ``pair_rows`` (each group's positive) / ``pair_images`` (its image's index) and ``first_stage``
        (:func:`add_first_stage`)."""
        size = len(items[0]["rows"])
        batch = collate_rows([r for it in items for r in it["rows"]], self.task)
        batch["sample_size"] = size
        batch["pair_rows"] = torch.arange(len(items), dtype=torch.long) * size
        batch["pair_images"] = torch.tensor([it["positive_image"] for it in items], dtype=torch.long)
        return self.with_first_stage(batch)


class ItmHardNegDataset(ItmNegativesBase):
    """Training groups of ``itm-hn``: per text, (text, its image) + (text, candidate image) x n
    (``ItmRankDatasetHardNegFromText``), and (its image, text) + (candidate text, image) x n
    (``...FromImage``, the image's texts excluded); the model keeps the hardest candidates."""

    task = "itm-hn"

    def __getitem__(self, index: int) -> dict[str, Any]:
        id_, image, neg_images, neg_texts = self.negatives(index)
        from_text = [(id_, image)] + [(id_, i) for i in neg_images]
        from_image = [(id_, image)] + [(t, image) for t in neg_texts]
        rows = [self.pair(t, i) for t, i in from_text + from_image]
        return {"rows": rows, "positive_image": self.images.index(image)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Joint layout of the groups (text side, image side, per item), ``sample_size`` = 1 + n, ``sides`` = 2, and
        the first stage's ``pair_rows`` (the text-side positives) / ``pair_images`` / ``first_stage``."""
        size = len(items[0]["rows"]) // 2
        batch = collate_rows([r for it in items for r in it["rows"]], self.task)
        batch["sample_size"], batch["sides"] = size, 2
        batch["pair_rows"] = torch.arange(len(items), dtype=torch.long) * 2 * size
        batch["pair_images"] = torch.tensor([it["positive_image"] for it in items], dtype=torch.long)
        return self.with_first_stage(batch)


def images_batch(images: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The first stage's image batch of ``images`` [(img_feat float32 [n_i, 2048], img_pos_feat float32 [n_i, 7])]:
    ``img_feat`` [B, Nb, 2048], ``img_pos_feat`` [B, Nb, 7] (zero-padded) and ``num_bbs`` int64 [B]."""
    return {
        "img_feat": nn.utils.rnn.pad_sequence([f for f, _ in images], batch_first=True),
        "img_pos_feat": nn.utils.rnn.pad_sequence([p for _, p in images], batch_first=True),
        "num_bbs": torch.tensor([f.size(0) for f, _ in images], dtype=torch.long),
    }


class ItmEvalDataset(ItmPairsBase):
    """Every text and every image of a split (``all_img_ids`` = the images that have texts, as the original's
    ``img2txts`` keys), for the score matrix of ``uniter_fast.tasks.itm_eval``; items are texts."""

    def __init__(self, txt_db: TxtTokLmdb, img_db: DetectFeatLmdb) -> None:
        super().__init__(txt_db, img_db)
        self.all_img_ids = self.images
        self.num_bbs = np.array([img_db.name2nbb[i] for i in self.all_img_ids], dtype=np.int64)
        self.txt_lens = np.array([txt_db.id2len[i] + 2 for i in self.ids], dtype=np.int64)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"id": self.ids[index]}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Not available: the split is scored by ``uniter_fast.tasks.itm_eval`` (``TypeError``)."""
        raise TypeError("ItmEvalDataset is scored by uniter_fast.tasks.itm_eval, not batched by items")

    def pairs_batch(self, txt_index: np.ndarray, img_index: np.ndarray) -> dict[str, Any]:
        """Joint batch of the pairs (texts[txt_index[p]], images[img_index[p]]), both layouts (the task collate)."""
        rows = [self.pair(self.ids[t], self.all_img_ids[i]) for t, i in zip(txt_index.tolist(), img_index.tolist())]
        return collate_rows(rows, self.task)

    def pair_text(self, txt_index: int) -> torch.Tensor:
        """[CLS] caption [SEP] int64 [t] of text ``txt_index`` (a gallery pair's text, ``itm_eval.score_pairs``)."""
        return self.text(self.ids[txt_index])

    def gallery_images(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(img_feat [n, 2048], img_pos_feat [n, 7]) float32 of every image, in ``all_img_ids`` order."""
        return [self.image(name) for name in self.all_img_ids]

    def texts_batch(self, txt_index: np.ndarray) -> dict[str, torch.Tensor]:
        """``input_ids`` int64 [B, Lt] (pad 0) and ``txt_lens`` [B] of the texts ``txt_index``."""
        texts = [self.text(self.ids[t]) for t in txt_index.tolist()]
        lens = torch.tensor([len(t) for t in texts], dtype=torch.long)
        return {"input_ids": nn.utils.rnn.pad_sequence(texts, batch_first=True), "txt_lens": lens}

    def images_batch(self, img_index: np.ndarray) -> dict[str, torch.Tensor]:
        """``img_feat`` [B, Nb, 2048], ``img_pos_feat`` [B, Nb, 7] (zero-padded) and ``num_bbs`` [B]."""
        return images_batch([self.image(self.all_img_ids[i]) for i in img_index.tolist()])


# ---------------------------------------------------------------------- task
class ItmTask(Task):
    """Image-text retrieval with random negatives (``train_itm.py``)."""

    adversarial = True
    name = "itm"
    heads = ("itm_output", "rank_output", "txt_proj", "img_proj", "first_stage_uniter")
    finetuned_heads = ("rank_output",)  # a pretrained checkpoint has itm_output too
    evaluates_pretrained = True  # zero-shot: rank_output from the pretrained itm_output
    checkpoint_options = ("first_stage_dim",)  # negatives, margin and evaluation settings stay the caller's
    options = {
        "margin": 0.2,
        "negative_size": 1,
        "hard_neg_size": 0,
        "first_stage_dim": 64,
        "first_stage_weight": 1.0,
        "temperature": 0.05,
        "first_stage_loss": "contrastive",
        "distill_temperature": 1.0,
        "first_stage_tower": False,
        "train_first_stage_only": False,
        "eval_mode": "exact",
        "top_k": 16,
    }
    by_examples = True
    sums = ()
    headline = "r_mean"

    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        out = super().check_options(options, where)
        if out["eval_mode"] not in EVAL_MODES:
            raise ValueError(f"{where}: eval_mode must be one of {EVAL_MODES}, got {out['eval_mode']!r}")
        for key in ("negative_size", "top_k"):
            if not isinstance(out[key], int) or out[key] < 1:
                raise ValueError(f"{where}: {key} must be an int >= 1, got {out[key]!r}")
        if out["first_stage_loss"] not in FIRST_STAGE_LOSSES:
            raise ValueError(
                f"{where}: first_stage_loss must be one of {FIRST_STAGE_LOSSES}, got {out['first_stage_loss']!r}"
            )
        for key in ("temperature", "distill_temperature"):
            if not isinstance(out[key], (int, float)) or not out[key] > 0:
                raise ValueError(f"{where}: {key} must be a number > 0, got {out[key]!r}")
        if out["hard_neg_size"] > out["negative_size"]:
            raise ValueError(
                f"{where}: hard_neg_size={out['hard_neg_size']} exceeds negative_size={out['negative_size']}"
            )
        for key in ("first_stage_tower", "train_first_stage_only"):
            if not isinstance(out[key], bool):
                raise ValueError(f"{where}: {key} must be true or false, got {out[key]!r}")
        if out["train_first_stage_only"]:
            needs = {"first_stage_tower": True, "hard_neg_size": 0}
            wrong = {k: out[k] for k, v in needs.items() if out[k] != v}
            if wrong or not out["first_stage_dim"] or not out["first_stage_weight"] > 0:
                raise ValueError(
                    f"{where}: train_first_stage_only trains the first stage's own tower alone: it needs "
                    f"first_stage_tower true, hard_neg_size 0, first_stage_dim > 0 and first_stage_weight > 0, got "
                    f"first_stage_tower={out['first_stage_tower']}, hard_neg_size={out['hard_neg_size']}, "
                    f"first_stage_dim={out['first_stage_dim']}, first_stage_weight={out['first_stage_weight']}"
                )
        return out

    def options_from_state(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The first stage's size (0: none), and ``first_stage_tower`` when the weights hold a tower (a checkpoint
        without one does not fix it: a tower asked for is copied from its encoder, :meth:`complete_state`)."""
        proj = state.get("txt_proj.weight")
        out: dict[str, Any] = {"first_stage_dim": int(proj.shape[0]) if proj is not None else 0}
        if has_tower(state):
            out["first_stage_tower"] = True
        return out

    def checkpoint_required(self, options: dict[str, Any]) -> Optional[str]:
        """A run that trains the first stage alone distils the checkpoint's cross-encoder: it needs one."""
        if not options.get("train_first_stage_only"):
            return None
        return (
            "train_first_stage_only distils a trained cross-encoder into the first stage's tower, so it needs a "
            "checkpoint (an itm export; 'auto' with checkpoint_from 'itm': output/finetune-itm-tiny/finetuned, the "
            "default itm run's)"
        )

    def complete_state(
        self, state: dict[str, torch.Tensor], options: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A fine-tuned checkpoint without a first-stage tower, loaded with ``first_stage_tower`` true: the tower's
        keys are a copy of its encoder's (``uniter.*`` -> ``first_stage_uniter.*``), e.g. to distil a tower from a
        trained cross-encoder (``train_first_stage_only``)."""
        if not options["first_stage_tower"] or has_tower(state):
            return state, {}
        tower = {TOWER_PREFIX + k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        return {**state, **tower}, {"first_stage_uniter": "a copy of the checkpoint's encoder"}

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        return UniterForImageTextRetrieval(
            config,
            options["margin"],
            options["hard_neg_size"],
            options["first_stage_dim"],
            options["first_stage_weight"],
            options["temperature"],
            fast,
            options["first_stage_loss"],
            options["distill_temperature"],
            options["first_stage_tower"],
            options["train_first_stage_only"],
        )

    def init_from_pretrained(self, model: UniterPreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, str]:
        """Take the pretrained ``itm_output`` (when the checkpoint has it) and copy its row 1 into ``rank_output``; the
        first stage (a pretrained checkpoint has none) keeps its fresh init and is marked untrained."""
        derived = {}
        if "itm_output.weight" in state:
            with torch.no_grad():
                model.itm_output.weight.copy_(state["itm_output.weight"])
                model.itm_output.bias.copy_(state["itm_output.bias"])
            derived["itm_output"] = "the checkpoint's itm_output"
        model.init_output()
        origin = "the checkpoint's" if derived else "the freshly initialised"
        derived["rank_output"] = f"row 1 (match) of {origin} itm_output (init_output)"
        if hasattr(model, "first_stage_uniter"):
            model.copy_encoder_to_tower()
            derived["first_stage_uniter"] = "a copy of the checkpoint's encoder"
        model.mark_first_stage_fresh()
        return derived

    def train_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int
    ) -> TaskDataset | list[TaskDataset]:
        """Random negatives; none when ``train_first_stage_only`` (its teacher never reads them)."""
        txt_db = dbs.txt(TxtTokLmdb, txt_path, True)
        distill = "distill" in first_stage_terms(options["first_stage_loss"])
        # the frozen cross-encoder's step reads each group's positive pair and the cross pairs, never the negatives
        negatives = 0 if options["train_first_stage_only"] else options["negative_size"]
        return ItmRankDataset(txt_db, dbs.img(img_path), negatives, seed, distill)

    def eval_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], split: str, seed: int = 0
    ) -> Any:
        return ItmEvalDataset(dbs.txt(TxtTokLmdb, txt_path, False), dbs.img(img_path))

    def evaluate_split(
        self,
        model: Any,
        dataset: TaskDataset,
        batch_size: int,
        options: dict[str, Any],
        rank: int,
        world: int,
        to_device: Any,
        desc: str = "eval",
    ) -> tuple[dict[str, float], list[Any]]:
        """(recall metrics, [score matrix record]) of the split: every pair (``exact``) or the re-ranked first-stage
        candidates (``fast``); see ``uniter_fast.tasks.itm_eval``."""
        from uniter_fast.tasks.itm_eval import evaluate_retrieval

        result = evaluate_retrieval(model, dataset, batch_size, options["eval_mode"], options["top_k"], to_device, desc)
        return result.metrics, [result]

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        """``{stem}_<mode>.pt`` (score matrix [texts, images] + ids) and ``{stem}_<mode>.json`` (recall table), named
        by the evaluation mode (``exact``, ``fast_k<k>``) and each recording ``meta``, the mode and k."""
        return predictions[0].save(os.path.join(directory, stem), meta)

    # ------------------------------------------------------------------ new images
    def query_dataset(
        self,
        queries: list[Query],
        toker: WordPiece,
        features: dict[str, dict[str, np.ndarray]],
        box_settings: tuple[float, int, int, int],
        options: dict[str, Any],
    ) -> TaskDataset:
        """Each caption with its image as a caption record (``caption_record``, as ``python -m uniter_fast.build``
        writes captions), read by ``ItmEvalDataset``."""
        img_db = memory_img_db(features, box_settings)
        records = []
        for q in queries:
            where = f"query {q.id!r}"
            raw = {"id": q.id, "image": q.images[0], "caption": q.text}
            id_, ids, image, fields = caption_record(raw, toker, where)
            check_image(image, set(img_db.name2nbb), "detected-box", where)
            records.append((where, id_, ids, image, fields))
        txt_db = TxtTokLmdb.from_writer(*memory_txt_writer(toker.meta(QUERY_VOCAB_NAME), records))
        return ItmEvalDataset(txt_db, img_db)

    def query_batch(self, dataset: TaskDataset) -> dict[str, Any]:
        """The pairs (each text, its image) of an ``ItmEvalDataset``, texts in order."""
        images = [dataset.all_img_ids.index(dataset.txt2img[i]) for i in dataset.ids]
        return dataset.pairs_batch(np.arange(len(dataset.ids)), np.array(images, dtype=np.int64))

    def query_results(
        self, scores: torch.Tensor, batch: dict[str, Any], options: dict[str, Any], top_k: int
    ) -> list[dict[str, Any]]:
        """The match score of each (caption, image) pair: the cross-encoder's logit and its sigmoid."""
        return [{"score": float(torch.sigmoid(s)), "logit": float(s)} for s in scores]

    def check_adversarial(self, options: dict[str, Any], where: str) -> None:
        """Adversarial fine-tuning perturbs the rows of the batch it is given; hard negatives are chosen inside the
        forward from those rows (by perturbed scores), so clean and perturbed scores would compare different
        candidates: refused with ``hard_neg_size`` > 0."""
        if options.get("train_first_stage_only"):
            raise ConfigError(
                f"{where}: 'adversarial' perturbs the cross-encoder's inputs, which train_first_stage_only does not "
                "train: remove one of them"
            )
        if options.get("hard_neg_size", 0) > 0:
            raise ConfigError(
                f"{where}: 'adversarial' needs hard_neg_size 0 (random negatives), got {options['hard_neg_size']}"
            )


class ItmHardNegTask(ItmTask):
    """Image-text retrieval with hard negatives (``train_itm_hard_negatives.py``)."""

    name = "itm-hn"
    options = {**ItmTask.options, "negative_size": 31, "hard_neg_size": 7}

    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        out = super().check_options(options, where)
        if out["hard_neg_size"] < 1:
            raise ValueError(f"{where}: itm-hn needs hard_neg_size >= 1, got {out['hard_neg_size']!r}")
        return out

    def train_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int
    ) -> TaskDataset | list[TaskDataset]:
        """``negative_size`` candidates per example, of which the model picks ``hard_neg_size`` hard ones."""
        txt_db = dbs.txt(TxtTokLmdb, txt_path, True)
        distill = "distill" in first_stage_terms(options["first_stage_loss"])
        return ItmHardNegDataset(txt_db, dbs.img(img_path), options["negative_size"], seed, distill)
