"""The JSON side files of the databases (``meta.json``, ``id2len.json``, ``nbb_*.json``, ...): read and checked,
every problem a :class:`~uniter_fast.errors.DataError` naming the file."""

from __future__ import annotations

from typing import Any

from uniter_fast.errors import DataError
from uniter_fast.files import read_json


def read_side_file(path: str, what: str) -> Any:
    """The JSON content of the side file ``path`` (``what`` names it in errors: "txt_db meta file", ...); a missing
    or invalid file is a DataError naming it."""
    try:
        return read_json(path, what)
    except (OSError, ValueError) as exc:  # missing, unreadable, not UTF-8, not JSON
        message = str(exc)
        raise DataError(message if repr(path) in message else f"{what} {path!r} cannot be read ({message})") from None


def count_table(path: str, what: str, minimum: int = 0) -> dict[str, int]:
    """The side file ``path`` as a {name: integer >= minimum} table (``id2len.json``, ``nbb_*.json``)."""
    table = read_side_file(path, what)
    if not isinstance(table, dict):
        raise DataError(f"{what} {path!r} must be a JSON object of name -> count, got {type(table).__name__}")
    bad = next((k for k, n in table.items() if type(n) is not int or n < minimum), None)
    if bad is not None:
        raise DataError(f"{what} {path!r}: entry {bad!r} must be an integer >= {minimum}, got {table[bad]!r}")
    return table
