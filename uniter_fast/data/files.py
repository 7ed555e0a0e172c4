"""Atomic writes of small side files (temp file in the same directory, then rename)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` so that readers see either the old file or the complete new one."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: str) -> Any:
    """Load the JSON file at ``path``; a missing file is a FileNotFoundError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"side file {path!r} is missing")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
