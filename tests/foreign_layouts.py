"""Small stand-ins of other projects' UNITER modules, with their attribute names as their sources define them, so
``state_dict()`` gives those projects' checkpoint keys (and MMF's forward gives its outputs) for the converter tests.

* MMF (facebookresearch/mmf ``mmf/models/uniter.py``): ``UNITER`` (``self.uniter``) -> ``UNITERForPretraining`` /
  ``UNITERForClassification`` (``self.uniter``: ``UNITERModelBase``; ``self.heads``: a ModuleDict of heads from
  ``mmf/models/transformers/heads/{mrfr,mrc,mlp}.py``). ``UNITERModelBase``: ``text_embeddings`` (HF
  ``BertEmbeddings``, ``position_ids`` buffer), ``img_embeddings`` (``UNITERImageEmbeddings``: ``img_linear``,
  ``img_layer_norm``, ``pos_layer_norm``, ``pos_linear``, ``mask_embedding``, ``final_layer_norm``), ``encoder`` and
  ``pooler`` (HF ``BertModel``'s, the same names as the original's).
* LightningDOT (intersun/LightningDOT ``dvl/models/bi_encoder.py``): ``BiEncoder`` (``img_model``: ``UniterEncoder``
  with ``bert`` a UniterModel and ``encode_proj`` Sequential(Linear, GELU, LayerNorm, Linear); ``txt_model``:
  ``BertEncoder`` with ``bert`` an HF BertModel), ``BiEncoderForPretraining`` (``bert``: the BiEncoder; ``cls``,
  ``feat_regress``, ``region_classifier``, ``itm_output``).
* volta (e-bug/volta ``volta/embeddings.py`` ``UniterEmbeddings``, ``volta/encoders.py``): a few of its keys.
"""

from __future__ import annotations

import torch
from torch import nn

from uniter_fast.config import UniterConfig
from uniter_fast.model.encoder import BertPooler, UniterEncoder
from uniter_fast.model.uniter import UniterModel, additive_attention_mask
from uniter_fast.pretraining.heads import BertOnlyMLMHead, RegionClassification, RegionFeatureRegression


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """``module`` with N(0, 1) parameters, exactly representable in fp16 (never zeros), in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).half().float())
    return module.eval()


class HfBertEmbeddings(nn.Module):
    """HF ``BertEmbeddings``: word / position / token_type tables, ``LayerNorm``, the ``position_ids`` buffer."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None])

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        types = self.token_type_embeddings(torch.zeros_like(input_ids))
        return self.LayerNorm(self.word_embeddings(input_ids) + self.position_embeddings(position_ids) + types)


class MmfImageEmbeddings(nn.Module):
    """MMF's ``UNITERImageEmbeddings`` and its forward (no masks, eval)."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.img_linear = nn.Linear(config.img_dim, hidden)
        self.img_layer_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.pos_layer_norm = nn.LayerNorm(hidden, eps=1e-12)
        self.pos_linear = nn.Linear(7, hidden)
        self.mask_embedding = nn.Embedding(2, config.img_dim, padding_idx=0)
        self.final_layer_norm = nn.LayerNorm(hidden, eps=1e-12)

    def forward(
        self, img_feat: torch.Tensor, img_pos_feat: torch.Tensor, type_embeddings: torch.Tensor
    ) -> torch.Tensor:
        transformed = self.img_layer_norm(self.img_linear(img_feat))
        position = self.pos_layer_norm(self.pos_linear(img_pos_feat))
        return self.final_layer_norm(transformed + position + type_embeddings)


class MmfModelBase(nn.Module):
    """MMF's ``UNITERModelBase`` and its forward: text and image embeddings concatenated (no gather), the encoder."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.text_embeddings = HfBertEmbeddings(config)
        self.img_embeddings = MmfImageEmbeddings(config)
        self.encoder = UniterEncoder(config)
        self.pooler = BertPooler(config)

    def forward(self, input_ids, position_ids, img_feat, img_pos_feat, attention_mask) -> torch.Tensor:
        """The last layer [B, Lt + Nb, H]."""
        txt = self.text_embeddings(input_ids, position_ids)
        types = self.text_embeddings.token_type_embeddings(torch.ones_like(img_feat[:, :, 0].long()))
        img = self.img_embeddings(img_feat, img_pos_feat, types)
        mask = additive_attention_mask(attention_mask, txt.dtype)
        return self.encoder(torch.cat([txt, img], dim=1), mask, output_all_encoded_layers=False)[-1]


class MmfMrfr(nn.Module):
    """MMF's MRFR head: ``linear_proj_weight`` (the image embedder's ``img_linear.weight``), ``linear_proj_bias``,
    ``feat_regress`` Sequential(Linear, GELU, LayerNorm)."""

    def __init__(self, img_linear_weight: nn.Parameter, config: UniterConfig) -> None:
        super().__init__()
        self.linear_proj_weight = img_linear_weight
        self.linear_proj_bias = nn.Parameter(torch.zeros(config.img_dim))
        hidden = config.hidden_size
        self.feat_regress = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12))


class MmfMrc(nn.Module):
    """MMF's MRC head: ``region_classifier`` Sequential(Linear, GELU, LayerNorm, Linear)."""

    def __init__(self, config: UniterConfig, label_dim: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.region_classifier = nn.Sequential(
            nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=1e-12), nn.Linear(hidden, label_dim)
        )


class MmfMlp(nn.Module):
    """MMF's classification head (``heads/mlp.py``): ``pooler`` (BertPooler), ``classifier`` Sequential(Dropout,
    dense + LayerNorm eps 1e-6, Linear)."""

    def __init__(self, config: UniterConfig, num_labels: int) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.pooler = BertPooler(config)
        transform = nn.Module()
        transform.dense = nn.Linear(hidden, hidden)
        transform.LayerNorm = nn.LayerNorm(hidden, eps=1e-6)
        self.classifier = nn.Sequential(nn.Dropout(0.1), transform, nn.Linear(hidden, num_labels))


class MmfWrapper(nn.Module):
    """MMF's ``UNITERForPretraining`` / ``UNITERForClassification``: ``uniter`` (the base) and ``heads``."""

    def __init__(self, config: UniterConfig, heads: str) -> None:
        super().__init__()
        self.uniter = MmfModelBase(config)
        self.heads = nn.ModuleDict()
        if "mrfr" in heads:
            self.heads["mrfr"] = MmfMrfr(self.uniter.img_embeddings.img_linear.weight, config)
        if "mrc" in heads:
            self.heads["mrc"] = MmfMrc(config, 5)
        if "vqa2" in heads:
            self.heads["vqa2"] = MmfMlp(config, 7)


class MmfUniter(nn.Module):
    """MMF's registered ``UNITER`` model (``self.uniter`` the wrapper): keys ``uniter.uniter.*``, ``uniter.heads.*``."""

    def __init__(self, config: UniterConfig, heads: str = "mrfr,mrc") -> None:
        super().__init__()
        self.uniter = MmfWrapper(config, heads)


def encode_proj(config: UniterConfig, project_dim: int) -> nn.Sequential:
    """LightningDOT's ``encode_proj``: Linear(H, 2H), GELU, LayerNorm(2H), Linear(2H, project_dim)."""
    hidden = config.hidden_size
    return nn.Sequential(
        nn.Linear(hidden, 2 * hidden),
        nn.GELU(),
        nn.LayerNorm(2 * hidden, eps=1e-12),
        nn.Linear(2 * hidden, project_dim),
    )


class HfBertModel(nn.Module):
    """HF ``BertModel``: ``embeddings`` (with the ``position_ids`` buffer), ``encoder``, ``pooler``."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.embeddings = HfBertEmbeddings(config)
        self.encoder = UniterEncoder(config)
        self.pooler = BertPooler(config)


class LdotBiEncoder(nn.Module):
    """LightningDOT's ``BiEncoder``: ``img_model`` (``bert`` a UniterModel, ``encode_proj``) and ``txt_model``
    (``bert`` an HF BertModel, ``encode_proj``)."""

    def __init__(self, config: UniterConfig, project_dim: int = 16) -> None:
        super().__init__()
        self.img_model = nn.Module()
        self.img_model.bert = UniterModel(config)
        self.img_model.encode_proj = encode_proj(config, project_dim)
        self.txt_model = nn.Module()
        self.txt_model.bert = HfBertModel(config)
        self.txt_model.encode_proj = encode_proj(config, project_dim)


class LdotForPretraining(nn.Module):
    """LightningDOT's ``BiEncoderForPretraining``: ``bert`` (the BiEncoder) and the original pretraining heads, the
    MLM decoder and MRFR weight tied to the image tower."""

    def __init__(self, config: UniterConfig) -> None:
        super().__init__()
        self.bert = LdotBiEncoder(config)
        tower = self.bert.img_model.bert
        self.cls = BertOnlyMLMHead(config, tower.embeddings.word_embeddings.weight)
        self.feat_regress = RegionFeatureRegression(config, tower.img_embeddings.img_linear.weight)
        self.region_classifier = RegionClassification(config, 5)
        self.itm_output = nn.Linear(config.hidden_size, 2)


def volta_state(config: UniterConfig, seed: int) -> dict[str, torch.Tensor]:
    """A few keys of a volta UNITER checkpoint (``bert.embeddings`` with its image parts, split sublayers, the two
    poolers), random values."""
    gen = torch.Generator().manual_seed(seed)
    hidden = config.hidden_size
    shapes = {
        "bert.embeddings.word_embeddings.weight": (30522, hidden),
        "bert.embeddings.image_embeddings.weight": (hidden, 2048),
        "bert.embeddings.image_location_embeddings.weight": (hidden, 5),
        "bert.embeddings.v_LayerNorm.weight": (hidden,),
        "bert.encoder.layer.0.attention_self.query.weight": (hidden, hidden),
        "bert.encoder.layer.1.intermediate.dense.weight": (4 * hidden, hidden),
        "bert.t_pooler.dense.weight": (1024, hidden),
        "bert.v_pooler.dense.weight": (1024, hidden),
    }
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}
