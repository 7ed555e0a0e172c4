"""Checking the values of a JSON object against the field types of the dataclass it configures (run configs, the
model config, their nested blocks): a whole number where an ``int`` is declared, ``true``/``false`` for a ``bool``,
a string for a ``str``, and so on, so that ``"num_train_steps": 2.5`` or ``"fast": "false"`` is refused in one line
naming the key instead of running a different job than the file says."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Optional, Union

from uniter_fast.errors import ConfigError

NoneType = type(None)


def is_number(value: Any) -> bool:
    """Whether the JSON ``value`` is a number (an int or a float; ``true`` / ``false`` are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def matches(value: Any, hint: Any) -> Optional[bool]:
    """Whether the JSON ``value`` has the type ``hint`` (``int``, ``float``, ``bool``, ``str``, ``None``, ``Any``,
    ``Optional``/``Union``, ``list[...]``, ``dict[...]``); None for a type this check does not know (a nested
    dataclass, checked where it is parsed)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is NoneType:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return is_number(value)
    if hint is str:
        return isinstance(value, str)
    if origin is Union:
        results = [matches(value, arg) for arg in args]
        return True if any(results) else (None if None in results else False)
    if origin is list:
        if not isinstance(value, list):
            return False
        inner = [matches(item, args[0]) for item in value] if args else []
        return None if None in inner else all(inner)
    if origin is dict:
        return isinstance(value, dict)
    return None


def describe(hint: Any) -> str:
    """What ``hint`` asks for, in words (``"an integer"``, ``"a list of numbers or null"``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", NoneType: "null"}
    if hint in words:
        return words[hint]
    if origin is Union:
        return " or ".join(describe(arg) for arg in args)
    if origin is list:
        inner = describe(args[0]) if args else "values"
        return f"a list of {inner.removeprefix('an ').removeprefix('a ')}s" if args else "a list"
    if origin is dict:
        return "a JSON object"
    return getattr(hint, "__name__", str(hint))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of the dataclass ``cls`` (its annotations are strings)."""
    return typing.get_type_hints(cls)


def check_types(cls: type, values: dict[str, Any], where: str) -> None:
    """A ``ConfigError`` ``"<where>: <key> must be <type>, got <value>"`` for the first entry of ``values`` whose
    value does not have the type of ``cls``'s field of that name (keys that are no field are left to the caller)."""
    hints = _hints(cls)
    fields = {field.name for field in dataclasses.fields(cls)}
    for key, value in values.items():
        if key in fields and matches(value, hints[key]) is False:
            raise ConfigError(f"{where}: {key} must be {describe(hints[key])}, got {value!r}")
