"""Task-model checkpoints: load a fine-tuned or a pretrained checkpoint into a task model; save both layouts.

Two cases, told apart by the file's keys:

* **fine-tuned** (the task's head keys are present, e.g. ``vqa_output.*``): a checkpoint saved by the original
  ``train_<task>.py`` (``ckpt/model_step_N.pt``: ``uniter.*`` + the head, the grown embedding tables included) or by
  ``finetune.py``. It loads **strictly**: every key of the task model must be there, with its shape, and nothing
  else. Options fixed by the head (NLVR2 variant, RE ``mlp``, VQA answer count) are read off the keys.
* **pretrained** (no head keys): ``uniter-base.pt``, a pretraining export, a VCR second-stage export or a BERT-style
  file. The encoder keys must all match (unknown keys are an error; pretraining-head keys are skipped and logged),
  the head keeps its fresh init (logged), then the task grows its tables (NLVR2 / VCR type rows, VCR tags) as the
  original calls ``init_type_embedding`` after ``from_pretrained``.

The model config is the one given, else the checkpoint's own (an export's ``config.json``; for a single file, the
``config.json`` beside it or the original's ``../log/model.json``), else read off the weights (heads = H / 64, as
every UNITER/BERT size); the embedding-table sizes always come from the weights.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional, Union

import torch

from uniter_fast.config import UniterConfig
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.model.checkpoint import (
    CONFIG_NAME,
    PRETRAINING_HEAD_PREFIXES,
    _atomic_write,
    export_original_checkpoint,
    infer_config,
    save_pretrained,
)
from uniter_fast.pretraining.checkpoint import convert_keys, read_state_dict
from uniter_fast.tasks.spec import Task

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"
ENCODER = "uniter."


def saved_config_path(path: str) -> Optional[str]:
    """The model config saved with checkpoint ``path``: ``config.json`` in an export directory or beside a file
    (``finetuned/model_step_N.pt``), or the original's ``log/model.json`` beside a file's ``ckpt/``; None if none."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    candidates = [os.path.join(folder, CONFIG_NAME)]
    if not os.path.isdir(path):
        candidates.append(os.path.join(folder, os.pardir, "log", "model.json"))
    return next((c for c in candidates if os.path.isfile(c)), None)


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], Optional[UniterConfig], dict[str, Any]]:
    """(state_dict with the original names, its saved config if any (:func:`saved_config_path`), its task.json if
    any) of a ``.pt`` / ``.safetensors`` file or a directory written by ``finetune.py`` / ``pretrain.py``."""
    state = convert_keys(read_state_dict(path))
    config, meta = None, {}
    config_path = saved_config_path(path)
    if config_path is not None:
        config = UniterConfig.from_json_file(config_path)
        logger.info("%s: model config from %s", path, config_path)
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, TASK_FILE)):
        with open(os.path.join(path, TASK_FILE), encoding="utf-8") as f:
            meta = json.load(f)
    return state, config, meta


def head_keys(task: Task, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``state`` that mark a fine-tuned ``task`` checkpoint (its :attr:`~Task.finetuned_heads`, or any head)."""
    heads = task.finetuned_heads or task.heads
    return sorted(k for k in state if k.split(".", 1)[0] in heads)


def resolve_model_config(config: Union[UniterConfig, str, None]) -> UniterConfig:
    """A ``UniterConfig``, a preset name ("tiny", "base", "large") or a config JSON path -> ``UniterConfig``."""
    if isinstance(config, UniterConfig):
        return config
    if config is not None and os.path.isfile(config):
        return UniterConfig.from_json_file(config)
    return UniterConfig.preset(config or "tiny")


def _config(state: dict[str, torch.Tensor], saved: Optional[UniterConfig], given: Any, overrides: dict) -> UniterConfig:
    """The model config of a checkpoint: ``given`` (or the saved config.json, or the sizes read off the weights),
    with the embedding-table sizes always taken from the weights (they may have been grown)."""
    encoder = {k[len(ENCODER) :]: v for k, v in state.items() if k.startswith(ENCODER)}
    if not encoder:
        raise ValueError("the checkpoint has no 'uniter.*' encoder keys; is it a UNITER checkpoint?")
    inferred = infer_config(encoder)
    if given is None and saved is None:
        logger.warning(
            "no model config given or saved with the checkpoint: sizes read off the weights, %d attention heads "
            "(hidden / 64); give the model config (evaluate.py --model_config) if the model has another head count",
            inferred.num_attention_heads,
        )
    base = resolve_model_config(given) if given is not None else (saved or inferred)
    tables = {"vocab_size": inferred.vocab_size, "type_vocab_size": inferred.type_vocab_size}
    return UniterConfig.from_dict({**base.to_dict(), **tables, **overrides})


def load_task_model(
    task: Task,
    checkpoint: Optional[str],
    options: dict[str, Any],
    config: Union[UniterConfig, str, None] = None,
    fast: bool = True,
    config_overrides: Optional[dict[str, Any]] = None,
) -> tuple[UniterPreTrainedModel, dict[str, Any]]:
    """The task model initialised from ``checkpoint`` (None: fresh, from ``config``), and the options completed by
    the checkpoint (head-fixed options win over ``options``, with a warning when they differ)."""
    overrides = dict(config_overrides or {})
    options = {**task.options, **options}  # the task's defaults for options not given
    if checkpoint is None:
        base = resolve_model_config(config)
        model = task.build_model(UniterConfig.from_dict({**base.to_dict(), **overrides}), options, fast)
        task.prepare_model(model, options)
        logger.warning("task %s: no checkpoint; the whole model starts from a random init", task.name)
        return model, options
    state, saved_config, meta = read_checkpoint(checkpoint)
    finetuned = head_keys(task, state)
    if finetuned:
        saved = meta.get("options", {})
        if task.checkpoint_options is not None:
            saved = {k: v for k, v in saved.items() if k in task.checkpoint_options}
        fixed = {**saved, **task.options_from_state(state)}
        changed = {k: (options.get(k), v) for k, v in fixed.items() if k in options and options[k] != v}
        if changed:
            logger.warning(
                "%s: the checkpoint fixes options %s (given, checkpoint); using the checkpoint's", checkpoint, changed
            )
        options = {**options, **fixed}
    model_config = _config(state, saved_config, config, overrides)
    model = task.build_model(model_config, options, fast)
    if finetuned:
        load_strict(model, state, checkpoint)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        task.prepare_model(model, options)  # a fine-tuned model's tables already have the task's sizes
        grown = sorted(k for k, v in model.state_dict().items() if shapes.get(k) != tuple(v.shape))
        if grown and not task.grows_loaded_heads:
            raise ValueError(
                f"{checkpoint}: a fine-tuned {task.name} checkpoint must hold the task's embedding "
                f"tables, but {grown} have the pretrained sizes {[shapes[k] for k in grown]}"
            )
        logger.info("%s: loaded the fine-tuned %s model (%d keys)", checkpoint, task.name, len(state))
        return model, options
    load_encoder(model, state, checkpoint)
    task.init_from_pretrained(model, state)
    task.prepare_model(model, options)
    return model, options


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy every key of ``model`` from ``state``: missing / unexpected keys and shape mismatches are errors."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: does not match the task model: missing keys {missing}, unexpected {unexpected}")
    _copy(expected, state, source)


def load_encoder(model: UniterPreTrainedModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Initialise ``model.uniter`` from the ``uniter.*`` keys of ``state`` (all required); pretraining heads are
    skipped, the task head keeps its fresh init; both are logged. Other keys are an error."""
    expected = model.state_dict()
    encoder = {k for k in expected if k.startswith(ENCODER)}
    skipped = sorted(k for k in state if k.startswith(PRETRAINING_HEAD_PREFIXES) or k.startswith("cls.seq_rel"))
    unknown = sorted(k for k in state if k not in encoder and k not in skipped)
    missing = sorted(encoder - set(state))
    if unknown or missing:
        raise ValueError(
            f"{source}: not a UNITER checkpoint for this model: unknown keys {unknown}, missing encoder keys {missing}"
        )
    _copy(expected, {k: state[k] for k in encoder}, source)
    fresh = sorted(set(expected) - encoder)
    logger.info("%s: encoder initialised from the checkpoint; skipped pretraining-head keys %s", source, skipped)
    logger.warning("%s: task head initialised freshly (not in the checkpoint): %s", source, fresh)


def _copy(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], source: str) -> None:
    wrong = [
        f"{k}: model {tuple(expected[k].shape)}, file {tuple(v.shape)}"
        for k, v in state.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if wrong:
        raise ValueError(f"{source}: shape mismatch: " + "; ".join(wrong))
    with torch.no_grad():
        for key, value in state.items():
            expected[key].copy_(value.to(expected[key].dtype))


def save_task_model(
    model: UniterPreTrainedModel, task: Task, options: dict[str, Any], directory: str, step: Optional[int] = None
) -> None:
    """Write ``config.json`` + ``model.safetensors`` + ``task.json`` (fp32) into ``directory``, and with ``step``
    also ``model_step_{step}.pt`` in the original layout (the keys of ``train_<task>.py``'s ModelSaver, fp16)."""
    save_pretrained(model, directory)
    record = {"task": task.name, "options": options}
    _atomic_write(os.path.join(directory, TASK_FILE), lambda tmp: _dump_json(record, tmp))
    if step is not None:
        export_original_checkpoint(model.state_dict(), os.path.join(directory, f"model_step_{step}.pt"), prefix="")


def _dump_json(obj: Any, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
