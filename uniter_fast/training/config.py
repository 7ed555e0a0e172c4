"""The fields every run config shares (``pretrain.py``'s training config and ``finetune.py``'s fine-tuning config),
their defaults and their checks, written once. ``capture`` (default false) replays the training step's forward and
backward as CUDA graphs on fixed-shape batches (``uniter_fast.training.capture``).

A recipe's config subclasses :class:`RunConfig` (re-declaring a default where the original's recipes differ, e.g.
pretraining's 10240-token batches) and adds its own fields; :func:`parse_run_config` checks a JSON object against the
class (unknown and missing keys, the shared fields' values, the checkpoint path) and :func:`check_run_fields` is the
one check of the shared values. The names are the original's (``config/pretrain-*.json``, ``config/train-*.json``).
Optimizer settings that the original keeps in its run configs (``gradient_accumulation_steps``, ``grad_norm``,
``weight_decay``, ``betas``) override ``ds.json``'s when given (``uniter_fast.training.engine``).
``tokens_per_update`` (optional) fixes an update's tokens and derives the accumulation from the micro-batch budget and
the ranks; ``train_batch_size`` may be ``"auto"`` where the recipe allows it (:mod:`uniter_fast.training.budget`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, ClassVar, Optional, TypeVar, Union

from uniter_fast import hub
from uniter_fast.config import UniterConfig
from uniter_fast.errors import ConfigError, closest
from uniter_fast.files import read_json
from uniter_fast.json_types import check_types, is_number
from uniter_fast.training.budget import AUTO, BudgetModel

C = TypeVar("C", bound="RunConfig")

POSITIVE_FIELDS = (
    "val_batch_size",
    "num_train_steps",
    "learning_rate",
    "valid_steps",
    "save_steps",
    "max_txt_len",
    "max_bb",
    "min_bb",
    "num_bb",
)


@dataclasses.dataclass
class RunConfig:
    """The shared fields (defaults: the original fine-tuning scripts'; a recipe may re-declare them)."""

    output_dir: str = ""
    checkpoint: Optional[str] = None
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    train_batch_size: Union[int, str] = 4096
    val_batch_size: int = 4096
    num_train_steps: int = 100000
    warmup_steps: int = 4000
    learning_rate: float = 3e-5
    valid_steps: int = 1000
    save_steps: Optional[int] = None
    gradient_accumulation_steps: Optional[int] = None
    tokens_per_update: Optional[int] = None
    grad_norm: Optional[float] = None
    weight_decay: Optional[float] = None
    betas: Optional[list[float]] = None
    max_txt_len: int = 60
    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10
    num_bb: int = 36
    fast: bool = True
    capture: bool = False
    seed: int = 42
    num_workers: Optional[int] = None

    required: ClassVar[tuple[str, ...]] = ("output_dir",)
    """Keys a config file must give."""
    auto_budget: ClassVar[bool] = False
    """Whether ``train_batch_size`` may be ``"auto"`` (the recipe gives :meth:`budget_model`)."""

    def budget_model(self) -> Optional[BudgetModel]:
        """(model config, training task kinds, model size) that size an ``"auto"`` budget; None where the recipe has
        none."""
        return None

    def run_outputs(self) -> tuple[str, ...]:
        """The files and directories under ``output_dir`` that the recipe writes besides the training floor's (the
        logs, ``tb/``, ``ckpt/``): its export, pictures, predictions. With those they make a run's outputs, which
        ``--overwrite`` removes (``uniter_fast.training.outputs``)."""
        return ()


def field_names(cls: type) -> list[str]:
    """The dataclass fields of ``cls``, in order."""
    return [f.name for f in dataclasses.fields(cls)]


def check_keys(where: str, raw: Any, cls: type, extra: tuple[str, ...] = ()) -> None:
    """``raw`` must be a JSON object whose keys are fields of ``cls`` (or ``extra``); else one error naming ``where``,
    the unknown keys and the allowed ones."""
    if not isinstance(raw, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(raw).__name__}")
    allowed = set(field_names(cls)) | set(extra)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        hint = closest(unknown[0], allowed) if len(unknown) == 1 else ""
        raise ConfigError(f"{where}: unknown keys {unknown}{hint}; allowed: {sorted(allowed)}")


def resolve_path(path: str, base_dir: str) -> str:
    """A path of a config file: absolute as given, relative to the file's directory ``base_dir``."""
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def valid_betas(betas: Any) -> bool:
    """Whether ``betas`` (AdamW's, from a run config or ds.json) is two numbers in [0, 1)."""
    return isinstance(betas, list) and len(betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in betas)


def check_run_fields(cfg: RunConfig) -> None:
    """Check the shared fields' values (``save_steps`` defaults to ``valid_steps``); ``ValueError`` naming the field,
    what it must be and the value given."""
    if not cfg.output_dir:
        raise ValueError("output_dir must be a folder path, got ''")
    if cfg.save_steps is None:
        cfg.save_steps = cfg.valid_steps
    for name in POSITIVE_FIELDS:
        value = getattr(cfg, name)
        if not is_number(value) or value <= 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")
    budget = cfg.train_batch_size
    if budget == AUTO and not cfg.auto_budget:
        raise ValueError(
            f'train_batch_size "{AUTO}" sizes pretraining\'s micro-batches only; give a number, got "{AUTO}"'
        )
    if budget != AUTO and (not is_number(budget) or budget <= 0):
        auto = f' (or "{AUTO}": sized from the GPU\'s memory)' if cfg.auto_budget else ""
        raise ValueError(f"train_batch_size must be a number > 0, got {budget!r}{auto}")
    tokens = cfg.tokens_per_update
    if tokens is not None and (not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1):
        raise ValueError(f"tokens_per_update must be an integer >= 1 (tokens of one optimizer update), got {tokens!r}")
    if not is_number(cfg.warmup_steps) or cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    accum = cfg.gradient_accumulation_steps
    if accum is not None and (not isinstance(accum, int) or isinstance(accum, bool) or accum < 1):
        raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {accum!r}")
    if cfg.grad_norm is not None and (not is_number(cfg.grad_norm) or (cfg.grad_norm <= 0 and cfg.grad_norm != -1)):
        raise ValueError(f"grad_norm must be a number > 0, or -1 for no clipping, got {cfg.grad_norm!r}")
    if cfg.weight_decay is not None and (not is_number(cfg.weight_decay) or cfg.weight_decay < 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {cfg.weight_decay!r}")
    betas = cfg.betas
    if betas is not None and not valid_betas(betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not isinstance(cfg.capture, bool):
        raise ValueError(f"capture must be true or false, got {cfg.capture!r}")
    if cfg.capture and not cfg.fast:
        raise ValueError("capture needs the fast path (fixed-shape packed batches): set fast true or capture false")
    if cfg.num_workers is not None and (not isinstance(cfg.num_workers, int) or cfg.num_workers < 0):
        raise ValueError(f"num_workers must be an integer >= 0, got {cfg.num_workers!r}")
    check_model_overrides(cfg.model_overrides)


def check_model_overrides(overrides: Any) -> None:
    """``model_overrides`` must map fields of the model config (``UniterConfig``) to values; a ``ConfigError``
    naming an unknown field and the closest one (the model config itself ignores unknown keys, as the original's
    files carry some)."""
    if not isinstance(overrides, dict):
        raise ConfigError(f"model_overrides must be a JSON object, got {type(overrides).__name__}")
    fields = field_names(UniterConfig)
    for key in overrides:
        if key not in fields:
            raise ConfigError(f"model_overrides: {key!r} is not a model config field{closest(key, fields)}")
    check_types(UniterConfig, overrides, "model_overrides")


def read_run_config(path: str, what: str, checkpoint_given: bool) -> tuple[Any, str]:
    """The JSON value of the run config file ``path`` (``what`` names it in errors) and the file's directory, which
    relative paths in it are relative to. With ``checkpoint_given`` (a ``--checkpoint`` on the command line replaces
    it) the file's ``checkpoint`` is dropped unread."""
    raw = read_json(path, what)
    if checkpoint_given and isinstance(raw, dict):
        raw.pop("checkpoint", None)
    return raw, os.path.dirname(os.path.abspath(path))


def parse_run_config(
    cls: type[C],
    raw: dict[str, Any],
    where: str,
    base_dir: str,
    resolve: Optional[Callable[[str], str]] = None,
) -> C:
    """``cls(**raw)`` after the shared checks: ``raw`` a JSON object with only ``cls``'s fields and every one of
    ``cls.required``; the shared values (:func:`check_run_fields`); ``checkpoint`` resolved (by ``resolve``, else
    relative to ``base_dir``; a Hugging Face Hub id ``org/name``: its local snapshot) and required to exist. The
    recipe checks its own fields afterwards."""
    check_keys(where, raw, cls)
    missing = sorted(set(cls.required) - set(raw))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    check_types(cls, raw, where)
    cfg = cls(**raw)
    try:
        check_run_fields(cfg)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    if cfg.checkpoint:
        given, cfg.checkpoint = cfg.checkpoint, (resolve or (lambda p: resolve_path(p, base_dir)))(cfg.checkpoint)
        if not os.path.exists(cfg.checkpoint) and hub.is_hub_id(given):  # a Hub model: its local snapshot folder
            cfg.checkpoint = hub.resolve(given)
        if not os.path.exists(cfg.checkpoint):
            raise FileNotFoundError(f"{where}: checkpoint {cfg.checkpoint!r} does not exist")
    return cfg
