"""Key maps of the UNITER checkpoint layouts written by other projects, both ways: their keys to the original UNITER
names (``uniter.*`` encoder + original head names) and back, bit for bit (tensors are renamed, never changed).

* ``mmf``: facebookresearch/mmf ``mmf/models/uniter.py`` (the zoo's ``uniter.pretrained`` and ``villa.pretrained``).
  ``UNITERModelBase`` sits under a prefix (``uniter.uniter.`` in a whole ``UNITER`` model, ``uniter.`` in
  ``UNITERForClassification`` / ``UNITERForPretraining``), its heads under the wrapper's ``heads.<task>.``.
  ``text_embeddings`` is an HF ``BertEmbeddings`` (``position_ids``: a buffer, dropped and written back),
  ``img_embeddings.final_layer_norm`` is the original ``img_embeddings.LayerNorm``. The MRFR and MRC heads are the
  original's under other names; the MLM, ITM and classification (MLP) heads are other architectures: refused.
* ``lightningdot``: intersun/LightningDOT ``dvl/models/bi_encoder.py``: the image tower ``img_model.bert.*`` is an
  original UniterModel, the text tower ``txt_model.bert.*`` an HF ``BertModel``, each with ``encode_proj.*``;
  ``BiEncoderForPretraining`` adds ``bert.`` in front of both and keeps the original pretraining heads.
* ``volta``: e-bug/volta's UNITER (``volta/embeddings.py`` ``UniterEmbeddings``, ``volta/encoders.py``) is another
  architecture: detected and refused with the differences named.

This module imports nothing from the package but the error types: :mod:`uniter_fast.checkpoint` uses it.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import torch

from uniter_fast.errors import CheckpointError

ENCODER = "uniter."
PROJECTION = "encode_proj."  # a LightningDOT tower's projection, kept under this name beside the encoder

MMF_WORDS = "text_embeddings.word_embeddings.weight"
MMF_POSITION_IDS = "text_embeddings.position_ids"
MMF_SUBMODULES = {"text_embeddings.": "embeddings.", "img_embeddings.": "img_embeddings.", "encoder.": "encoder."}
MMF_SUBMODULES["pooler."] = "pooler."
MMF_FINAL_NORM = ("img_embeddings.final_layer_norm.", "img_embeddings.LayerNorm.")
MMF_HEADS = "heads."
MMF_HEAD_MAPS = {  # head kind -> (MMF key under heads.<task>., original key); these heads are the original's
    "mrfr": (
        ("feat_regress.0.weight", "feat_regress.net.0.weight"),
        ("feat_regress.0.bias", "feat_regress.net.0.bias"),
        ("feat_regress.2.weight", "feat_regress.net.2.weight"),
        ("feat_regress.2.bias", "feat_regress.net.2.bias"),
        ("linear_proj_weight", "feat_regress.weight"),
        ("linear_proj_bias", "feat_regress.bias"),
    ),
    "mrc": tuple(
        (f"region_classifier.{i}.{p}", f"region_classifier.net.{i}.{p}") for i in (0, 2, 3) for p in ("weight", "bias")
    ),
}
MMF_REFUSED_HEADS = {  # head kind -> (a key that marks it, how it differs from the original head)
    "mlp": (
        "classifier.",
        "MMF's classification head (mmf/models/transformers/heads/mlp.py) is not the original task head: it has its "
        "own BertPooler, an H->H transform with LayerNorm eps 1e-6 (the original vqa_output: H->2H, eps 1e-12, on "
        "the encoder's pooler)",
    ),
    "itm": (
        "cls.seq_relationship.",
        "MMF's ITM head (heads/itm.py) has its own BertPooler before the 2-way classifier (the original itm_output "
        "is one Linear on the encoder's pooler)",
    ),
    "mlm": (
        "cls.predictions.",
        "MMF's MLM head (heads/mlm.py) uses LayerNorm eps 1e-5 by default (the original's cls: 1e-12)",
    ),
}

LDOT_TOWERS = {"image": "img_model.", "text": "txt_model."}
LDOT_HEADS = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")  # BiEncoderForPretraining's own heads
LDOT_TEXT_POSITION_IDS = "embeddings.position_ids"  # the text tower's HF BertEmbeddings buffer

VOLTA_MARKERS = (
    "embeddings.image_location_embeddings.",
    "embeddings.v_LayerNorm.",
    ".attention_self.",
    "t_pooler.",
    "v_pooler.",
)
VOLTA_DIFFERENCES = (
    "a ReLU pooler of 1,024 units (t_pooler / v_pooler) instead of the tanh pooler of the hidden size, 5-d boxes "
    "instead of 7-d, a global image token, a 30,522-word vocabulary instead of 28,996, every encoder layer split "
    "into an attention and a feed-forward sublayer (attention_self, ...), modules stored twice under v_* aliases"
)


@dataclasses.dataclass
class Conversion:
    """A state_dict under the original names and how it was made from the source's keys.

    ``renamed``: {source key: original key} of the keys whose name changed; ``dropped``: {source key: why};
    ``source``: what :func:`from_original` needs to write the source layout back (prefixes, head names, buffers);
    ``notes``: what the user should know about the weights (e.g. LightningDOT's image-only training)."""

    state: dict[str, torch.Tensor]
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def put(self, source_key: str, key: str, value: torch.Tensor) -> None:
        """Store ``value`` under ``key``, noting the rename when ``key`` differs from ``source_key``."""
        self.state[key] = value
        if key != source_key:
            self.renamed[source_key] = key


# ---------------------------------------------------------------------------------------------------- detection
def mmf_prefix(keys: list[str]) -> str:
    """The prefix of MMF's ``UNITERModelBase`` in ``keys`` (e.g. ``uniter.uniter.``); ``ValueError`` if none."""
    for key in keys:
        if key.endswith(MMF_WORDS):
            return key[: -len(MMF_WORDS)]
    raise ValueError(f"no key ending in {MMF_WORDS!r}: not an MMF UNITER checkpoint")


def is_mmf(keys: list[str]) -> bool:
    """Whether ``keys`` are MMF's UNITER (``text_embeddings.*`` / ``img_embeddings.final_layer_norm.*``)."""
    return any(
        k.endswith(MMF_WORDS) or ".final_layer_norm." in k or k.startswith("img_embeddings.final_") for k in keys
    )


def ldot_prefix(keys: list[str]) -> str:
    """``"bert."`` for a LightningDOT pretraining checkpoint (``BiEncoderForPretraining``), else ``""``."""
    return "bert." if any(k.startswith(("bert.img_model.", "bert.txt_model.")) for k in keys) else ""


def is_lightningdot(keys: list[str]) -> bool:
    """Whether ``keys`` are LightningDOT's bi-encoder (``img_model.bert.*`` / ``txt_model.bert.*``)."""
    return any(re.match(r"^(bert\.)?(img|txt)_model\.bert\.", k) for k in keys)


def is_volta(keys: list[str]) -> bool:
    """Whether ``keys`` are e-bug/volta's (its image embeddings, split sublayers or t_/v_ poolers)."""
    return any(marker in k or k.startswith(marker) for k in keys for marker in VOLTA_MARKERS)


# ---------------------------------------------------------------------------------------------------- to original
def mmf_to_original(state: dict[str, torch.Tensor], keep_heads: bool) -> Conversion:
    """MMF keys -> original names. A head that is not the original's is a ``CheckpointError`` naming the
    differences, unless ``keep_heads`` is False (then it is dropped and reported)."""
    prefix = mmf_prefix(list(state))
    wrapper = prefix[: -len(ENCODER)] if prefix.endswith(ENCODER) else prefix
    out = Conversion({}, source={"prefix": prefix, "heads": {}, "position_ids": False})
    heads: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key.startswith(prefix) and not key.startswith(wrapper + MMF_HEADS):
            rest = key[len(prefix) :]
            if rest == MMF_POSITION_IDS:
                out.dropped[key] = "HF BertEmbeddings' position_ids buffer (0..max_positions-1), written back on export"
                out.source["position_ids"] = True
                continue
            if rest.startswith(MMF_FINAL_NORM[0]):
                rest = MMF_FINAL_NORM[1] + rest[len(MMF_FINAL_NORM[0]) :]
            part = next((p for p in MMF_SUBMODULES if rest.startswith(p)), None)
            if part is None:
                raise CheckpointError(f"MMF UNITER key {key!r} is none of UNITERModelBase's submodules")
            out.put(key, ENCODER + MMF_SUBMODULES[part] + rest[len(part) :], value)
        elif key.startswith(wrapper + MMF_HEADS):
            task, _, rest = key[len(wrapper + MMF_HEADS) :].partition(".")
            heads.setdefault(task, {})[rest] = value
        else:
            raise CheckpointError(f"MMF UNITER key {key!r} is neither under {prefix!r} nor a head ({wrapper}heads.*)")
    for task, params in heads.items():
        _mmf_head(out, wrapper + MMF_HEADS + task + ".", task, params, keep_heads)
    return out


def _mmf_head(out: Conversion, where: str, task: str, params: dict[str, torch.Tensor], keep_heads: bool) -> None:
    for kind, pairs in MMF_HEAD_MAPS.items():
        if set(params) == {mmf for mmf, _ in pairs}:
            for mmf, original in pairs:
                out.put(where + mmf, original, params[mmf])
            out.source["heads"][kind] = task
            return
    kind = next((k for k, (marker, _) in MMF_REFUSED_HEADS.items() if any(p.startswith(marker) for p in params)), None)
    why = MMF_REFUSED_HEADS[kind][1] if kind else f"an unknown MMF head (keys {sorted(params)[:4]})"
    if keep_heads:
        raise CheckpointError(
            f"MMF head {task!r} ({where}*) cannot be loaded as an original UNITER head: {why}; convert the encoder "
            f"alone (python -m uniter_fast.convert SRC --out DIR --encoder-only) and train a fresh head"
        )
    for name in params:
        out.dropped[where + name] = why


def ldot_to_original(state: dict[str, torch.Tensor], tower: str) -> Conversion:
    """LightningDOT keys -> original names: the ``tower`` (``image``: a UniterModel; ``text``: an HF BertModel, no
    image embedder) under ``uniter.``, its projection under ``encode_proj.``, and for the image tower the
    pretraining wrapper's original heads; the other tower is dropped (reported)."""
    if tower not in LDOT_TOWERS:
        raise CheckpointError(f"tower: expected one of {sorted(LDOT_TOWERS)}, got {tower!r}")
    prefix = ldot_prefix(list(state))
    model = prefix + LDOT_TOWERS[tower]
    out = Conversion({}, source={"prefix": prefix, "tower": tower, "position_ids": False})
    for key, value in state.items():
        if key.startswith(model + "bert."):
            rest = key[len(model + "bert.") :]
            if tower == "text" and rest == LDOT_TEXT_POSITION_IDS:
                out.dropped[key] = "HF BertEmbeddings' position_ids buffer (0..max_positions-1), written back on export"
                out.source["position_ids"] = True
                continue
            out.put(key, ENCODER + rest, value)
        elif key.startswith(model + PROJECTION):
            out.put(key, key[len(model) :], value)
        elif prefix and key.startswith(LDOT_HEADS) and tower == "image":
            out.put(key, key, value)
        else:
            other = (
                "the other tower"
                if key.startswith(prefix + ("txt_model." if tower == "image" else "img_model."))
                else "not part of the tower"
            )
            out.dropped[key] = f"{other} (tower {tower!r} converted)"
    if not any(k.startswith(ENCODER) for k in out.state):
        raise CheckpointError(f"LightningDOT checkpoint has no {tower} tower (no {model}bert.* keys)")
    if tower == "image":
        out.notes.append(
            "LightningDOT's image tower was trained on images alone (the image side of a bi-encoder): as the "
            "initialisation of a cross-encoder its text-image attention is untrained"
        )
    return out


def refuse_volta(keys: list[str], source: str) -> None:
    """The ``CheckpointError`` of a volta checkpoint: another architecture, its differences named."""
    sample = [k for k in keys if any(m in k for m in VOLTA_MARKERS)][:2]
    raise CheckpointError(
        f"{source}: e-bug/volta's UNITER layout (keys such as {sample}) is a different architecture from the original "
        f"UNITER and is not converted: {VOLTA_DIFFERENCES}"
    )


# ---------------------------------------------------------------------------------------------------- back
def mmf_from_original(state: dict[str, torch.Tensor], source: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Original names -> MMF keys (``source``: what :func:`mmf_to_original` recorded, else a whole ``UNITER``
    model's ``uniter.uniter.`` and the heads named by their kind)."""
    prefix = source.get("prefix", "uniter.uniter.")
    wrapper = prefix[: -len(ENCODER)] if prefix.endswith(ENCODER) else prefix
    back = {original: (kind, mmf) for kind, pairs in MMF_HEAD_MAPS.items() for mmf, original in pairs}
    names = source.get("heads", {})
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(ENCODER):
            rest = key[len(ENCODER) :]
            if rest.startswith(MMF_FINAL_NORM[1]):
                rest = MMF_FINAL_NORM[0] + rest[len(MMF_FINAL_NORM[1]) :]
            elif rest.startswith("embeddings."):
                rest = "text_" + rest
            out[prefix + rest] = value
            if rest == "text_embeddings.word_embeddings.weight" and source.get("position_ids"):
                positions = state[ENCODER + "embeddings.position_embeddings.weight"].shape[0]
                out[prefix + MMF_POSITION_IDS] = torch.arange(positions)[None]
        elif key in back:
            kind, mmf = back[key]
            out[wrapper + MMF_HEADS + names.get(kind, kind) + "." + mmf] = value
        else:
            raise CheckpointError(f"key {key!r} has no MMF counterpart (MMF layout: the encoder, MRFR and MRC heads)")
    return out


def ldot_from_original(state: dict[str, torch.Tensor], source: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Original names -> the LightningDOT keys of one tower (``source``: what :func:`ldot_to_original` recorded,
    else the image tower of a ``BiEncoder``)."""
    prefix, tower = source.get("prefix", ""), source.get("tower", "image")
    model = prefix + LDOT_TOWERS[tower]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(ENCODER):
            out[model + "bert." + key[len(ENCODER) :]] = value
            if key == ENCODER + "embeddings.word_embeddings.weight" and source.get("position_ids"):
                positions = state[ENCODER + "embeddings.position_embeddings.weight"].shape[0]
                out[model + "bert." + LDOT_TEXT_POSITION_IDS] = torch.arange(positions)[None]
        elif key.startswith(PROJECTION):
            out[model + key] = value
        elif prefix and key.startswith(LDOT_HEADS):
            out[key] = value
        else:
            raise CheckpointError(f"key {key!r} has no LightningDOT counterpart (a tower, its encode_proj, heads)")
    return out


TO_ORIGINAL: dict[str, Callable[..., Conversion]] = {"mmf": mmf_to_original, "lightningdot": ldot_to_original}
FROM_ORIGINAL: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "mmf": mmf_from_original,
    "lightningdot": ldot_from_original,
}
