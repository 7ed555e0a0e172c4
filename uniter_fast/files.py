"""Atomic file and directory writes, the one helper every floor uses (checkpoints, logs, databases, side files).

A file is written to a temporary name in its own directory, flushed, then renamed over the target
(``os.replace``), so a reader sees the old content or the complete new one, never a part, and a process killed
half-way leaves no partial file under the final name. A directory is filled under a temporary name beside its
target and renamed into place at the end (:func:`atomic_directory`, which can also replace a previous version), or,
for a cache built on first use by whichever process comes first, only when no other builder renamed its copy first
(:func:`build_directory_once`). Temporary files and directories get the permissions a plain ``open()`` /
``os.makedirs`` would give (0666 / 0777 less the umask), so what they become is readable by others as usual.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from typing import Any, Callable, Iterator

TMP_PREFIX = ".tmp-"


def _temporary(directory: str, suffix: str, make: Callable[[str], None]) -> str:
    """A new path ``<directory>/.tmp-<random><suffix>`` created by ``make(path)`` (which must fail when the path
    exists, as ``os.mkdir`` and ``O_EXCL`` do); the random part is drawn again on a collision."""
    while True:
        path = os.path.join(directory, f"{TMP_PREFIX}{secrets.token_hex(6)}{suffix}")
        try:
            make(path)
            return path
        except FileExistsError:
            continue


def _new_file(path: str) -> None:
    """Create the empty file ``path`` (not there before), mode 0666 less the umask, as ``open(path, "w")``."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _new_directory(path: str) -> None:
    """Create the directory ``path`` (not there before), mode 0777 less the umask, as ``os.makedirs``."""
    os.mkdir(path, 0o777)


def check_new_output(path: str, flag: str, kind: str = "file") -> None:
    """Before any work: ``path`` (a command's ``flag``, e.g. ``--out``) must be new (``FileExistsError``: an existing
    file or folder is never replaced) in an existing folder (``FileNotFoundError``); ``kind`` ("file", "folder")
    names what the command writes there."""
    if os.path.lexists(path):
        raise FileExistsError(f"{flag}: {path!r} already exists; give a new {kind} (an existing one is never replaced)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{flag}: the folder {parent!r} of {path!r} does not exist")


def atomic_write(path: str, write: Callable[[str], None], tmp_suffix: str = "") -> None:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it to ``path`` (the temporary file
    is removed when ``write`` raises). The temporary name is ``.tmp-<random>-<name of path><tmp_suffix>``: it ends
    with the target's extension unless ``tmp_suffix`` is given, which lets a caller find its own leftovers of a killed
    process (``.tmp-*-*<tmp_suffix>``)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = _temporary(directory, "-" + os.path.basename(path) + tmp_suffix, _new_file)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    """``text`` (UTF-8) into ``path`` atomically, flushed to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_json_atomic(path: str, obj: Any, **dump_kwargs: Any) -> None:
    """``obj`` as JSON into ``path`` atomically (``dump_kwargs`` go to ``json.dumps``, e.g. ``indent=2``)."""
    write_text_atomic(path, json.dumps(obj, **dump_kwargs))


def read_json(path: str, what: str = "file") -> Any:
    """The JSON content of ``path``; a missing file is a ``FileNotFoundError`` and invalid JSON (or text that is not
    UTF-8) a ``ValueError``, both naming ``what`` and the path (a JSON error with its line and column)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder; give the JSON file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{what} {path!r} is not valid JSON: line {err.lineno}, column {err.colno}: {err.msg}"
            ) from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{what} {path!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None


@contextlib.contextmanager
def atomic_directory(path: str, replace: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside ``path`` (``.tmp-<random>-<name>``) to fill; on success rename it to
    ``path``, on error remove it. ``path`` must not exist (``FileExistsError`` up front), unless ``replace``: then a
    previous ``path`` is swapped out at the end and removed, so that ``path`` is always the old or the new complete
    directory, or (killed between the two renames) absent; never a mix."""
    if os.path.exists(path) and not replace:
        raise FileExistsError(f"{path!r} already exists; choose a new directory")
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = _temporary(parent, "-" + os.path.basename(path), _new_directory)
    try:
        yield tmp
        old = None
        if replace and os.path.lexists(path):
            old = _temporary(parent, "-old-" + os.path.basename(path), _new_directory)
            os.replace(path, os.path.join(old, "dir"))
        os.rename(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_directory_once(path: str, build: Callable[[str], None]) -> str:
    """The directory ``path``; unless it exists, ``build(out)`` fills ``out`` (a path that does not exist yet, inside a
    temporary directory beside ``path``), which is then renamed to ``path``. Safe under concurrent first calls: a
    builder that finds ``path`` renamed by another meanwhile discards its own copy. Returns ``path``."""
    if os.path.isdir(path):
        return path
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    scratch = _temporary(parent, "-" + os.path.basename(path), _new_directory)
    try:
        out = os.path.join(scratch, os.path.basename(path))
        build(out)
        try:
            os.rename(out, path)
        except OSError:
            if not os.path.isdir(path):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path
