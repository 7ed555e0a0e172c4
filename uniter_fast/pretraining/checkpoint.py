"""Pretraining checkpoints: initialisation from original or BERT-style files, and the consolidated fp32 export.

* ``uniter-base.pt`` (original UniterForPretraining dump: ``uniter.*`` + heads, fp16) loads key for key.
* BERT-style files (``bert.*`` keys, e.g. pytorch_pretrained_bert ``bert-base-cased``) get the rename of the
  original ``scripts/convert_ckpt.py`` (every ``bert`` in a key becomes ``uniter``), so BERT's ``cls.predictions.*``
  initialises the MLM head; NSP (``cls.seq_relationship.*``) is dropped; image parts keep their random init.
* The export writes ``config.json`` + ``model.safetensors`` (all pretraining keys, fp32), which
  ``uniter_fast.Model.from_pretrained(dir)`` loads (it takes the ``uniter.*`` part and lists the head keys).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

import torch
from safetensors.torch import save_file

from uniter_fast.model.checkpoint import CONFIG_NAME, WEIGHTS_NAME, rename_legacy_layer_norm
from uniter_fast.pretraining.model import UniterForPretraining

logger = logging.getLogger(__name__)

IGNORED_PREFIXES = ("cls.seq_relationship.",)


@dataclasses.dataclass
class LoadReport:
    """What an init checkpoint did: keys it filled, keys left at random init, keys in the file that were dropped."""

    loaded: list[str]
    missing: list[str]
    ignored: list[str]


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A ``torch.save`` state_dict file (``.pt``/``.bin``), or a directory / ``.safetensors`` file of ours."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (dict of tensors), got {type(state).__name__}")
    return state


def convert_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original names from a BERT-style or original state_dict: ``gamma``/``beta`` -> ``weight``/``bias``, and (BERT
    files) the plain substring replace ``bert`` -> ``uniter`` of ``convert_ckpt.py``."""
    bert_style = any(k.startswith("bert.") for k in state)
    out = {}
    for key, value in state.items():
        name = rename_legacy_layer_norm(key)
        out[name.replace("bert", "uniter") if bert_style else name] = value
    return out


def load_init_checkpoint(model: UniterForPretraining, path: str) -> LoadReport:
    """Copy the weights of ``path`` into ``model`` (cast to the parameter dtype; the tied tensors stay tied, the
    later key in the file wins as in the original loader). Unknown keys other than BERT's NSP head and any shape
    mismatch are errors naming the keys; missing keys keep their random init and are logged."""
    state = convert_keys(read_state_dict(path))
    expected = model.state_dict()
    ignored = sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    unknown = sorted(k for k in state if k not in expected and k not in ignored)
    if unknown:
        raise ValueError(f"{path}: keys that UniterForPretraining does not have: {unknown}")
    wrong = [
        f"{k}: model {tuple(expected[k].shape)}, file {tuple(v.shape)}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(f"{path}: shape mismatch (is the model config the checkpoint's?): " + "; ".join(wrong))
    loaded = [k for k in state if k in expected]
    with torch.no_grad():
        for key in loaded:
            expected[key].copy_(state[key].to(expected[key].dtype))
    model.tie_weights()
    missing = sorted(set(expected) - set(loaded))
    if missing:
        logger.warning("%s: %d keys keep their random init: %s", path, len(missing), missing)
    if ignored:
        logger.info("%s: ignored %s", path, ignored)
    return LoadReport(loaded=loaded, missing=missing, ignored=ignored)


def export_pretrained(model: UniterForPretraining, directory: str) -> None:
    """Write ``config.json`` + ``model.safetensors`` (every state_dict key, fp32, tied tensors stored under both
    names) into ``directory`` atomically; ``uniter_fast.Model.from_pretrained(directory)`` loads the encoder."""
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).clone().contiguous() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=WEIGHTS_NAME)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(directory, WEIGHTS_NAME))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    model.config.to_json_file(os.path.join(directory, CONFIG_NAME))
