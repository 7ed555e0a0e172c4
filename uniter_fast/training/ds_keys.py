"""``ds.json`` checked by the DeepSpeed that will run it, before any process group exists: its own config reader
(``deepspeed.runtime.config.DeepSpeedConfig``) validates the values and the sections it has pydantic models for
(``zero_optimization`` and its offload sections, ``bf16``, ``fp16``, the monitors, ``compile``, ...), and a key that
it never reads is an unknown key (DeepSpeed ignores those silently: ``train_micro_batch_sise`` would be lost).

The known top-level keys are the ones the reader looks up, recorded while it reads this very config, so they follow
the installed DeepSpeed version; the nested keys are its pydantic models' fields. Every message names the file, the
key path and the closest valid key (difflib). Keys of another DeepSpeed version can be let through (with a warning).
Sections that DeepSpeed reads without a model (``activation_checkpointing``, ``flops_profiler``, ``optimizer.params``,
which goes to the optimizer's constructor, ...) are checked at their top level only.
"""

from __future__ import annotations

import copy
import logging
import typing
from collections.abc import KeysView
from typing import Any, Optional

from uniter_fast.errors import ConfigError, closest

logger = logging.getLogger(__name__)

INITIALIZE_KEYS = frozenset({"data_parallel_size", "sequence_parallel_size"})
"""Top-level keys that ``deepspeed.initialize`` reads itself (the data / sequence-parallel mesh), not its reader."""


class _ReadRecorder(dict):
    """A dict that records, in order, the keys looked up in it (``get``, ``[]``, ``in``, ``keys()``); its copies
    (``copy.copy``, as the reader makes) record into the same list."""

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.read: list[str] = []

    def get(self, key: Any, default: Any = None) -> Any:
        self.read.append(key)
        return super().get(key, default)

    def __getitem__(self, key: Any) -> Any:
        self.read.append(key)
        return super().__getitem__(key)

    def __contains__(self, key: Any) -> bool:
        self.read.append(key)
        return super().__contains__(key)

    def keys(self) -> KeysView:  # type: ignore[override]
        return KeysView(self)  # its ``in`` goes through __contains__


def _model_class(name: str) -> Optional[type]:
    """The DeepSpeed pydantic config model called ``name`` (a ``DeepSpeedConfigModel`` subclass), if any."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    todo = [DeepSpeedConfigModel]
    while todo:
        cls = todo.pop()
        if cls.__name__ == name:
            return cls
        todo.extend(cls.__subclasses__())
    return None


def _submodel(annotation: Any) -> Optional[type]:
    """The pydantic model inside a field's annotation (``Optional[M]``, ``Union[M, ...]``, ``M``), if any."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((m for m in map(_submodel, typing.get_args(annotation)) if m is not None), None)


def model_keys(model: str, path: tuple[str, ...]) -> list[str]:
    """The valid keys at ``path`` inside DeepSpeed's config model ``model`` (fields and their aliases); [] when the
    model or a section on the path is not found."""
    cls = _model_class(model)
    for name in path:
        field = None if cls is None else cls.model_fields.get(name)
        cls = None if field is None else _submodel(field.annotation)
    if cls is None:
        return []
    return sorted({*cls.model_fields, *(f.alias for f in cls.model_fields.values() if f.alias)})


def _holds(ds: Any, path: tuple[Any, ...]) -> bool:
    for key in path:
        if not isinstance(ds, dict) or key not in ds:
            return False
        ds = ds[key]
    return True


def _section(ds: dict[str, Any], loc: tuple[Any, ...], read: list[str]) -> tuple[str, ...]:
    """The top-level section that a pydantic error at ``loc`` belongs to: none when ``loc`` starts at the top level,
    else the latest section the reader read that holds ``loc`` (the one its failing model was built from)."""
    if _holds(ds, loc):
        return ()
    for key in reversed(read):
        if isinstance(key, str) and _holds(ds.get(key), loc):
            return (key,)
    return ()


def _pydantic_message(err: Any, ds: dict[str, Any], read: list[str], source: str) -> str:
    problems = []
    for error in err.errors():
        loc = tuple(error["loc"])
        path = _section(ds, loc, read) + loc
        dotted = ".".join(map(str, path))
        if error["type"] == "extra_forbidden":
            valid = model_keys(err.title, tuple(map(str, loc[:-1])))
            problems.append(f"unknown key {dotted!r}{closest(str(loc[-1]), valid)}")
        else:
            problems.append(f"{dotted}: {error['msg']} (given {error.get('input')!r})")
    return f"{source}: " + "; ".join(problems)


def check_with_deepspeed(ds: dict[str, Any], source: str, allow_unknown_keys: bool = False) -> None:
    """Validate the completed DeepSpeed config ``ds`` with DeepSpeed's own reader (no process group needed, a few
    ms): a ``ConfigError`` naming ``source`` for a value or a nested key it rejects, and for a top-level key it does
    not read, with the closest valid key; ``allow_unknown_keys`` turns the last into a warning (for keys of another
    DeepSpeed version, which this one ignores)."""
    import deepspeed
    from deepspeed.runtime import config as config_module
    from deepspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
    from pydantic import ValidationError

    recorder = _ReadRecorder(copy.deepcopy(ds))  # the reader may complete sections in place; ``ds`` stays as given
    try:
        DeepSpeedConfig(recorder)
    except ValidationError as err:
        raise ConfigError(_pydantic_message(err, ds, recorder.read, source)) from None
    except (DeepSpeedConfigError, AssertionError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{source}: DeepSpeed {deepspeed.__version__} rejects it: {err}") from None
    removed = getattr(config_module, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})  # read only to be refused
    known = {k for k in recorder.read if isinstance(k, str) and k not in removed} | INITIALIZE_KEYS
    unknown = sorted(set(ds) - known - set(removed))
    if not unknown:
        return
    message = f"{source}: unknown key" + ("s " if len(unknown) > 1 else " ")
    message += ", ".join(f"{key!r}{closest(key, known)}" for key in unknown)
    if not allow_unknown_keys:
        raise ConfigError(
            f"{message} (DeepSpeed {deepspeed.__version__} does not read it; --allow_unknown_ds_keys lets keys of "
            "other DeepSpeed versions through)"
        )
    logger.warning("%s: DeepSpeed %s ignores it (--allow_unknown_ds_keys)", message, deepspeed.__version__)
