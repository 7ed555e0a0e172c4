"""The project's error types: what a user gave wrong (an argument, a file, a config, data), told apart from a run
that failed and from a bug.

Every CLI prints a :class:`UserError` as one line, ``error: <what>, <where>, <expected vs given>``, and exits 2; a
:class:`RunFailed` exits 1. The subclasses are also ``ValueError`` so that code catching the built-in keeps working.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake in what the user gave; the message names it, where it is, and the expected and given values."""


class ConfigError(UserError, ValueError):
    """A run config, ``ds.json``, a model config or a command-line value is wrong."""


class DataError(UserError, ValueError):
    """A database, an annotation or a feature file is missing, corrupted or malformed; the message names the file and
    the record."""


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot serve the model or the data it is used with (layout, sizes, answer vocabulary, ...)."""


class RunFailed(Exception):
    """A run that started correctly could not finish (a non-finite loss, a rank that died); CLIs exit 1."""


def closest(name: str, valid: Iterable[str]) -> str:
    """``" (closest: 'x')"``, naming the valid name most like ``name`` (difflib), for an error message; ``""`` when
    none is alike."""
    match = difflib.get_close_matches(name, sorted(valid), n=1, cutoff=0.5)
    return f" (closest: {match[0]!r})" if match else ""
