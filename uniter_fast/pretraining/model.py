"""``UniterForPretraining``: the UNITER encoder plus the MLM, MRFR, MRC(-kl) and ITM(+WRA) heads of the original
``model/pretrain.py``.

Every head runs on the rows its task needs (masked tokens, masked regions, [CLS]) and hands them to the loss
functions of ``uniter_fast.losses`` (final projection + loss, ``backend`` switch) and to ``uniter_fast.ot`` (IPOT).
``fast=False`` is the reference path: the padded encoder forward and the ``"reference"`` backends. ``fast=True``
runs the packed encoder (``Model.forward_packed``) on ``batch["packed"]`` and the ``"auto"`` backends, and reads
nothing but what the collate computed on the host: it synchronises with the GPU only where the maths needs a value
on the host (docs/pretraining.md, "Host syncs"). Its value checks (labels in range, ``cu_seqlens`` consistent) are
off by default, the collates having checked the data on the host; ``check_values=True`` turns them on.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast.config import IMG_LABEL_DIM, UniterConfig
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.pretraining.heads import BertOnlyMLMHead, RegionClassification, RegionFeatureRegression
from uniter_fast.training.budget import ModelSize, model_size

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
WITHOUT_LOGITS = ("mrfr",)
"""The objectives whose head is a regression: no softmax, so no KL in adversarial training (``has_logits``)."""


def task_kind(task: str) -> str:
    """The objective of a task name: ``"mlm_coco"`` -> ``"mlm"``; one of :data:`TASKS`, else ``ValueError``."""
    if not isinstance(task, str):
        raise TypeError(f"task must be a str such as 'mlm' or 'itm_coco', got {type(task).__name__}")
    kind = task.split("_", 1)[0]
    if kind not in TASKS:
        raise ValueError(f"unknown task {task!r}: its prefix must be one of {list(TASKS)}")
    return kind


def _require(batch: dict, keys: tuple[str, ...], task: str, packed_keys: tuple[str, ...] = ()) -> None:
    """Raise unless ``batch`` has ``keys`` and ``batch["packed"]`` has ``packed_keys``."""
    missing = [k for k in keys if k not in batch]
    packed = batch.get("packed", {})
    missing += [f"packed.{k}" for k in packed_keys if k not in packed]
    if missing:
        raise ValueError(f"batch for task {task!r} lacks the keys {missing}")


OT_DEFAULTS = {"beta": 0.5, "iteration": 50, "k": 1}
"""The IPOT settings of WRA (the original's ``ot_pos_reg``-free defaults): step ``beta``, ``iteration``s, inner
steps ``k``."""


class UniterForPretraining(UniterPreTrainedModel):
    """UNITER with its pretraining heads; ``state_dict`` keys are the original ones (``uniter.*``, ``cls.*``,
    ``feat_regress.*``, ``region_classifier.*``, ``itm_output.*``; the tied tensors appear under both names)."""

    captures = True

    def __init__(
        self,
        config: UniterConfig,
        img_label_dim: int = IMG_LABEL_DIM,
        fast: bool = False,
        itm_ot_lambda: float = 0.1,
        ot_settings: Optional[dict[str, Any]] = None,
        check_values: Optional[bool] = None,
    ) -> None:
        super().__init__(config, fast, check_values)
        self.cls = BertOnlyMLMHead(config, self.uniter.embeddings.word_embeddings.weight)
        self.feat_regress = RegionFeatureRegression(config, self.uniter.img_embeddings.img_linear.weight)
        self.region_classifier = RegionClassification(config, img_label_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.init_head_weights(self.cls, self.feat_regress, self.region_classifier, self.itm_output)
        self.itm_ot_lambda = itm_ot_lambda
        self.ot_settings = {**OT_DEFAULTS, **(ot_settings or {})}

    # ------------------------------------------------------------------ weights
    def tie_weights(self) -> None:
        """Make the MLM decoder and the MRFR output share the encoder's Parameters again (after a load that replaced
        them, e.g. ``load_state_dict(assign=True)`` or a ZeRO-3 re-partition)."""
        self.cls.predictions.decoder.weight = self.uniter.embeddings.word_embeddings.weight
        self.feat_regress.weight = self.uniter.img_embeddings.img_linear.weight

    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """The encoder's pairs plus the head parameters that :meth:`forward` reads itself, to hand them to the loss
        functions or to project outside the heads' forwards: the MLM decoder weight (the word embeddings) and bias,
        the MRFR weight (``img_linear.weight``) and bias, and the region classifier's output Linear."""
        predictions, regress, output = self.cls.predictions, self.feat_regress, self.region_classifier.output
        used = (predictions.decoder.weight, predictions.bias, regress.weight, regress.bias, output.weight, output.bias)
        return super().external_parameters() + [(self, param) for param in used]

    @property
    def backend(self) -> str:
        """The loss / OT backend this mode uses: ``"auto"`` when fast, else ``"reference"``."""
        return "auto" if self.fast else "reference"

    # ------------------------------------------------------------------ readouts (encoder choice: base class)
    def _masked_text_rows(self, batch: dict, sequence_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MLM rows [M, H] and labels [M] (masked text tokens, row-major)."""
        if sequence_output.dim() == 2:
            packed = batch["packed"]
            return sequence_output[packed["mlm_index"]], packed["mlm_labels"]
        labels = batch["txt_labels"]
        mask = labels != -1
        return sequence_output[:, : labels.size(1)][mask], labels[mask]

    def _masked_region_rows(self, batch: dict, sequence_output: torch.Tensor) -> torch.Tensor:
        """MRM rows [M, H] in the order of ``feat_targets`` / ``label_targets``."""
        if sequence_output.dim() == 2:
            return sequence_output[batch["packed"]["mrm_index"]]
        return sequence_output[batch["img_mask_tgt"]]

    def _encode_regions(self, batch: dict, task: str, target_key: str) -> torch.Tensor:
        """MRM rows [M, H] of the masked regions (packed or padded path)."""
        if self._uses_packed(batch):
            _require(batch, (target_key,), task, ("img_masks", "mrm_index"))
            return self._masked_region_rows(batch, self._encode(batch, None))
        _require(batch, ("img_masks", "img_mask_tgt", target_key), task)
        return self._masked_region_rows(batch, self._encode(batch, batch["img_masks"]))

    def _ot_embeddings(self, batch: dict, sequence_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text [B, Lt, H] and image [B, Nb, H] parts of the output, zero at pads (text includes [CLS]/[SEP]).

        Packed: each valid row goes to its padded slot (``txt_slot`` / ``img_slot``, computed by the collate).
        Padded: the original scatter by ``ot_scatter`` into zeros of length Lt + L (>= its largest index + 1, known
        from the shapes: no ``scatter_max`` to read); the kept columns are the same.
        """
        ot = batch["ot_inputs"]
        batch_size, txt_len = ot["txt_pad"].shape
        img_len = ot["img_pad"].size(1)
        hidden = sequence_output.size(-1)
        if sequence_output.dim() == 2:
            packed = batch["packed"]
            txt_rows = sequence_output.index_select(0, packed["txt_index"])
            img_rows = sequence_output.index_select(0, packed["img_index"])
            # one spare row past the grid: a fixed-shape batch's padding tokens are copied there and dropped
            txt_emb = sequence_output.new_zeros(batch_size * txt_len + 1, hidden).index_copy(
                0, packed["txt_slot"], txt_rows
            )
            img_emb = sequence_output.new_zeros(batch_size * img_len + 1, hidden).index_copy(
                0, packed["img_slot"], img_rows
            )
            txt_emb, img_emb = txt_emb[:-1], img_emb[:-1]
            return txt_emb.view(batch_size, txt_len, hidden), img_emb.view(batch_size, img_len, hidden)
        index = ot["ot_scatter"].unsqueeze(-1).expand_as(sequence_output)
        ctx = sequence_output.new_zeros(batch_size, txt_len + sequence_output.size(1), hidden)
        ctx = ctx.scatter(1, index, sequence_output)
        return ctx[:, :txt_len], ctx[:, txt_len : txt_len + img_len]

    def _row_weights(self, batch: dict, key: str) -> Optional[torch.Tensor]:
        """The masked rows' weights ``packed[key]`` of a fixed-shape batch (``uniter_fast.data.buckets``), else None."""
        return batch["packed"].get(key) if self._uses_packed(batch) else None

    def has_logits(self, task: str) -> bool:
        """False for MRFR (a regression: ``with_logits`` gives None), True for the other objectives."""
        return task_kind(task) not in WITHOUT_LOGITS

    def objective(self, task: str) -> str:
        """The objective of ``task`` (:func:`task_kind`): ``"mlm_coco"`` -> ``"mlm"``."""
        return task_kind(task)

    # ------------------------------------------------------------------ forward
    def forward(
        self, batch: dict, task: str, compute_loss: bool = True, with_logits: bool = False
    ) -> dict[str, Optional[torch.Tensor]]:
        """Run the encoder and the head of ``task`` on a collated batch (the padded keys of the data package, plus
        ``batch["packed"]`` for the fast path).

        Returns with ``compute_loss``: ``{"loss": 0-dim, ...}`` (the loss to back-propagate; ITM also gives
        ``itm_loss`` and ``ot_loss``). Without: the head outputs for validation, ``mlm``: ``scores`` [M, V] +
        ``labels`` [M]; ``mrfr``: ``prediction`` [M, 2048] + ``targets``; ``mrc``/``mrckl``: ``scores`` [M, 1601] +
        ``soft_labels``; ``itm``: ``scores`` [B, 2] + ``targets`` [B] (+ ``ot_dist`` [B] when λ > 0).

        ``with_logits`` (with the loss) adds ``logits``, what adversarial pretraining's KL compares
        (``uniter_fast.training.adversarial``): ``mlm`` the vocabulary scores of the masked tokens [M, V]; ``mrc`` /
        ``mrckl`` the region-class scores of the masked regions [M, 1601]; ``itm`` the 2-way scores [B, 2] (not the
        WRA term); ``mrfr`` None (a regression: no softmax).
        """
        kind = task_kind(task)
        if kind == "mlm":
            out = self.forward_mlm(batch, compute_loss, with_logits)
        elif kind == "mrfr":
            out = self.forward_mrfr(batch, compute_loss)
        elif kind in ("mrc", "mrckl"):
            out = self.forward_mrc(batch, kind, compute_loss, with_logits)
        else:
            out = self.forward_itm(batch, compute_loss, with_logits)
        if with_logits and kind == "mrfr":
            out["logits"] = None
        return out

    def forward_mlm(self, batch: dict, compute_loss: bool = True, with_logits: bool = False) -> dict[str, torch.Tensor]:
        """Masked language modelling: CE over the vocabulary, mean over masked tokens."""
        from uniter_fast import losses

        if self._uses_packed(batch):
            _require(batch, (), "mlm", ("mlm_index", "mlm_labels"))
        else:
            _require(batch, ("txt_labels",), "mlm")
        rows, labels = self._masked_text_rows(batch, self._encode(batch, None))
        predictions = self.cls.predictions
        hidden = predictions.transform(rows)
        if not compute_loss:
            return {"scores": predictions.decoder(hidden) + predictions.bias, "labels": labels}
        loss = losses.mlm_loss(
            hidden,
            predictions.decoder.weight,
            predictions.bias,
            labels,
            backend=self.backend,
            check_values=self.check_values,
            weights=self._row_weights(batch, "mlm_weights"),
        )
        if with_logits:  # the fused loss never holds the [M, V] scores: projected again for the KL
            return {"loss": loss, "logits": predictions.decoder(hidden) + predictions.bias}
        return {"loss": loss}

    def forward_mrfr(self, batch: dict, compute_loss: bool = True) -> dict[str, torch.Tensor]:
        """Masked region feature regression: MSE against the unmasked features, mean over M x 2048."""
        from uniter_fast import losses

        rows = self._encode_regions(batch, "mrfr", "feat_targets")
        head = self.feat_regress
        hidden = head.net(rows)
        targets = batch["feat_targets"]
        if not compute_loss:
            return {"prediction": F.linear(hidden, head.weight.t(), head.bias), "targets": targets}
        weights = self._row_weights(batch, "mrm_weights")
        loss = losses.mrfr_loss(hidden, head.weight, head.bias, targets, backend=self.backend, weights=weights)
        return {"loss": loss}

    def forward_mrc(
        self, batch: dict, kind: str, compute_loss: bool = True, with_logits: bool = False
    ) -> dict[str, torch.Tensor]:
        """Masked region classification: hard-label CE (``mrc``) or KL(soft || pred) (``mrckl``)."""
        from uniter_fast import losses

        rows = self._encode_regions(batch, kind, "label_targets")
        head = self.region_classifier
        hidden = head.transform(rows)
        soft_labels = batch["label_targets"]
        if not compute_loss:
            return {"scores": head.output(hidden), "soft_labels": soft_labels}
        loss_fn = losses.mrc_kl_loss if kind == "mrckl" else losses.mrc_loss
        weights = self._row_weights(batch, "mrm_weights")
        loss = loss_fn(hidden, head.output.weight, head.output.bias, soft_labels, backend=self.backend, weights=weights)
        return {"loss": loss, "logits": head.output(hidden)} if with_logits else {"loss": loss}

    def forward_itm(self, batch: dict, compute_loss: bool = True, with_logits: bool = False) -> dict[str, torch.Tensor]:
        """Image-text matching: 2-way CE on the pooled output, plus ``itm_ot_lambda`` x the WRA (OT) loss."""
        from uniter_fast import losses

        _require(batch, ("targets",), "itm")
        sequence_output = self._encode(batch, None)
        scores = self.itm_output(self._pooled(batch, sequence_output))
        targets = batch["targets"]
        out: dict[str, torch.Tensor] = {}
        if self.itm_ot_lambda > 0:
            _require(batch, ("ot_inputs",), "itm", ("txt_slot", "img_slot") if sequence_output.dim() == 2 else ())
            out["ot_dist"] = self.ot_distance(batch, sequence_output)
        if not compute_loss:
            return {"scores": scores, "targets": targets, **out}
        weights = batch.get("example_weights")  # a fixed-shape batch's: 0 for its padding examples
        if weights is None:
            itm_loss = F.cross_entropy(scores.float(), targets)
        else:
            itm_loss = losses.weighted_mean(F.cross_entropy(scores.float(), targets, reduction="none"), weights)
        logits = {"logits": scores} if with_logits else {}
        if self.itm_ot_lambda <= 0:
            return {"loss": itm_loss, "itm_loss": itm_loss.detach(), **logits}
        ot_dist = out["ot_dist"] if weights is None else out["ot_dist"] * weights
        if self.fast:  # no boolean indexing, which would read the targets on the host
            positive, negative = ot_dist.masked_fill(targets != 1, 0).sum(), ot_dist.masked_fill(targets != 0, 0).sum()
        else:  # the original's
            positive, negative = ot_dist[targets == 1].sum(), ot_dist[targets == 0].sum()
        ot_loss = (positive - negative) / (ot_dist.size(0) if weights is None else weights.sum())
        loss = itm_loss + self.itm_ot_lambda * ot_loss
        return {"loss": loss, "itm_loss": itm_loss.detach(), "ot_loss": ot_loss.detach(), **logits}

    def ot_distance(self, batch: dict, sequence_output: torch.Tensor) -> torch.Tensor:
        """The WRA distance per pair [B] (fp32), through ``uniter_fast.ot.optimal_transport_dist``: the embeddings
        in their own dtype (the OT maths is fp32 inside, as the original's), and the valid lengths
        ``ot_inputs["txt_lens"]``/``["img_lens"]`` when the collate provides them (then nothing is derived from the
        pads, which would cost device syncs)."""
        from uniter_fast.ot import optimal_transport_dist

        txt_emb, img_emb = self._ot_embeddings(batch, sequence_output)
        ot = batch["ot_inputs"]
        return optimal_transport_dist(
            txt_emb,
            img_emb,
            ot["txt_pad"],
            ot["img_pad"],
            **self.ot_settings,
            backend=self.backend,
            txt_lens=ot.get("txt_lens"),
            img_lens=ot.get("img_lens"),
        )


def pretraining_model_size(config: UniterConfig) -> ModelSize:
    """:func:`uniter_fast.training.budget.model_size` of ``UniterForPretraining(config)``, built on the meta device
    (no memory, no initialisation)."""
    with torch.device("meta"):
        return model_size(UniterForPretraining(config))
