"""``UniterModel``: the UNITER encoder with the original forward signature and parameter names."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch
from torch import nn

from uniter_fast import backends
from uniter_fast.checkpoint import checkpoint_config, load_state, read_checkpoint, save_pretrained
from uniter_fast.config import PathLike, UniterConfig
from uniter_fast.model.embeddings import UniterImageEmbeddings, UniterTextEmbeddings
from uniter_fast.model.encoder import BertPooler, UniterEncoder, set_encoder_layer_backend
from uniter_fast.model.inputs import check_forward_inputs
from uniter_fast.model.packed import packed_forward


def init_uniter_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """The original ``init_weights``: Linear/Embedding weights ~ N(0, 0.02), Linear biases 0, LayerNorm 1 and 0."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(mean=0.0, std=initializer_range)
    elif isinstance(module, nn.LayerNorm):
        module.bias.data.zero_()
        module.weight.data.fill_(1.0)
    if isinstance(module, nn.Linear) and module.bias is not None:
        module.bias.data.zero_()


def parameter_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first parameter, read through ``parameters()``: reading the parameter as an attribute
    (``module.weight``) outside ``module``'s forward counts, under DeepSpeed ZeRO-3, as a use that gathers it."""
    return next(module.parameters()).dtype


def additive_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 1/0 mask -> the original additive mask (1 - m) * -10000, shaped [B, 1, 1, L], in ``dtype``."""
    extended = attention_mask[:, None, None, :].to(dtype=dtype)
    return (1.0 - extended) * -10000.0


class UniterModel(nn.Module):
    """UNITER encoder: text embedder, image embedder, post-LN BERT encoder and pooler.

    A drop-in for the original ``model.model.UniterModel``: same submodule names (``state_dict`` keys as the
    original's, so ``load_state_dict(original_state_dict)`` works), same forward signature and outputs.
    :meth:`forward_packed` runs the same weights on the packed (unpadded) layout. The model keeps its own copy of
    ``config`` (backend switches and grown embedding tables change it, not the caller's).
    """

    def __init__(self, config: UniterConfig, img_dim: Optional[int] = None) -> None:
        super().__init__()
        config = dataclasses.replace(config, **({} if img_dim is None else {"img_dim": img_dim}))
        self.config = config
        self.embeddings = UniterTextEmbeddings(config)
        self.img_embeddings = UniterImageEmbeddings(config)
        self.encoder = UniterEncoder(config)
        self.pooler = BertPooler(config)
        self.check_values = True  # value checks (NaN features, gather_index range) synchronise with the GPU
        self.apply(lambda m: init_uniter_weights(m, config.initializer_range))

    @property
    def check_inputs(self) -> bool:
        """Renamed: the value-check flag is :attr:`check_values` (one name everywhere)."""
        raise AttributeError("Model.check_inputs was renamed Model.check_values")

    @check_inputs.setter
    def check_inputs(self, value: bool) -> None:
        raise AttributeError("Model.check_inputs was renamed Model.check_values")

    # ------------------------------------------------------------------ backend switch
    def set_attention_backend(self, backend: str) -> None:
        """Select the attention core of every layer of the padded forward (``config.attention_backend``): ``"auto"``,
        ``"reference"`` (the original math; alias ``"eager"``) or ``"sdpa"`` (docs/backends.md)."""
        backends.check_name("attention", backend, "attention_backend")
        self.config.attention_backend = backend
        for layer in self.encoder.layer:
            layer.attention.self.backend = backend

    # ------------------------------------------------------------------ DeepSpeed ZeRO-3
    def external_parameters(self) -> list[tuple[nn.Module, nn.Parameter]]:
        """(module, parameter) pairs where ``module``'s forward reads ``parameter`` outside its owning module's
        forward, which DeepSpeed ZeRO-3 must be told of (``uniter_fast.training.zero.register_external_parameters``):
        the region embedder zeroes row 0 of ``mask_embedding.weight`` before calling ``mask_embedding``."""
        return [(self.img_embeddings, self.img_embeddings.mask_embedding.weight)]

    # ------------------------------------------------------------------ embeddings
    def _compute_txt_embeddings(
        self,
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        txt_type_ids: Optional[torch.Tensor],
        txt_delta: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device)[None]
        return self.embeddings(input_ids, position_ids, txt_type_ids, txt_delta)

    def _compute_img_embeddings(
        self,
        img_feat: torch.Tensor,
        img_pos_feat: torch.Tensor,
        img_masks: Optional[torch.Tensor],
        img_type_ids: Optional[torch.Tensor],
        img_delta: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        if img_type_ids is None:
            img_type_ids = torch.ones(img_feat.shape[:-1], dtype=torch.long, device=img_feat.device)
        type_embeddings = self.embeddings.token_type_embeddings(img_type_ids)
        if img_delta is not None:  # on the raw region features, before img_linear
            img_feat = img_feat.float() + img_delta.float()
        dtype = parameter_dtype(self.img_embeddings.img_linear)
        return self.img_embeddings(img_feat.to(dtype), img_pos_feat.to(dtype), type_embeddings, img_masks)

    def embed(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        img_feat: Optional[torch.Tensor],
        img_pos_feat: Optional[torch.Tensor],
        gather_index: Optional[torch.Tensor],
        img_masks: Optional[torch.Tensor] = None,
        txt_type_ids: Optional[torch.Tensor] = None,
        img_type_ids: Optional[torch.Tensor] = None,
        txt_delta: Optional[torch.Tensor] = None,
        img_delta: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """The joint input sequence [B, L, H]: text, then each row's regions right after its own text.
        ``txt_delta`` [B, Lt, H] / ``img_delta`` [B, Nb, 2048]: optional perturbations of the word embeddings and of
        the raw region features (VILLA's adversarial training, ``uniter_fast.training.adversarial``)."""
        if input_ids is None:
            return self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids, img_delta)
        txt_emb = self._compute_txt_embeddings(input_ids, position_ids, txt_type_ids, txt_delta)
        if img_feat is None:
            return txt_emb
        img_emb = self._compute_img_embeddings(img_feat, img_pos_feat, img_masks, img_type_ids, img_delta)
        index = gather_index.unsqueeze(-1).expand(-1, -1, self.config.hidden_size)
        return torch.gather(torch.cat([txt_emb, img_emb], dim=1), dim=1, index=index)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Optional[torch.Tensor],
        position_ids: Optional[torch.Tensor],
        img_feat: Optional[torch.Tensor],
        img_pos_feat: Optional[torch.Tensor],
        attention_mask: torch.Tensor,
        gather_index: Optional[torch.Tensor] = None,
        img_masks: Optional[torch.Tensor] = None,
        output_all_encoded_layers: bool = True,
        txt_type_ids: Optional[torch.Tensor] = None,
        img_type_ids: Optional[torch.Tensor] = None,
        txt_delta: Optional[torch.Tensor] = None,
        img_delta: Optional[torch.Tensor] = None,
    ) -> Union[list[torch.Tensor], torch.Tensor]:
        """The original forward.

        Args:
            input_ids: [B, Lt] int64 WordPiece ids ([CLS] ... [SEP], padded with 0), or None for image-only.
            position_ids: [1 or B, Lt] int64 (None: arange).
            img_feat: [B, Nb, 2048] float region features (zero-padded), or None for text-only.
            img_pos_feat: [B, Nb, 7] float boxes [x1, y1, x2, y2, w, h, w*h].
            attention_mask: [B, L] 1 for the first t_i + n_i positions of row i, else 0.
            gather_index: [B, L] int64 joint-order index into cat(text, regions) (see ``uniter_fast.layout``).
            img_masks: [B, Nb] bool, regions masked for MRM (their features already zeroed by the collate).
            output_all_encoded_layers: return every layer's output (list) or only the last one (tensor).
            txt_type_ids / img_type_ids: [B, Lt] / [B, Nb] int64 type ids (defaults 0 / 1).
            txt_delta / img_delta: [B, Lt, H] / [B, Nb, 2048] float perturbations added to the word embeddings after
                the lookup and to the raw region features (adversarial training; default none).

        Returns:
            list of [B, L, H] tensors (one per layer), or the last one when ``output_all_encoded_layers`` is False.
        """
        check_forward_inputs(
            input_ids,
            position_ids,
            img_feat,
            img_pos_feat,
            attention_mask,
            gather_index,
            img_masks,
            self.config.img_dim,
            self.check_values,
        )
        dtype = parameter_dtype(self.embeddings.word_embeddings)
        additive_mask = additive_attention_mask(attention_mask, dtype)
        embedding_output = self.embed(
            input_ids,
            position_ids,
            img_feat,
            img_pos_feat,
            gather_index,
            img_masks,
            txt_type_ids,
            img_type_ids,
            txt_delta,
            img_delta,
        )
        encoded_layers = self.encoder(embedding_output, additive_mask, output_all_encoded_layers)
        if not output_all_encoded_layers:
            return encoded_layers[-1]
        return encoded_layers

    # ------------------------------------------------------------------ packed (unpadded) path
    def set_packed_attention_backend(self, backend: str) -> None:
        """Attention backend of :meth:`forward_packed` (``config.packed_attention_backend``): ``"auto"`` (default:
        chosen per device, dtype and dropout, and logged), ``"reference"`` (alias ``"eager"``) or a varlen kernel name
        (``"sdpa_loop"``, ``"sdpa_padded"``, ``"sdpa_nested"``, ``"torch_varlen"``, ``"flash_torch"``,
        ``"flash_attn"``; docs/backends.md)."""
        backends.check_name("packed_attention", backend, "packed_attention_backend")
        self.config.packed_attention_backend = backend

    def set_encoder_layer_backend(self, backend: str) -> None:
        """Encoder layers of both forwards (``config.encoder_layer_backend``): ``"auto"`` / ``"reference"`` (default:
        the eager layer) or ``"triton"`` (the fused layer, docs/encoder.md)."""
        set_encoder_layer_backend(self, backend)

    def forward_batch(
        self,
        batch: dict[str, Any],
        img_masks: Optional[torch.Tensor] = None,
        output_all_encoded_layers: bool = False,
    ) -> Union[list[torch.Tensor], torch.Tensor]:
        """The padded forward on a collated batch dict (keys ``input_ids``, ``position_ids``, ``img_feat``,
        ``img_pos_feat``, ``attn_masks``, ``gather_index``, as the data collates produce; optional ``txt_type_ids``
        [B, Lt] and ``img_type_ids`` [B, Nb] for NLVR2 / VCR, ``txt_delta`` [B, Lt, H] and ``img_delta`` [B, Nb, 2048]
        for adversarial training). Returns [B, L, H] (last layer) or every layer's output."""
        return self(
            batch["input_ids"],
            batch["position_ids"],
            batch["img_feat"],
            batch["img_pos_feat"],
            batch["attn_masks"],
            batch["gather_index"],
            img_masks=img_masks,
            output_all_encoded_layers=output_all_encoded_layers,
            txt_type_ids=batch.get("txt_type_ids"),
            img_type_ids=batch.get("img_type_ids"),
            txt_delta=batch.get("txt_delta"),
            img_delta=batch.get("img_delta"),
        )

    def forward_packed(
        self, packed: dict[str, Any], output_all_encoded_layers: bool = False, check_values: Optional[bool] = None
    ) -> Union[list[torch.Tensor], torch.Tensor]:
        """The encoder on the packed layout: only valid tokens are embedded and run through every layer.

        Args:
            packed: the ``packed`` dict of a collate (contract 2; ``uniter_fast.layout.pack_batch`` builds it from a
                padded batch): ``txt_ids``/``txt_position_ids``/``txt_index`` [St], ``img_feat`` [Sn, 2048],
                ``img_pos_feat`` [Sn, 7], ``img_index`` [Sn], ``cu_seqlens`` [B+1] int32, ``max_seqlen`` int and,
                for MRM, ``img_masks`` [Sn] bool; optional ``txt_type_ids`` [St] / ``img_type_ids`` [Sn].
            output_all_encoded_layers: return every layer's output (list) or only the last one (tensor).
            check_values: also check ``cu_seqlens`` / ``max_seqlen`` against the token counts, which synchronises
                with the GPU (default: ``self.check_values``); shapes and keys are always checked.

        Returns:
            [T, H] hidden states of the valid tokens (T = St + Sn), example i at cu_seqlens[i] .. cu_seqlens[i+1]-1,
            text first then regions; heads read ``out[packed["mlm_index"]]``, ``out[packed["cls_index"]]`` etc.
        """
        device = packed["cu_seqlens"].device
        dtype = parameter_dtype(self.embeddings.word_embeddings)
        if torch.is_autocast_enabled(device.type):  # attention then sees q/k/v in the autocast dtype
            dtype = torch.get_autocast_dtype(device.type)
        dropout_p = self.config.attention_probs_dropout_prob if self.training else 0.0
        backend = backends.resolve(
            "packed_attention", self.config.packed_attention_backend, device, dtype, dropout_p=dropout_p
        )
        encoded_layers = packed_forward(self, packed, backend, output_all_encoded_layers, check_values)
        if not output_all_encoded_layers:
            return encoded_layers[-1]
        return encoded_layers

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def from_pretrained(
        cls,
        path: PathLike,
        config: Optional[Union[UniterConfig, str, PathLike]] = None,
        dtype: Optional[torch.dtype] = None,
        strict: bool = True,
        local_files_only: bool = False,
        **config_overrides: Any,
    ) -> UniterModel:
        """Load the encoder of any checkpoint :func:`uniter_fast.checkpoint.read_checkpoint` reads.

        Args:
            path: a :meth:`save_pretrained` directory, a pretraining / fine-tuning export, an original UNITER file
                (``uniter-base.pt``: ``uniter.``-prefixed keys, fp16, pretraining heads included), a bare UniterModel
                state_dict, a BERT-style file (with ``strict=False``: it has no image embedder), a DeepSpeed
                checkpoint directory, an MMF UNITER file (the zoo's ``uniter.pretrained`` / ``villa.pretrained``), a
                LightningDOT checkpoint (its image tower) or a Hugging Face Hub id ``org/name`` of a
                :meth:`save_pretrained` folder (through ``huggingface_hub``). Head keys are skipped and listed in the
                log; another project's heads that are not the original's are dropped (logged).
            config: a ``UniterConfig``, a preset name or a config JSON path; by default the config saved with the
                checkpoint, else the sizes read off the weights (heads = hidden_size / 64, as in every released
                UNITER; a warning says so).
            dtype: parameter dtype (default float32); checkpoint tensors are cast to it.
            strict: when False, encoder keys missing from the file keep their random init (logged), as when
                starting from a BERT checkpoint that has no image embedder. Unknown keys are always an error.
            local_files_only: a Hub id is looked up in the local Hugging Face cache only (also ``HF_HUB_OFFLINE=1``).
            config_overrides: config fields to override (e.g. ``attention_backend="eager"``, dropout probs).
        """
        checkpoint = read_checkpoint(path, keep_heads=False, local_files_only=local_files_only)
        model = cls(checkpoint_config(checkpoint, config, config_overrides))
        if dtype is not None:
            model.to(dtype)
        load_state(model, checkpoint.state, checkpoint.path, encoder_only=True, strict=strict)
        return model

    def save_pretrained(
        self, directory: PathLike, dtype: Optional[torch.dtype] = None, provenance: Optional[dict[str, Any]] = None
    ) -> None:
        """Write ``config.json``, ``model.safetensors`` (in ``dtype``, default the model's) and the model card
        ``README.md`` (``provenance``: where the weights come from, default "saved by Model.save_pretrained") to
        ``directory``, atomically (:func:`uniter_fast.checkpoint.save_pretrained`): a folder to upload to the Hub."""
        save_pretrained(self, directory, dtype, provenance=provenance or {"source": "Model.save_pretrained"})


Model = UniterModel
