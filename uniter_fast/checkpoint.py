"""Checkpoint I/O for every floor: read any checkpoint the project meets, name its layout, convert its keys to the
original names, copy it into a model with checks, and write ours (``save_pretrained``) or the original's layout.

Containers: a ``torch.save`` file (``.pt`` / ``.bin``), a ``.safetensors`` file, a directory holding
``model.safetensors`` (with ``config.json`` and side files such as ``task.json``: ``Model.save_pretrained`` and the
pretraining / fine-tuning exports), and a DeepSpeed checkpoint directory (a ``latest`` file naming the tag, or a tag
directory holding ``mp_rank_00_model_states.pt``, under ZeRO-3 ``zero_pp_rank_0_mp_rank_00_model_states.pt``),
consolidated to fp32 by ``deepspeed.utils.zero_to_fp32``.

Layouts, told apart by the keys (old BERT LayerNorm names ``gamma`` / ``beta`` become ``weight`` / ``bias`` first, as
the original loader does):

* ``uniter``: the original names, the encoder under ``uniter.`` and the heads under their own names: the released
  ``uniter-base.pt``, the original ``model_step_N.pt``, our exports, DeepSpeed checkpoints of our runs.
* ``model``: a bare ``UniterModel`` state_dict (``embeddings.*``, ``img_embeddings.*``, ``encoder.*``, ``pooler.*``),
  as ``Model.save_pretrained`` writes it.
* ``bert``: BERT-style (``bert.*``, e.g. pytorch_pretrained_bert's ``bert-base-cased``): every ``bert`` in a key
  becomes ``uniter``, as the original ``scripts/convert_ckpt.py`` does.
* ``mmf`` (MMF's UNITER: the zoo's ``uniter.pretrained`` / ``villa.pretrained``) and ``lightningdot`` (a tower of
  LightningDOT's bi-encoder): other projects' names of the same weights, mapped by
  :mod:`uniter_fast.checkpoint_layouts`; ``volta`` (e-bug/volta's UNITER, another architecture) is detected and
  refused.

A path that is not on disk but looks like ``org/name`` is a Hugging Face Hub model, resolved through
``huggingface_hub`` when it is installed (:mod:`uniter_fast.hub`).

Every layout is converted to the ``uniter`` names; :func:`load_state` maps them onto a bare ``UniterModel`` or a
model with heads. This module imports nothing from ``uniter_fast.model`` (models are plain ``nn.Module`` here), so
``model/`` can import it at the top.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import logging
import os
import pickle
from typing import Any, Callable, Iterator, Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from uniter_fast import checkpoint_layouts as foreign
from uniter_fast import hub
from uniter_fast.checkpoint_layouts import Conversion
from uniter_fast.config import PathLike, UniterConfig
from uniter_fast.errors import CheckpointError
from uniter_fast.files import atomic_write, read_json, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CONVERSION_NAME = "conversion.json"  # a converted folder's report: source, layout, checksum, key changes
ORIGINAL_CONFIG = os.path.join(os.pardir, "log", "model.json")  # the original's output layout: ckpt/ beside log/
DS_LATEST = "latest"
DS_MODEL_STATES = "mp_rank_00_model_states.pt"
DS_ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 writes one per rank instead
ENCODER_PREFIX = "uniter."
PRETRAINING_HEAD_PREFIXES = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")
NSP_PREFIX = "cls.seq_relationship."  # BERT's next-sentence head: no UNITER model has it
MODEL_PARTS = ("embeddings.", "img_embeddings.", "encoder.", "pooler.")  # the submodules of a UniterModel
MARKERS = (  # keys every UNITER encoder has, shown when a file's layout is unknown
    "embeddings.word_embeddings.weight",
    "img_embeddings.img_linear.weight",
    "encoder.layer.0.attention.self.query.weight",
    "pooler.dense.weight",
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """A known key layout: its name, the prefix of its encoder keys, what writes it, and (for another project's
    layout) sample keys for messages, its detector and whether it is refused."""

    name: str
    prefix: str
    description: str
    samples: tuple[str, ...] = ()
    detector: Optional[Callable[[list[str]], bool]] = None
    refused: bool = False

    def expected_keys(self) -> list[str]:
        """Encoder keys a checkpoint of this layout has (a sample, for messages)."""
        if self.samples:
            return list(self.samples)
        return [self.prefix + m for m in MARKERS if not (self.name == "bert" and m.startswith("img_"))]

    def matches(self, keys: list[str]) -> bool:
        """Whether ``keys`` (LayerNorm-renamed) are of this layout."""
        if self.detector is not None:
            return self.detector(keys)
        parts = (self.prefix,) if self.prefix else MODEL_PARTS
        return any(k.startswith(parts) for k in keys)


LAYOUTS = (  # detection order: the other projects' layouts first (their keys may start with 'uniter.' or 'bert.')
    Layout(
        "volta",
        "bert.",
        "e-bug/volta's UNITER: another architecture, refused",
        ("bert.embeddings.image_embeddings.weight", "bert.encoder.layer.0.attention_self.query.weight"),
        foreign.is_volta,
        refused=True,
    ),
    Layout(
        "mmf",
        "uniter.uniter.",
        "MMF's UNITER (mmf/models/uniter.py): text_embeddings, img_embeddings.final_layer_norm, heads.<task>",
        (
            "uniter.uniter.text_embeddings.word_embeddings.weight",
            "uniter.uniter.img_embeddings.final_layer_norm.weight",
            "uniter.uniter.encoder.layer.0.attention.self.query.weight",
            "uniter.uniter.pooler.dense.weight",
        ),
        foreign.is_mmf,
    ),
    Layout(
        "lightningdot",
        "img_model.bert.",
        "LightningDOT's bi-encoder (dvl/models/bi_encoder.py): img_model.bert / txt_model.bert towers",
        (
            "img_model.bert.embeddings.word_embeddings.weight",
            "img_model.bert.img_embeddings.img_linear.weight",
            "img_model.encode_proj.0.weight",
            "txt_model.bert.embeddings.word_embeddings.weight",
        ),
        foreign.is_lightningdot,
    ),
    Layout("uniter", ENCODER_PREFIX, "original UNITER names: encoder under 'uniter.', heads under their own names"),
    Layout("model", "", "a bare UniterModel state_dict, as Model.save_pretrained writes it"),
    Layout("bert", "bert.", "BERT-style names, 'bert' becomes 'uniter' as the original scripts/convert_ckpt.py"),
)
LAYOUT_NAMES = tuple(layout.name for layout in LAYOUTS)


def layout_named(name: str) -> Layout:
    """The :data:`LAYOUTS` entry called ``name``; ``CheckpointError`` listing the names otherwise."""
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise CheckpointError(f"layout: expected one of {list(LAYOUT_NAMES)}, got {name!r}")


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint read by :func:`read_checkpoint`.

    ``state`` has the original names (``uniter.*`` encoder + heads), tensors as stored (fp16, fp32, ...) on the CPU;
    ``config`` is the model config saved with it (``config_path``), None when there is none."""

    path: str
    container: str
    layout: str
    state: dict[str, torch.Tensor]
    config: Optional[UniterConfig] = None
    config_path: Optional[str] = None
    conversion: Optional[Conversion] = None
    """How ``state`` was made from the file's keys (renamed and dropped keys, what an export back needs)."""

    @property
    def text_only(self) -> bool:
        """Whether the checkpoint has no image embedder by nature: a BERT file, LightningDOT's text tower (read from
        the LightningDOT file, or a folder converted from it, whose ``conversion.json`` says so)."""
        source = self.conversion.source if self.conversion else {}
        saved = (self.side_file(CONVERSION_NAME) or {}).get("source_layout", {})
        return self.layout == "bert" or "text" in (source.get("tower"), saved.get("tower"))

    @property
    def encoder_state(self) -> dict[str, torch.Tensor]:
        """The ``UniterModel`` keys (``uniter.`` prefix stripped)."""
        return {k[len(ENCODER_PREFIX) :]: v for k, v in self.state.items() if k.startswith(ENCODER_PREFIX)}

    def side_file(self, name: str) -> Any:
        """The JSON content of side file ``name`` (e.g. ``task.json``) of a directory checkpoint; None if none."""
        path = os.path.join(self.path, name)
        return read_json(path) if self.container == "directory" and os.path.isfile(path) else None


@dataclasses.dataclass
class LoadReport:
    """What :func:`load_state` did, in the model's key names: keys copied from the checkpoint, keys of the model the
    checkpoint did not give (they keep their fresh init), keys of the checkpoint that were not used."""

    loaded: list[str]
    fresh: list[str]
    skipped: list[str]


# ---------------------------------------------------------------------------------------------------- reading
@contextlib.contextmanager
def _reading(path: str) -> Iterator[None]:
    """Turn what a damaged or foreign file raises while it is read (truncated, not a checkpoint) into a
    ``CheckpointError`` naming ``path``."""
    try:
        yield
    except (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: {err})") from err


def _is_deepspeed_tag(tag_dir: str) -> bool:
    """Whether ``tag_dir`` holds a DeepSpeed model-state file (ZeRO-0/1/2: one; ZeRO-3: one per rank)."""
    return any(os.path.isfile(os.path.join(tag_dir, name)) for name in (DS_MODEL_STATES, DS_ZERO3_MODEL_STATES))


def _deepspeed_location(path: str) -> Optional[tuple[str, str]]:
    """(checkpoint dir, tag) when ``path`` is a DeepSpeed checkpoint (the dir with ``latest``, or a tag dir)."""
    latest = os.path.join(path, DS_LATEST)
    if os.path.isfile(latest):
        with open(latest, encoding="utf-8") as f:
            return path, f.read().strip()
    if _is_deepspeed_tag(path):
        tag_dir = os.path.abspath(path)
        return os.path.dirname(tag_dir), os.path.basename(tag_dir)
    return None


def read_deepspeed(checkpoint_dir: str, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights of DeepSpeed checkpoint ``checkpoint_dir/tag``: consolidated by
    ``deepspeed.utils.zero_to_fp32`` for ZeRO checkpoints (any stage), the saved module otherwise."""
    tag_dir = os.path.join(checkpoint_dir, tag)
    if not _is_deepspeed_tag(tag_dir):
        raise FileNotFoundError(
            f"DeepSpeed checkpoint {tag_dir!r} has no {DS_MODEL_STATES} (ZeRO-3: {DS_ZERO3_MODEL_STATES})"
        )
    if any(name.endswith("optim_states.pt") for name in os.listdir(tag_dir)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with _reading(tag_dir):
            return dict(get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag))
    # no ZeRO: the module's weights are in the model-state file, which also pickles DeepSpeed's own objects (as
    # DeepSpeed itself does, it is read with weights_only=False: load only checkpoints you trust)
    with _reading(os.path.join(tag_dir, DS_MODEL_STATES)):
        states = torch.load(os.path.join(tag_dir, DS_MODEL_STATES), map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}


def _read_file(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        with _reading(path):
            return load_file(path)
    with _reading(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state).__name__}")
    others = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if others:
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors); the entries {others} are not tensors")
    return state


def read_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state_dict as stored, container, the folder its side files sit in) of any checkpoint path (see the module
    docstring). ``FileNotFoundError`` naming the path when it is none of them."""
    path = os.fspath(path)
    if os.path.isdir(path):
        deepspeed = _deepspeed_location(path)
        if deepspeed is not None:
            return read_deepspeed(*deepspeed), "deepspeed", deepspeed[0]
        weights = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(
                f"{path} is a directory but has no {WEIGHTS_NAME} (an export or Model.save_pretrained folder) nor a "
                f"DeepSpeed {DS_LATEST!r} or {DS_MODEL_STATES} file"
            )
        with _reading(weights):
            return load_file(weights), "directory", path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file or directory at {path!r}")
    container = "safetensors" if path.endswith(".safetensors") else "file"
    return _read_file(path), container, os.path.dirname(os.path.abspath(path))


def rename_legacy_layer_norm(key: str) -> str:
    """Old BERT LayerNorm names: ``gamma`` -> ``weight``, ``beta`` -> ``bias`` (as the original loader does)."""
    return key.replace("gamma", "weight").replace("beta", "bias")


def detect_layout(keys: list[str], source: str = "checkpoint") -> Layout:
    """The :data:`LAYOUTS` entry of a state_dict's (LayerNorm-renamed) keys; an unknown layout is a ``ValueError``
    naming the closest known layout and the keys it expects."""
    for layout in LAYOUTS:
        if layout.matches(keys):
            return layout
    sample = keys[:1000] or [""]

    def closeness(marker: str) -> float:  # the best similarity of a key to ``marker`` (difflib ratio, 0..1)
        matcher = difflib.SequenceMatcher(None, "", marker)  # caches the marker; keys vary
        best = 0.0
        for key in sample:
            matcher.set_seq1(key)
            if matcher.real_quick_ratio() > best and matcher.quick_ratio() > best:
                best = max(best, matcher.ratio())
        return best

    def score(layout: Layout) -> float:  # how well the keys match the layout's, on average over its markers
        expected = layout.expected_keys()
        return sum(closeness(e) for e in expected) / len(expected)

    closest = max((layout for layout in LAYOUTS if not layout.refused), key=score)
    raise ValueError(
        f"{source}: unknown checkpoint layout (keys {sorted(keys)[:4]}{' ...' if len(keys) > 4 else ''}); the closest "
        f"known layout is {closest.name!r} ({closest.description}), which expects keys such as "
        f"{closest.expected_keys()}"
    )


def to_original(
    state: dict[str, torch.Tensor], layout: Layout, tower: str = "image", keep_heads: bool = True, source: str = ""
) -> Conversion:
    """``state`` (LayerNorm-renamed keys of ``layout``) under the original names, with the renamed and dropped keys.
    ``tower``: LightningDOT's tower to convert (``image`` / ``text``); ``keep_heads``: a head of another project
    that is not the original's is a ``CheckpointError`` (True) or dropped and reported (False); a refused layout
    (volta) is a ``CheckpointError`` naming ``source`` and the differences."""
    if layout.refused:
        foreign.refuse_volta(list(state), source or "checkpoint")
    if layout.name == "mmf":
        return foreign.mmf_to_original(state, keep_heads)
    if layout.name == "lightningdot":
        return foreign.ldot_to_original(state, tower)
    out = Conversion({})
    for key, value in state.items():
        if layout.name == "bert":
            out.put(key, key.replace("bert", "uniter"), value)
        elif layout.name == "model" and key.startswith(MODEL_PARTS):
            out.put(key, ENCODER_PREFIX + key, value)
        else:
            out.put(key, key, value)
    return out


def from_original(
    state: dict[str, torch.Tensor], layout: Union[str, Layout], source: Optional[dict[str, Any]] = None
) -> dict[str, torch.Tensor]:
    """``state`` (original names) under the keys of ``layout`` (``uniter``, ``model``, ``mmf``, ``lightningdot``),
    the tensors themselves (same dtype, same bits); ``source``: what the conversion from that layout recorded
    (``Conversion.source``: prefixes, head names, buffers), else that layout's defaults."""
    layout = layout_named(layout) if isinstance(layout, str) else layout
    if layout.name in foreign.FROM_ORIGINAL:
        return foreign.FROM_ORIGINAL[layout.name](state, source or {})
    if layout.name == "uniter":
        return dict(state)
    if layout.name == "model":
        return {(k[len(ENCODER_PREFIX) :] if k.startswith(ENCODER_PREFIX) else k): v for k, v in state.items()}
    raise CheckpointError(f"layout: cannot write {layout.name!r}; the layouts written are {list(EXPORT_LAYOUTS)}")


EXPORT_LAYOUTS = ("uniter", "model", "mmf", "lightningdot")
"""The layouts :func:`from_original` writes."""


def file_sha256(path: str) -> str:
    """The sha256 hex digest of the file at ``path`` (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def saved_config_path(folder: str, container: str) -> Optional[str]:
    """The model config saved with a checkpoint: ``config.json`` in its folder, or for a single file the original
    output layout's ``../log/model.json`` beside its ``ckpt/``; None if none."""
    candidates = [os.path.join(folder, CONFIG_NAME)]
    if container in ("file", "safetensors"):
        candidates.append(os.path.join(folder, ORIGINAL_CONFIG))
    return next((c for c in candidates if os.path.isfile(c)), None)


def read_checkpoint(
    path: PathLike, tower: str = "image", keep_heads: bool = True, local_files_only: bool = False
) -> Checkpoint:
    """Read the checkpoint at ``path`` (any container, any layout; ``org/name``: a Hugging Face Hub model, see
    :func:`uniter_fast.hub.resolve`), log one line naming its layout, and convert its keys to the original names;
    with the model config saved beside it, if any. ``tower`` and ``keep_heads``: see :func:`to_original`."""
    path = hub.resolve(os.fspath(path), local_files_only)
    raw, container, folder = read_state_dict(path)
    legacy = {rename_legacy_layer_norm(k): k for k in raw}  # renamed key -> the file's key
    layout = detect_layout(list(legacy), path)
    conversion = to_original({k: raw[k_file] for k, k_file in legacy.items()}, layout, tower, keep_heads, path)
    final = {k_file: conversion.renamed.get(k, k) for k, k_file in legacy.items() if k not in conversion.dropped}
    conversion.renamed = {k_file: k for k_file, k in final.items() if k != k_file}  # the file's key -> original
    conversion.dropped = {legacy[k]: why for k, why in conversion.dropped.items()}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in raw.values()})
    logger.info(
        "%s: %s checkpoint, layout %r (%s), %d tensors (%s)",
        path,
        container,
        layout.name,
        layout.description,
        len(raw),
        ", ".join(dtypes),
    )
    if conversion.dropped:
        logger.info("%s: dropped %d keys: %s", path, len(conversion.dropped), conversion.dropped)
    for note in conversion.notes:
        logger.warning("%s: %s", path, note)
    config_path = saved_config_path(folder, container)
    config = UniterConfig.from_json_file(config_path) if config_path else None
    if config_path:
        logger.info("%s: model config from %s", path, config_path)
    return Checkpoint(path, container, layout.name, conversion.state, config, config_path, conversion)


# ---------------------------------------------------------------------------------------------------- configs
def infer_config(encoder_state: dict[str, torch.Tensor], **overrides: Any) -> UniterConfig:
    """Read the sizes of a UniterModel off its weights (keys without the ``uniter.`` prefix). Heads = hidden / 64,
    the head size of every UNITER/BERT."""
    try:
        vocab_size, hidden = encoder_state["embeddings.word_embeddings.weight"].shape
        max_positions = encoder_state["embeddings.position_embeddings.weight"].shape[0]
        type_vocab = encoder_state["embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = encoder_state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as err:
        raise ValueError(
            f"cannot infer the model config: the checkpoint has no {err.args[0]!r}; pass config= explicitly"
        ) from None
    img_linear = encoder_state.get("img_embeddings.img_linear.weight")
    layers = 1 + max(int(k.split(".")[2]) for k in encoder_state if k.startswith("encoder.layer."))
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        type_vocab_size=type_vocab,
        img_dim=img_linear.shape[1] if img_linear is not None else UniterConfig.img_dim,
    )
    fields.update(overrides)
    return UniterConfig(**fields)


SIZE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "img_dim",
)
"""The model-config fields that :func:`infer_config` reads off a checkpoint's weights."""


def check_config_fits(checkpoint: Checkpoint, config: UniterConfig, config_name: str) -> None:
    """A ``CheckpointError`` naming both when a size of ``config`` (called ``config_name`` in the message) differs
    from the one of ``checkpoint``'s encoder weights (:data:`SIZE_FIELDS`; ``img_dim`` only when the checkpoint has
    an image embedder): checked from the sizes alone, before any model is built. Nothing is checked when the
    weights lack a key the sizes are read from (the load names what is missing)."""
    try:
        weights = infer_config(checkpoint.encoder_state)
    except ValueError:
        return
    fields = [
        f for f in SIZE_FIELDS if f != "img_dim" or "img_embeddings.img_linear.weight" in checkpoint.encoder_state
    ]
    wrong = [
        f"{f} {getattr(weights, f)} != {getattr(config, f)}"
        for f in fields
        if getattr(weights, f) != getattr(config, f)
    ]
    if wrong:
        raise CheckpointError(
            f"{checkpoint.path}: its weights do not fit the model config {config_name} (checkpoint != config: "
            f"{', '.join(wrong)}); give the model config the checkpoint was trained with"
        )


def resolve_config(config: Union[UniterConfig, str, PathLike]) -> UniterConfig:
    """A ``UniterConfig``, a config JSON path (the original ``uniter-base.json`` works) or a preset name
    (``"tiny"``, ``"base"``, ``"large"``) -> ``UniterConfig``."""
    if isinstance(config, UniterConfig):
        return config
    path = os.fspath(config)
    return UniterConfig.from_json_file(path) if os.path.isfile(path) else UniterConfig.preset(path)


def checkpoint_config(
    checkpoint: Checkpoint,
    given: Optional[Union[UniterConfig, str, PathLike]] = None,
    overrides: Optional[dict[str, Any]] = None,
) -> UniterConfig:
    """The model config of ``checkpoint``: ``given`` (see :func:`resolve_config`), else the one saved with it, else
    the sizes read off its weights (with a warning: the head count is a guess), with ``overrides`` applied."""
    if given is not None:
        base = resolve_config(given)
    elif checkpoint.config is not None:
        base = checkpoint.config
    else:
        base = infer_config(checkpoint.encoder_state)
        logger.warning(
            "%s: no model config given or saved with the checkpoint: sizes read off the weights, %d attention heads "
            "(hidden / 64); give the model config if the model has another head count",
            checkpoint.path,
            base.num_attention_heads,
        )
    return UniterConfig.from_dict({**base.to_dict(), **(overrides or {})})


# ---------------------------------------------------------------------------------------------------- loading
def load_state(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str = "checkpoint",
    encoder_only: bool = False,
    strict: bool = True,
    log: bool = True,
) -> LoadReport:
    """Copy ``state`` (original names: ``uniter.*`` + heads) into ``model``, cast to each tensor's dtype, in place
    (tied parameters stay tied). ``model`` is a bare ``UniterModel`` (its keys are the ``uniter.*`` keys without the
    prefix) or a model with the encoder under ``uniter``.

    ``encoder_only``: only the encoder is copied; the checkpoint's other keys (heads) are skipped and the model's
    other keys keep their fresh init (both logged). Otherwise every key of ``state`` must be the model's (BERT's NSP
    head excepted). Unknown keys and shape mismatches are errors naming them; a model key the checkpoint lacks is an
    error when ``strict``, else keeps its init (logged). ``log=False``: the caller logs the report
    (:func:`log_load`), e.g. after setting heads from the skipped keys."""
    expected = model.state_dict()
    name = type(model).__name__
    bare = not any(k.startswith(ENCODER_PREFIX) for k in expected)  # a UniterModel: its keys lack the prefix
    targets = set(expected) if bare or not encoder_only else {k for k in expected if k.startswith(ENCODER_PREFIX)}
    wanted, skipped = {}, []
    for key, value in state.items():
        encoder = key.startswith(ENCODER_PREFIX)
        model_key = key[len(ENCODER_PREFIX) :] if bare and encoder else key
        if (encoder_only and not encoder) or key.startswith(NSP_PREFIX):
            skipped.append(model_key)
        else:
            wanted[model_key] = value
    unexpected = [k for k in wanted if k not in targets]
    missing = sorted(targets - set(wanted))
    problems = []
    if unexpected:
        problems.append(f"unexpected {unexpected} ({name} has no such keys)")
    if missing and strict:
        what = "encoder keys" if encoder_only else "keys"
        problems.append(
            f"missing {what} {missing}" + (" (strict=False keeps their random init)" if encoder_only else "")
        )
    if problems:
        raise ValueError(f"{source}: does not match {name}: " + "; ".join(problems))
    wrong = [
        f"{k}: model {tuple(expected[k].shape)}, file {tuple(v.shape)}"
        for k, v in wanted.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(f"{source}: shape mismatch (is the model config the checkpoint's?): " + "; ".join(wrong))
    with torch.no_grad():
        for key, value in wanted.items():
            expected[key].copy_(value.to(expected[key].dtype))
    report = LoadReport(loaded=list(wanted), fresh=sorted(set(expected) - set(wanted)), skipped=sorted(skipped))
    if log:
        log_load(report, source, name)
    return report


def log_load(report: LoadReport, source: str, name: str, derived: Optional[dict[str, str]] = None) -> None:
    """Log what a load did: the keys loaded into model ``name``, the checkpoint's keys not used, and the model's keys
    initialised freshly (a warning). ``derived``: {module: where its weights came from} of the modules set after the
    load from the checkpoint's other keys (ITM: ``rank_output`` from row 1 of the pretrained ``itm_output``); their
    keys count as neither fresh nor skipped."""
    derived = derived or {}

    def module_of(key: str) -> str:
        return key.split(".", 1)[0]

    skipped = [k for k in report.skipped if module_of(k) not in derived]
    fresh = [k for k in report.fresh if module_of(k) not in derived]
    logger.info("%s: loaded %d keys into %s", source, len(report.loaded), name)
    for module, origin in derived.items():
        logger.info("%s: %s of %s from %s", source, module, name, origin)
    if skipped:
        logger.info("%s: skipped %d keys that are not loaded into %s: %s", source, len(skipped), name, skipped)
    if fresh:
        logger.warning(
            "%s: %d keys of %s not in the checkpoint are initialised freshly: %s", source, len(fresh), name, fresh
        )


def load_checkpoint(model: nn.Module, path: PathLike, encoder_only: bool = False, strict: bool = True) -> LoadReport:
    """:func:`read_checkpoint` then :func:`load_state` (see there for ``encoder_only`` and ``strict``)."""
    return load_state(model, read_checkpoint(path).state, os.fspath(path), encoder_only, strict)


# ---------------------------------------------------------------------------------------------------- writing
def _detached(state: dict[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """CPU, contiguous copies-or-views of ``state`` (floating tensors cast to ``dtype`` when given); tensors that share
    storage with an earlier one (tied weights) are cloned, as safetensors stores no shared tensors."""
    out, seen = {}, set()
    for key, value in state.items():
        tensor = value.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensor = tensor.contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def save_pretrained(
    model: nn.Module,
    directory: PathLike,
    dtype: Optional[torch.dtype] = None,
    side_files: Optional[dict[str, Any]] = None,
    provenance: Optional[dict[str, Any]] = None,
) -> None:
    """Write ``config.json`` (``model.config``) and ``model.safetensors`` (every ``state_dict`` key, tied tensors
    stored under each name; floating tensors in ``dtype``, default the model's) into ``directory`` (created if
    needed), plus each ``side_files`` entry as JSON (``{"task.json": {...}}``) and, with ``provenance``, the model
    card ``README.md`` (:func:`uniter_fast.hub.model_card`); every file is written atomically."""
    save_state(_detached(model.state_dict(), dtype), model.config, directory, side_files, provenance)


def save_state(
    state: dict[str, torch.Tensor],
    config: UniterConfig,
    directory: PathLike,
    side_files: Optional[dict[str, Any]] = None,
    provenance: Optional[dict[str, Any]] = None,
) -> None:
    """:func:`save_pretrained` of a state_dict (dtypes kept; tied tensors stored under each name) and its model
    ``config``."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = _detached(state, None)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    config.to_json_file(os.path.join(directory, CONFIG_NAME))
    for name, content in (side_files or {}).items():
        write_json_atomic(os.path.join(directory, name), content, indent=2, sort_keys=True)
    if provenance is not None:
        card = hub.model_card(config.to_dict(), provenance, WEIGHTS_NAME)
        write_text_atomic(os.path.join(directory, hub.CARD_NAME), card)


def export_original_checkpoint(
    state_dict: dict[str, torch.Tensor],
    path: PathLike,
    prefix: str = ENCODER_PREFIX,
    dtype: Optional[torch.dtype] = torch.float16,
) -> None:
    """Write ``state_dict`` the way the original code saved ``uniter-base.pt``: keys prefixed with ``uniter.``
    (for UniterModel keys; keys that already carry it, or head keys given with their own names, are kept), tensors
    cast to fp16 on the CPU (``dtype=None``: as given), one ``torch.save`` file, written atomically. Readable by the
    original loader and by :func:`read_checkpoint`."""
    out = {}
    for key, value in state_dict.items():
        name = key if key.startswith(prefix) or key.startswith(PRETRAINING_HEAD_PREFIXES) else prefix + key
        tensor = value.detach().cpu()
        out[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    atomic_write(os.fspath(path), lambda tmp: torch.save(out, tmp))
