"""Post-LN BERT encoder and pooler, with the original HuggingFace/UNITER submodule names.

Every layer has two entry points sharing the same parameters: ``forward`` on the padded layout [B, L, H] with the
original additive mask, and ``forward_packed`` on the packed layout [T, H] (valid tokens only, sequences delimited
by a :class:`~uniter_fast.model.attention.VarlenBatch`).

``config.encoder_layer_backend`` (resolved once per encoder call by :func:`uniter_fast.backends.resolve`, component
``"encoder_layer"``) selects the eager layer (``"reference"``, the default) or the fused one (``"triton"``: one QKV
matmul, fused bias + GELU and bias + dropout + residual + LayerNorm, :mod:`uniter_fast.model.fused_layer`), in both
layouts; the parameters and their checkpoint keys are the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from uniter_fast import backends
from uniter_fast.config import UniterConfig
from uniter_fast.model.activations import Gelu
from uniter_fast.model.attention import PADDED_ATTENTION, VARLEN_ATTENTION, VarlenBatch


def _fused(requested: str, hidden_states: torch.Tensor) -> bool:
    """Whether the encoder-layer backend ``requested`` resolves to the fused layer for these hidden states (the dtype
    the matmuls produce: the autocast dtype under autocast)."""
    dtype = hidden_states.dtype
    if torch.is_autocast_enabled(hidden_states.device.type):
        dtype = torch.get_autocast_dtype(hidden_states.device.type)
    return backends.resolve("encoder_layer", requested, hidden_states.device, dtype) == "triton"


def set_encoder_layer_backend(model: nn.Module, backend: str) -> None:
    """Switch every encoder layer of ``model`` to ``backend`` (``"auto"``, ``"reference"``, ``"triton"``): the
    ``config.encoder_layer_backend`` of each of its modules that holds a config (the encoders read theirs per call)."""
    backends.check_name("encoder_layer", backend, "encoder_layer_backend")
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "encoder_layer_backend"):
            config.encoder_layer_backend = backend


class BertSelfAttention(nn.Module):
    """query/key/value projections and the attention core that ``config.attention_backend`` selects (resolved by
    :func:`uniter_fast.backends.resolve` for the tensors of each call)."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.backend = config.attention_backend

    def _project(self, hidden_states: torch.Tensor, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """query, key, value [..., H] of hidden_states [..., H]: three matmuls, or one under the fused layer."""
        if fused:
            from uniter_fast.model.fused_layer import qkv_projection

            return qkv_projection(hidden_states, (self.query, self.key, self.value))
        return self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, additive_mask: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """hidden_states: [B, L, H]; additive_mask: [B, 1, 1, L]; ``fused``: the fused layer's one QKV matmul.
        Returns the context [B, L, H]."""
        query, key, value = (self._split_heads(x) for x in self._project(hidden_states, fused))
        dropout_p = self.dropout_p if self.training else 0.0
        core = PADDED_ATTENTION[backends.resolve("attention", self.backend, query.device, query.dtype)]
        context = core(query, key, value, additive_mask, dropout_p)
        batch, _, length, _ = context.shape
        return context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)

    def forward_packed(self, hidden_states: torch.Tensor, batch: VarlenBatch, fused: bool = False) -> torch.Tensor:
        """hidden_states: [T, H] packed tokens. Returns the context [T, H], attention run by ``batch.backend``."""
        total = hidden_states.size(0)
        query, key, value = (x.view(total, self.num_heads, self.head_dim) for x in self._project(hidden_states, fused))
        dropout_p = self.dropout_p if self.training else 0.0
        context = VARLEN_ATTENTION[batch.backend](query, key, value, batch, dropout_p)
        return context.reshape(total, self.num_heads * self.head_dim)


class BertSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual)."""

    def __init__(self, config: UniterConfig, in_features: int) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """hidden_states: [..., in_features]; residual: [..., H]; ``fused``: one Triton kernel after the matmul.
        Returns [..., H]."""
        if not fused:
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)
        from uniter_fast.model.fused_layer import bias_dropout_add_layer_norm, draw_seed

        p = self.dropout.p if self.training else 0.0
        seed = draw_seed(hidden_states.device) if p > 0 else None
        norm = self.LayerNorm
        x = F.linear(hidden_states, self.dense.weight)
        return bias_dropout_add_layer_norm(x, self.dense.bias, residual, norm.weight, norm.bias, norm.eps, p, seed)


class BertAttention(nn.Module):
    """Self-attention block: ``attention.self`` and ``attention.output``."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, additive_mask: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """[B, L, H] -> [B, L, H]."""
        return self.output(self.self(hidden_states, additive_mask, fused), hidden_states, fused)

    def forward_packed(self, hidden_states: torch.Tensor, batch: VarlenBatch, fused: bool = False) -> torch.Tensor:
        """[T, H] -> [T, H] on the packed layout."""
        return self.output(self.self.forward_packed(hidden_states, batch, fused), hidden_states, fused)


class BertIntermediate(nn.Module):
    """dense (H -> I) followed by the exact (erf) GELU in the written form ``config.gelu``."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = Gelu(config.gelu)

    def forward(self, hidden_states: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """[..., H] -> [..., I]; ``fused``: one Triton bias + GELU kernel after the matmul."""
        if not fused:
            return self.intermediate_act_fn(self.dense(hidden_states))
        from uniter_fast.model.fused_layer import bias_gelu

        return bias_gelu(F.linear(hidden_states, self.dense.weight), self.dense.bias)


class BertLayer(nn.Module):
    """One post-LN transformer layer."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertSelfOutput(config, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor, additive_mask: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """[B, L, H] -> [B, L, H]; ``fused``: the fused layer (resolved once per encoder call by the encoder)."""
        attention_output = self.attention(hidden_states, additive_mask, fused)
        return self.output(self.intermediate(attention_output, fused), attention_output, fused)

    def forward_packed(self, hidden_states: torch.Tensor, batch: VarlenBatch, fused: bool = False) -> torch.Tensor:
        """[T, H] -> [T, H] on the packed layout."""
        attention_output = self.attention.forward_packed(hidden_states, batch, fused)
        return self.output(self.intermediate(attention_output, fused), attention_output, fused)


class UniterEncoder(nn.Module):
    """A stack of ``num_hidden_layers`` BertLayers under ``encoder.layer.{k}``; ``config.encoder_layer_backend`` is
    resolved once per call."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config) for _ in range(config.num_hidden_layers)])
        self.config = config

    def forward(
        self, hidden_states: torch.Tensor, additive_mask: torch.Tensor, output_all_encoded_layers: bool = True
    ) -> list[torch.Tensor]:
        """hidden_states [B, L, H] -> every layer's output (or only the last one in a 1-element list)."""
        all_layers = []
        fused = _fused(self.config.encoder_layer_backend, hidden_states)
        for layer in self.layer:
            hidden_states = layer(hidden_states, additive_mask, fused)
            if output_all_encoded_layers:
                all_layers.append(hidden_states)
        if not output_all_encoded_layers:
            all_layers.append(hidden_states)
        return all_layers

    def forward_packed(
        self, hidden_states: torch.Tensor, batch: VarlenBatch, output_all_encoded_layers: bool = False
    ) -> list[torch.Tensor]:
        """Packed hidden_states [T, H] -> every layer's output [T, H] (or only the last one in a 1-element list)."""
        all_layers = []
        fused = _fused(self.config.encoder_layer_backend, hidden_states)
        for layer in self.layer:
            hidden_states = layer.forward_packed(hidden_states, batch, fused)
            if output_all_encoded_layers:
                all_layers.append(hidden_states)
        if not output_all_encoded_layers:
            all_layers.append(hidden_states)
        return all_layers


class BertPooler(nn.Module):
    """dense + tanh on the first ([CLS]) position."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, L, H] -> [B, H]."""
        return self.activation(self.dense(hidden_states[:, 0]))
