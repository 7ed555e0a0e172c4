"""Running a command-line entry point in-process, as its ``python -m`` form does, for the tests of the CLIs."""

from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Sequence

from uniter_fast.entry import run_command


def run_cli(main: Callable[..., Any], argv: Sequence[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``run_command(main, argv)``: 0 when it returns, else its ``SystemExit`` code."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_command(main, list(argv))
            status = 0
        except SystemExit as done:
            status = int(done.code)
    return status, out.getvalue(), err.getvalue()
