"""Hub-friendly folders: ``from_pretrained("org/name")`` resolves through huggingface_hub's cache, offline, from a
local cache the test builds (``models--org--name/snapshots/<rev>/`` and ``refs/main``, as the hub lays it out);
importing the package imports no huggingface_hub and downloads nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import huggingface_hub.constants  # the [hub] extra, which [test] includes
import pytest
import torch

from tests.foreign_layouts import randomized
from uniter_fast import Model, UniterConfig
from uniter_fast.errors import CheckpointError
from uniter_fast.training.config import RunConfig, parse_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REVISION = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(tmp_path, model: Model) -> str:
    """A Hugging Face cache holding ``model``'s save_pretrained folder as the model ``org/name``."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--name"
    model.save_pretrained(tmp_path / "folder")
    shutil.copytree(tmp_path / "folder", repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return str(cache)


def test_a_hub_id_loads_from_the_local_cache_with_local_files_only(tmp_path, monkeypatch) -> None:
    source = randomized(Model(UniterConfig.tiny()), seed=8)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", hub_cache(tmp_path, source))
    loaded = Model.from_pretrained("org/name", local_files_only=True)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(CheckpointError, match=r"^org/other: no such file or directory, nor a model in the local"):
        Model.from_pretrained("org/other", local_files_only=True)
    raw = {"output_dir": "out", "checkpoint": "org/name"}  # a run config's checkpoint: its snapshot folder
    cfg = parse_run_config(RunConfig, raw, "run.json", str(tmp_path), resolve=os.path.abspath)
    assert cfg.checkpoint.endswith(os.path.join("models--org--name", "snapshots", REVISION))
    monkeypatch.chdir(tmp_path)  # a local folder of that name wins over the hub
    (tmp_path / "org").mkdir()
    shutil.copytree(tmp_path / "folder", tmp_path / "org" / "name")
    assert torch.equal(Model.from_pretrained("org/name").pooler.dense.weight, source.pooler.dense.weight)


def test_offline_hub_cache_and_nothing_imported_at_import_time(tmp_path) -> None:
    source = randomized(Model(UniterConfig.tiny()), seed=9)
    cache = hub_cache(tmp_path, source)
    torch.save(source.pooler.dense.weight, tmp_path / "pooler.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        import uniter_fast
        from uniter_fast import Model
        assert "huggingface_hub" not in sys.modules, "imported at import time"
        model = Model.from_pretrained("org/name")  # HF_HUB_OFFLINE=1: the cache only
        assert torch.equal(model.pooler.dense.weight, torch.load({str(tmp_path / "pooler.pt")!r}))
        print("ok")
        """
    )
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
