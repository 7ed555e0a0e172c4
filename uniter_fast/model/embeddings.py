"""Text and image embedders of UNITER, with the original submodule names (``uniter.embeddings``,
``uniter.img_embeddings``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from uniter_fast.config import UniterConfig


class UniterTextEmbeddings(nn.Module):
    """word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        token_type_ids: Optional[torch.Tensor] = None,
        word_delta: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids: [B, Lt] int64; position_ids: [1 or B, Lt]; token_type_ids: [B, Lt] (default 0); word_delta:
        [B, Lt, H] float, a perturbation added to the word embeddings after the lookup, before the position and type
        embeddings and LayerNorm (VILLA's adversarial training). -> [B, Lt, H]. Packed inputs ([St]) work alike."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        words = self.word_embeddings(input_ids)
        if word_delta is not None:
            words = words + word_delta.to(words.dtype)
        embeddings = words + self.position_embeddings(position_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class UniterImageEmbeddings(nn.Module):
    """Region embedder: LN(img_linear(f)) + LN(pos_linear(box)) + type embedding, then LayerNorm and dropout.

    Masked regions (``img_masks`` true) arrive with zeroed features and get ``mask_embedding[1]`` added, so their
    input is exactly that learned 2048-d vector; row 0 of ``mask_embedding`` is held at zero as in the original.
    """

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        # Registration order matters for state_dict order: it follows the original module.
        self.img_linear = nn.Linear(config.img_dim, config.hidden_size)
        self.img_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pos_linear = nn.Linear(7, config.hidden_size)
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        img_feat: torch.Tensor,
        img_pos_feat: torch.Tensor,
        type_embeddings: torch.Tensor,
        img_masks: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """img_feat: [..., 2048]; img_pos_feat: [..., 7]; type_embeddings: [..., H]; img_masks: [...] bool/int.

        Returns [..., H] in the parameter dtype. Works on padded [B, Nb, *] and packed [N, *] inputs alike.
        """
        if img_masks is not None:
            with torch.no_grad():
                self.mask_embedding.weight[0].zero_()
            img_feat = img_feat + self.mask_embedding(img_masks.long())
        transformed_im = self.img_layer_norm(self.img_linear(img_feat))
        transformed_pos = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        embeddings = transformed_im + transformed_pos + type_embeddings
        return self.dropout(self.LayerNorm(embeddings))
