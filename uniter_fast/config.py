"""UNITER configuration: the BERT-style JSON fields of the original ``config/uniter-*.json`` files."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Union

from uniter_fast.backends import check_name
from uniter_fast.files import write_text_atomic
from uniter_fast.json_types import check_types

PathLike = Union[str, "os.PathLike[str]"]

IMG_DIM = 2048
IMG_POS_DIM = 7
IMG_LABEL_DIM = 1601
GIVEN_BOXES_FIELD = "given_boxes"  # npz field (0-d bool) of given-box features: build keeps every box
BUCKET_SIZE = 8192
SIZE_MULTIPLE = 8  # a token-bucket batch holds a multiple of 8 examples (the original's size_multiple)


GELU_VARIANTS = ("fused", "original")  # the one-kernel GELU, or the erf form written out as the original code


def check_gelu(variant: str) -> None:
    """``ValueError`` unless ``variant`` is one of :data:`GELU_VARIANTS`."""
    if variant not in GELU_VARIANTS:
        raise ValueError(f"gelu must be one of {GELU_VARIANTS}, got {variant!r}")


@dataclasses.dataclass
class UniterConfig:
    """Hyper-parameters of a UNITER encoder, field for field those of the original config JSON.

    ``attention_backend`` (the padded forward's attention core) and ``packed_attention_backend`` (``forward_packed``'s
    varlen attention) are ours, not in the original files (which ignore them): ``"auto"`` (default, the fastest exact
    kernel for the device and dtype), ``"reference"`` (the original math; ``"eager"``, its older name, is accepted) or
    a kernel name of components ``"attention"`` / ``"packed_attention"`` of :mod:`uniter_fast.backends`. ``gelu``
    is ours too: the written form of the erf GELU, ``"fused"`` (one kernel, default) or ``"original"`` (the formula as
    the original code writes it), see :mod:`uniter_fast.model.activations`. ``encoder_layer_backend`` is ours:
    ``"auto"`` / ``"reference"`` (default: the eager layer) or ``"triton"`` (one QKV matmul, fused bias + GELU and
    bias + dropout + residual + LayerNorm kernels; :mod:`uniter_fast.model.fused_layer`, docs/encoder.md).
    """

    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    img_dim: int = IMG_DIM
    attention_backend: str = "auto"
    packed_attention_backend: str = "auto"
    gelu: str = "fused"
    encoder_layer_backend: str = "auto"

    def __post_init__(self) -> None:
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        check_types(UniterConfig, values, "model config")
        for name, value in values.items():
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise ValueError(f"model config: {name} must be an integer >= 1, got {value}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.hidden_act != "gelu":
            raise ValueError(
                f"hidden_act: only 'gelu' (the erf form UNITER uses) is supported, got {self.hidden_act!r}"
            )
        check_name("attention", self.attention_backend, "attention_backend")
        check_name("packed_attention", self.packed_attention_backend, "packed_attention_backend")
        check_gelu(self.gelu)
        check_name("encoder_layer", self.encoder_layer_backend, "encoder_layer_backend")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    @property
    def head_dim(self) -> int:
        """Size of one attention head, hidden_size / num_attention_heads."""
        return self.hidden_size // self.num_attention_heads

    # ------------------------------------------------------------------ presets
    @classmethod
    def base(cls, **overrides: Any) -> UniterConfig:
        """UNITER-base (``config/uniter-base.json``): 12 layers, H=768, 12 heads."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides: Any) -> UniterConfig:
        """UNITER-large (``config/uniter-large.json``): 24 layers, H=1024, 16 heads."""
        fields = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def tiny(cls, **overrides: Any) -> UniterConfig:
        """A 2-layer, H=64 model for CPU demos and tests (vocab sized for the bundled corpus by default)."""
        fields = dict(
            vocab_size=1000,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=128,
        )
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> UniterConfig:
        """The preset called ``name`` (``"base"``, ``"large"`` or ``"tiny"``), with field overrides."""
        presets = {"base": cls.base, "large": cls.large, "tiny": cls.tiny}
        if name not in presets:
            raise ValueError(
                f"model config {name!r}: expected a preset {sorted(presets)} or a config JSON file (not found)"
            )
        return presets[name](**overrides)

    # ------------------------------------------------------------------ JSON
    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> UniterConfig:
        """Build from a dict of config fields; keys the original files carry but we do not use are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in known})

    @classmethod
    def from_json_file(cls, path: PathLike) -> UniterConfig:
        """Read a config JSON: the original ``uniter-base.json`` as is, or one written by :meth:`to_json_file`."""
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        """All fields as a plain dict (the original config fields plus ours)."""
        return dataclasses.asdict(self)

    def to_json_file(self, path: PathLike) -> None:
        """Write the config as indented JSON (atomically: a temp file, then rename)."""
        write_text_atomic(os.fspath(path), json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
