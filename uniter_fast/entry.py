"""The one error path of every command (``pretrain.py``, ``finetune.py``, ``python -m uniter_fast.evaluate``,
``.build``, ``.extract``, ``.info``): :func:`run_command` runs a command's ``main(argv)`` and turns the errors a user
causes into one line on stderr and an exit status, and :class:`CommandParser` is the argument parser of every command.

Exit status: 0 done; 2 a user error (:class:`~uniter_fast.errors.UserError`, a bad option, and the built-in errors
that bad input raises: ``ValueError`` (JSON errors included), ``TypeError``, ``FileNotFoundError``,
``FileExistsError``, ``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``); 1 a run that could not
finish (:class:`~uniter_fast.errors.RunFailed`). Both print ``error: <message>`` as one line, on rank 0 only under a
launcher with several ranks; ``--debug`` or ``UNITER_FAST_DEBUG=1`` print the traceback before it. Any other
exception is a bug and keeps Python's traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional, Sequence

from uniter_fast.errors import ConfigError, RunFailed, UserError

DEBUG_ENV = "UNITER_FAST_DEBUG"
DEBUG_FLAG = "--debug"
USER_ERROR_EXIT = 2
RUN_FAILED_EXIT = 1
USER_ERRORS = (
    UserError,
    ValueError,
    TypeError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the ``--debug`` option, whose usage errors (a missing or unknown option, a
    bad value) are a :class:`~uniter_fast.errors.ConfigError` naming the option, so they take the one error path
    (one line, exit 2) instead of printing the usage text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument(
            DEBUG_FLAG, action="store_true", help=f"print the traceback of an error (also: {DEBUG_ENV}=1)"
        )

    def error(self, message: str) -> NoReturn:
        """Raise the usage error ``message`` as a ``ConfigError``."""
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def exit_status(err: BaseException) -> Optional[int]:
    """The exit status of an error: 2 for a user error, 1 for a failed run, None for anything else (a bug)."""
    if isinstance(err, RunFailed):
        return RUN_FAILED_EXIT
    if isinstance(err, USER_ERRORS):
        return USER_ERROR_EXIT
    return None


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (its lines joined with ``"; "``; the type name when it has none)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether ``argv`` holds ``--debug`` or ``UNITER_FAST_DEBUG`` is set (to anything but ``""`` / ``"0"``)."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def launcher_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 without a launcher)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def run_command(main: Callable[[list[str]], Any], argv: Optional[Sequence[str]] = None) -> None:
    """Run ``main(argv)`` (default: the command line) as a command: user errors and failed runs end the process with
    one ``error:`` line and exit status 2 / 1 (see the module docstring); other exceptions propagate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except Exception as err:
        status = exit_status(err)
        if status is None:
            raise
        sys.stdout.flush()
        if debug_requested(argv):
            traceback.print_exc()
        if launcher_rank() == 0:
            print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(status) from None


def device_argument(value: str) -> str:
    """An argparse ``type`` for ``--device``: ``value`` unchanged when torch can place tensors there (``cpu``,
    ``cuda``, ``cuda:1`` on a machine with that GPU, ...), else a one-line usage error saying why."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {value!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index is not None and device.index >= count):
            raise argparse.ArgumentTypeError(f"{value!r} is not available here ({count} CUDA devices); use cpu")
    return value


def parse_key_values(values: Sequence[str], flag: str) -> dict[str, Any]:
    """Repeated ``FLAG KEY=JSON`` values as a dict (a value that is not JSON stays a string); a value without ``=``
    is a ConfigError naming ``flag``."""
    out: dict[str, Any] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{flag}: expected KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
