"""Task-model checkpoints: the task-specific decisions of loading a checkpoint into a task model, and the export.

The file I/O, the layouts and the checked copies are :mod:`uniter_fast.checkpoint`'s; this module decides, from the
keys of a checkpoint in the original names:

* **fine-tuned** (the task's head keys are present, e.g. ``vqa_output.*``): a checkpoint saved by the original
  ``train_<task>.py`` (``ckpt/model_step_N.pt``: ``uniter.*`` + the head, the grown embedding tables included) or by
  ``finetune.py``. It loads **strictly**: every key of the task model must be there, with its shape, and nothing
  else. Options fixed by the head (NLVR2 variant, RE ``mlp``, VQA answer count) are read off the keys, the others
  that an export fixes off its ``task.json``.
* **pretrained** (no head keys): ``uniter-base.pt``, a pretraining export, a VCR second-stage export, a
  ``Model.save_pretrained`` folder, a BERT-style file or a DeepSpeed checkpoint of a pretraining run. The encoder
  keys must all match (a BERT-style file has no image embedder: it keeps its fresh init); the other keys are skipped
  and the task head keeps its fresh init (both logged), then the task grows its tables (NLVR2 / VCR type rows, VCR
  tags) as the original calls ``init_type_embedding`` after ``from_pretrained``.

Before the model is built, the checkpoint is checked against what the databases fix (``Task.check_data`` with the
``DataFacts`` of ``Task.data_options``: answer maps, VCR's object tags, the word vocabulary), a ``CheckpointError``
naming both files on a mismatch. The load log names what was loaded, what the task derived from the checkpoint's
other keys (ITM's ``itm_output`` / ``rank_output``), what was skipped and what was initialised freshly.

The model config is the one given, else the checkpoint's own (``config.json`` of an export or beside a file, the
original's ``../log/model.json``), else read off the weights (heads = H / 64, as every UNITER/BERT size); the
embedding-table sizes always come from the weights.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Union

import torch

from uniter_fast.checkpoint import (
    ENCODER_PREFIX,
    PRETRAINING_HEAD_PREFIXES,
    Checkpoint,
    checkpoint_config,
    export_original_checkpoint,
    infer_config,
    load_state,
    log_load,
    read_checkpoint,
    resolve_config,
    save_pretrained,
)
from uniter_fast.config import UniterConfig
from uniter_fast.errors import CheckpointError
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks import TASKS
from uniter_fast.tasks.spec import DATA_FACTS, CheckpointView, Task

logger = logging.getLogger(__name__)

TASK_FILE = "task.json"
VOCAB_FILE = "vocab.txt"
"""The WordPiece vocab beside an export's weights (inference reads it when no vocab is given)."""


def head_keys(task: Task, state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``state`` that mark a fine-tuned ``task`` checkpoint (its :attr:`~Task.finetuned_heads`, or any head)."""
    heads = task.finetuned_heads or task.heads
    return sorted(k for k in state if k.split(".", 1)[0] in heads)


def check_evaluable(task: Task, ckpt: Checkpoint) -> None:
    """A ``CheckpointError`` unless ``ckpt`` can be evaluated as ``task``: it holds the task's fine-tuned head, or no
    other task's head and the task's head comes from the pretraining heads (:attr:`Task.evaluates_pretrained`);
    otherwise the task's head would be a random init and its scores meaningless."""
    if head_keys(task, ckpt.state):
        return
    heads = {k.split(".", 1)[0] for k in ckpt.state if not k.startswith((ENCODER_PREFIX, *PRETRAINING_HEAD_PREFIXES))}
    other = sorted(n for n, t in TASKS.items() if heads & set(t.finetuned_heads or t.heads))
    if other:
        raise CheckpointError(
            f"--task {task.name}: {ckpt.path} holds the head of {other} ({sorted(heads)}), not of {task.name}"
        )
    if not task.evaluates_pretrained:
        raise CheckpointError(
            f"--task {task.name}: {ckpt.path} holds no fine-tuned {task.name} head (a pretrained encoder?), so its "
            f"scores would come from a random head; fine-tune it first (finetune.py --task {task.name} --checkpoint "
            "...)"
        )


def checkpoint_task(state: dict[str, torch.Tensor], name: Optional[str] = None) -> Optional[Task]:
    """The task whose fine-tuned head ``state`` holds (pretraining heads do not count), None when it holds none;
    ``name`` picks among the tasks sharing the head's names (VQA / VE, ITM / ITM-hn) and must be one of them. A
    ``CheckpointError`` when several tasks fit and ``name`` is not given."""
    heads = {k.split(".", 1)[0] for k in state if not k.startswith((ENCODER_PREFIX, *PRETRAINING_HEAD_PREFIXES))}
    fits = sorted(n for n, task in TASKS.items() if heads & set(task.finetuned_heads or task.heads))
    if name is not None:
        if not fits:
            raise CheckpointError(
                f"--task {name}: the checkpoint holds no fine-tuned head (a pretrained encoder?); fine-tune it first "
                f"(finetune.py --task {name} --checkpoint ...)"
            )
        if name not in fits:
            raise CheckpointError(f"--task: the checkpoint's heads {sorted(heads)} fit {fits}, not {name!r}")
        return TASKS[name]
    if len(fits) > 1:
        raise CheckpointError(f"--task: the checkpoint's heads {sorted(heads)} fit the tasks {fits}; name one")
    return TASKS[fits[0]] if fits else None


def task_model_config(
    ckpt: Checkpoint, config: Union[UniterConfig, str, None] = None, overrides: Optional[dict[str, Any]] = None
) -> UniterConfig:
    """The model config of a task model initialised from ``ckpt``: ``config`` (a ``UniterConfig``, a preset name or
    a config JSON), else the checkpoint's own, else read off its weights; the embedding tables' sizes always from
    the weights (a fine-tuned model's tables may have been grown); ``overrides`` applied last."""
    inferred = infer_config(ckpt.encoder_state)
    tables = {"vocab_size": inferred.vocab_size, "type_vocab_size": inferred.type_vocab_size}
    return checkpoint_config(ckpt, config, {**tables, **(overrides or {})})


def load_task_model(
    task: Task,
    checkpoint: Union[str, Checkpoint, None],
    options: dict[str, Any],
    config: Union[UniterConfig, str, None] = None,
    fast: bool = True,
    config_overrides: Optional[dict[str, Any]] = None,
) -> tuple[UniterPreTrainedModel, dict[str, Any]]:
    """The task model initialised from ``checkpoint`` (a path, or a checkpoint already read; None: fresh, from
    ``config``, default the ``tiny`` preset), and the options completed by the checkpoint (head-fixed options win
    over ``options``, with a warning when they differ). ``options`` may hold what ``task.data_options`` read off the
    databases: the checkpoint is checked against it first (``Task.check_data``: answer maps, special tokens, the
    vocabulary), a ``CheckpointError`` naming both files on a mismatch; the returned options no longer hold
    :data:`DATA_FACTS`."""
    overrides = dict(config_overrides or {})
    options = {**task.options, **options}  # the task's defaults for options not given
    data = options.pop(DATA_FACTS, None)
    if checkpoint is None:
        base = resolve_config(config or "tiny")
        model = task.build_model(UniterConfig.from_dict({**base.to_dict(), **overrides}), options, fast)
        task.prepare_model(model, options)
        logger.warning("task %s: no checkpoint; the whole model starts from a random init", task.name)
        return model, options
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    checkpoint = ckpt.path
    state = ckpt.state
    finetuned = head_keys(task, state)
    view = checkpoint_view(ckpt, bool(finetuned))
    if finetuned and view.task_file is None:
        logger.info(
            "%s: no %s (an original train_%s.py checkpoint): the options it was trained with are unknown, only "
            "what its weights fix is checked against the databases",
            checkpoint,
            TASK_FILE,
            task.name,
        )
    task.check_data(view, options, data)
    if finetuned:
        saved = view.saved_options
        if task.checkpoint_options is not None:
            saved = {k: v for k, v in saved.items() if k in task.checkpoint_options}
        fixed = {**saved, **task.options_from_state(state)}
        # a task default the checkpoint overrides is no conflict (the caller's options come with the defaults filled)
        defaults, conflicts = {}, {}
        for key, value in fixed.items():
            if key in options and options[key] != value:
                is_default = key in task.options and options[key] == task.options[key]
                (defaults if is_default else conflicts)[key] = (options[key], value)
        if defaults:
            logger.info("%s: the checkpoint sets options %s (default, checkpoint)", checkpoint, defaults)
        if conflicts:
            logger.warning(
                "%s: the checkpoint fixes options %s (given, checkpoint); using the checkpoint's", checkpoint, conflicts
            )
        options = {**options, **fixed}
    model = task.build_model(task_model_config(ckpt, config, overrides), options, fast)
    if finetuned:
        state, derived = task.complete_state(state, options)
        load_state(model, state, checkpoint)
        for module, origin in derived.items():
            logger.info("%s: %s of %s from %s", checkpoint, module, type(model).__name__, origin)
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
    # a BERT-style file (or LightningDOT's text tower) has no image embedder: it keeps its fresh init (logged), as in
    # the original's loose load
    report = load_state(model, state, checkpoint, encoder_only=True, strict=not ckpt.text_only, log=False)
    derived = task.init_from_pretrained(model, state)
    log_load(report, checkpoint, type(model).__name__, derived)
    task.prepare_model(model, options)
    return model, options


def checkpoint_view(ckpt: Checkpoint, finetuned: bool) -> CheckpointView:
    """``ckpt`` as ``Task.check_data`` sees it: with its ``task.json`` and the options saved there (a fine-tuned
    directory checkpoint of ours; none for a single file or a pretrained checkpoint)."""
    record = ckpt.side_file(TASK_FILE) if finetuned else None
    if record is None:
        return CheckpointView(ckpt.path, ckpt.state, finetuned)
    return CheckpointView(
        ckpt.path, ckpt.state, finetuned, os.path.join(ckpt.path, TASK_FILE), dict(record.get("options", {}))
    )


def save_task_model(
    model: UniterPreTrainedModel, task: Task, options: dict[str, Any], directory: str, step: Optional[int] = None
) -> None:
    """Write ``config.json`` + ``model.safetensors`` (fp32) + ``task.json`` into ``directory``, and with ``step``
    also ``model_step_{step}.pt`` in the original layout (the keys of ``train_<task>.py``'s ModelSaver, fp16)."""
    record = {"task": task.name, "options": options}
    save_pretrained(model, directory, dtype=torch.float32, side_files={TASK_FILE: record})
    if step is not None:
        export_original_checkpoint(model.state_dict(), os.path.join(directory, f"model_step_{step}.pt"), prefix="")
