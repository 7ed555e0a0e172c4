"""Hub-friendly model folders: a Hugging Face Hub model id (``org/name``) resolved to a local folder through
``huggingface_hub`` (an optional dependency, imported only when an id is resolved: nothing downloads at import),
and the model card (``README.md``) a ``save_pretrained`` folder carries.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from uniter_fast.errors import CheckpointError

CARD_NAME = "README.md"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name: one slash, no path syntax
HUB_FILES = ["*.json", "*.safetensors", "*.md"]  # what a save_pretrained folder holds
FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")  # a missing file, never a Hub id


def is_hub_id(path: str) -> bool:
    """Whether ``path`` reads as a Hub model id ``org/name``: not an absolute or dotted path, no checkpoint file name
    (``ckpt/model.pt``), and its ``org`` is no local directory (``output/typo`` is a missing local path)."""
    return (
        bool(HUB_ID.match(path))
        and ".." not in path
        and not path.endswith(FILE_SUFFIXES)
        and not os.path.isdir(path.split("/", 1)[0])
    )


def resolve(path: str, local_files_only: bool = False) -> str:
    """``path`` itself when it exists on disk or is no Hub id; else the local folder of Hub model ``path``
    (``huggingface_hub.snapshot_download``: the cache, ``HF_HUB_CACHE``, then the Hub unless ``local_files_only``
    or ``HF_HUB_OFFLINE=1``). A ``CheckpointError`` naming the id when it cannot be had."""
    if os.path.exists(path) or not is_hub_id(path):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{path}: no such file or directory, and huggingface_hub (pip install 'uniter_fast[hub]') is not "
            f"installed to fetch it as a Hugging Face Hub model"
        ) from None
    try:
        return snapshot_download(path, local_files_only=local_files_only, allow_patterns=HUB_FILES)
    except Exception as err:  # the hub's errors (not found, offline, gated) have no common base but Exception
        where = "the local Hugging Face cache" if local_files_only else "the Hugging Face Hub or its local cache"
        raise CheckpointError(
            f"{path}: no such file or directory, nor a model in {where} ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err


def model_card(config: dict[str, Any], provenance: dict[str, Any], weights: str) -> str:
    """The ``README.md`` of a ``save_pretrained`` folder: front matter the Hub reads, where the weights come from
    (``provenance``: e.g. ``source``, ``layout``, ``sha256``, ``renamed``, ``dropped``), how to load them, and
    the model config."""
    lines = ["---", "library_name: uniter_fast", "tags:", "- uniter", "- vision-language", "---", ""]
    lines += [
        "# UNITER weights",
        "",
        f"`{weights}` holds the weights of a UNITER model under the original UNITER names.",
    ]
    lines += ["", "## Provenance", ""]
    for key in sorted(provenance):
        value = provenance[key]
        if isinstance(value, (dict, list)):
            value = f"{len(value)} keys" if key in ("renamed", "dropped") else json.dumps(value, sort_keys=True)
        lines.append(f"- {key}: {value}")
    lines += ["", "## Use", "", "```python", "from uniter_fast import Model", "", 'model = Model.from_pretrained(".")']
    lines += ["```", "", "## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
