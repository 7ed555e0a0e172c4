"""Checkpoint I/O: original UNITER ``.pt`` files (read and write) and our ``config.json`` + ``model.safetensors``.

The original loader was non-strict and silent (a known user pain: ``uniter.``-prefixed keys loaded into a bare
UniterModel matched nothing and nobody was told). Here encoder keys must match exactly, head keys are listed in the
log, and a mismatch is an error naming the keys.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING, Any, Optional, Union

import torch
from safetensors.torch import load_file, save_file

from uniter_fast.config import PathLike, UniterConfig

if TYPE_CHECKING:
    from uniter_fast.model.uniter import UniterModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ENCODER_PREFIX = "uniter."
PRETRAINING_HEAD_PREFIXES = ("cls.", "feat_regress.", "region_classifier.", "itm_output.")


def rename_legacy_layer_norm(key: str) -> str:
    """Old BERT LayerNorm names: ``gamma`` -> ``weight``, ``beta`` -> ``bias`` (as the original loader does)."""
    return key.replace("gamma", "weight").replace("beta", "bias")


def split_encoder_state(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Separate UniterModel keys (prefix stripped) from head keys.

    A file with any ``uniter.``-prefixed key is a task/pretraining model: its encoder is under that prefix and every
    other key belongs to a head. A file without the prefix is a bare UniterModel, except for the known pretraining
    head names. Returns (encoder state without prefix, sorted head keys).
    """
    state = {rename_legacy_layer_norm(k): v for k, v in state_dict.items()}
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        encoder = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        heads = sorted(k for k in state if not k.startswith(ENCODER_PREFIX))
    else:
        encoder = {k: v for k, v in state.items() if not k.startswith(PRETRAINING_HEAD_PREFIXES)}
        heads = sorted(k for k in state if k.startswith(PRETRAINING_HEAD_PREFIXES))
    return encoder, heads


def infer_config(encoder_state: dict[str, torch.Tensor], **overrides: Any) -> UniterConfig:
    """Read the sizes of a UniterModel off its weights. Heads = hidden / 64, the head size of every UNITER/BERT."""
    try:
        vocab_size, hidden = encoder_state["embeddings.word_embeddings.weight"].shape
        max_positions = encoder_state["embeddings.position_embeddings.weight"].shape[0]
        type_vocab = encoder_state["embeddings.token_type_embeddings.weight"].shape[0]
        intermediate = encoder_state["encoder.layer.0.intermediate.dense.weight"].shape[0]
    except KeyError as err:
        raise ValueError(
            f"cannot infer the model config: the checkpoint has no {err.args[0]!r}; pass config= explicitly"
        ) from None
    img_dim = (
        encoder_state["img_embeddings.img_linear.weight"].shape[1]
        if "img_embeddings.img_linear.weight" in (encoder_state)
        else 2048
    )
    layers = 1 + max(int(k.split(".")[2]) for k in encoder_state if k.startswith("encoder.layer."))
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        type_vocab_size=type_vocab,
        img_dim=img_dim,
    )
    fields.update(overrides)
    return UniterConfig(**fields)


def resolve_config(
    config: Optional[Union[UniterConfig, str, PathLike]], encoder_state: dict[str, torch.Tensor], overrides: dict
) -> UniterConfig:
    """A UniterConfig from an object, a preset name, a JSON path, or (None) the weights themselves."""
    if config is None:
        return infer_config(encoder_state, **overrides)
    if isinstance(config, UniterConfig):
        return UniterConfig.from_dict({**config.to_dict(), **overrides})
    path = os.fspath(config)
    if os.path.isfile(path):
        return UniterConfig.from_dict({**UniterConfig.from_json_file(path).to_dict(), **overrides})
    return UniterConfig.preset(path, **overrides)


def load_encoder_state(
    model: UniterModel, encoder_state: dict[str, torch.Tensor], strict: bool = True, source: str = "checkpoint"
) -> None:
    """Copy ``encoder_state`` into ``model`` (cast to each parameter's dtype), checking keys and shapes.

    Unknown keys and shape mismatches are always errors; missing keys are an error when ``strict``, else logged.
    """
    expected = model.state_dict()
    unexpected = sorted(set(encoder_state) - set(expected))
    missing = sorted(set(expected) - set(encoder_state))
    if unexpected:
        raise ValueError(f"{source}: unknown encoder keys {unexpected} (a UniterModel has no such parameters)")
    if missing and strict:
        raise ValueError(
            f"{source}: missing encoder keys {missing}; pass strict=False to keep their random init on purpose"
        )
    if missing:
        logger.warning("%s: %d encoder keys not in the file keep their random init: %s", source, len(missing), missing)
    wrong = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(v.shape)}"
        for k, v in encoder_state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(f"{source}: shape mismatch for " + "; ".join(wrong))
    with torch.no_grad():
        for key, value in encoder_state.items():
            expected[key].copy_(value.to(dtype=expected[key].dtype))


def load_pretrained(
    cls: type,
    path: PathLike,
    config: Optional[Union[UniterConfig, str, PathLike]],
    dtype: Optional[torch.dtype],
    strict: bool,
    overrides: dict,
) -> UniterModel:
    """See :meth:`UniterModel.from_pretrained`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        weights = os.path.join(path, WEIGHTS_NAME)
        config_file = os.path.join(path, CONFIG_NAME)
        for needed in (weights, config_file):
            if not os.path.isfile(needed):
                raise FileNotFoundError(f"{path} is a directory but has no {os.path.basename(needed)}")
        encoder_state, heads = split_encoder_state(load_file(weights))
        model_config = resolve_config(config if config is not None else config_file, encoder_state, overrides)
    elif os.path.isfile(path):
        raw = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(raw).__name__}")
        encoder_state, heads = split_encoder_state(raw)
        model_config = resolve_config(config, encoder_state, overrides)
    else:
        raise FileNotFoundError(f"no checkpoint at {path}")
    if heads:
        logger.info("%s: ignoring %d head keys (not part of UniterModel): %s", path, len(heads), heads)
    model = cls(model_config)
    if dtype is not None:
        model.to(dtype)
    load_encoder_state(model, encoder_state, strict, source=path)
    return model


def _atomic_write(path: str, write: Any) -> None:
    """Write through ``write(tmp_path)`` to a temp file beside ``path``, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_pretrained(model: UniterModel, directory: str) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed)."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    model.config.to_json_file(os.path.join(directory, CONFIG_NAME))


def export_original_checkpoint(
    state_dict: dict[str, torch.Tensor],
    path: PathLike,
    prefix: str = ENCODER_PREFIX,
    dtype: torch.dtype = torch.float16,
) -> None:
    """Write ``state_dict`` the way the original code saved ``uniter-base.pt``: keys prefixed with ``uniter.``
    (for UniterModel keys; keys that already carry it, or head keys given with their own names, are kept), tensors
    cast to fp16 on the CPU, one ``torch.save`` file. Readable by the original loader and by ``from_pretrained``."""
    out = {}
    for key, value in state_dict.items():
        name = key if key.startswith(prefix) or key.startswith(PRETRAINING_HEAD_PREFIXES) else prefix + key
        tensor = value.detach().cpu()
        out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    _atomic_write(os.fspath(path), lambda tmp: torch.save(out, tmp))
