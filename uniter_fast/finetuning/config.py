"""The fine-tuning config of ``finetune.py``: the original ``config/train-<task>-*.json`` keys, checked on load.

The original names are kept (``train_txt_dbs`` / ``train_txt_db``, ``val_txt_db``, ``test_txt_db``, ``model_config``,
``checkpoint``, ``lr_mul``, ``grad_norm``, ...) and the task-specific ones sit at the top level as in the original
(NLVR2 ``model`` / ``use_img_type``; RE ``train_loss`` / ``margin`` / ``hard_ratio`` / ``mlp``). ``task`` names the
task, ``model_overrides`` and ``fast`` are ours. Optimizer settings that the original keeps in the training config
(``gradient_accumulation_steps``, ``grad_norm``, ``weight_decay``, ``betas``) override ``ds.json``'s. Paths may start
with ``bundled:`` (the bundled task sets, e.g. ``bundled:vqa/txt_train``) and are otherwise relative to the config
file. ``checkpoint: "auto"`` means the export of the default pretraining run (``output/pretrain-tiny/pretrained``
under the working directory; with ``checkpoint_from: "vcr_pretrain"`` the default VCR second-stage run's
``output/vcr-pretrain-tiny/pretrained``) when it exists, else a fresh model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional

from uniter_fast.tasks import TASKS, get_task
from uniter_fast.tasks.synthetic import BUNDLED_PREFIX, resolve_bundled

logger = logging.getLogger(__name__)

AUTO_CHECKPOINTS = {
    "pretrain": os.path.join("output", "pretrain-tiny", "pretrained"),
    "vcr_pretrain": os.path.join("output", "vcr-pretrain-tiny", "pretrained"),
}
IGNORED_KEYS = {
    "fp16": "precision comes from ds.json (bf16 / fp16 sections)",
    "pin_mem": "memory pinning follows the device",
    "n_workers": "use --num_workers",
    "rank": "set by the launcher",
    "optim": "the optimizer is ds.json's (AdamW, as every original config)",
    "decay": "the schedule is the original linear warm-up and decay",
}


@dataclasses.dataclass
class FinetuneConfig:
    """All keys of a fine-tuning config (defaults: the original ``train_*.py`` argument defaults)."""

    task: str
    output_dir: str
    train_txt_dbs: list[str]
    train_img_dbs: list[str]
    val_txt_db: str
    val_img_db: str
    test_txt_db: Optional[str] = None
    test_img_db: Optional[str] = None
    model_config: Optional[str] = None
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: Optional[str] = None
    checkpoint_from: str = "pretrain"
    compressed_db: bool = False
    max_txt_len: int = 60
    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10
    num_bb: int = 36
    train_batch_size: int = 4096
    val_batch_size: int = 4096
    gradient_accumulation_steps: Optional[int] = None
    learning_rate: float = 3e-5
    lr_mul: float = 1.0
    valid_steps: int = 1000
    save_steps: Optional[int] = None
    num_train_steps: int = 100000
    warmup_steps: int = 4000
    betas: Optional[list[float]] = None
    dropout: float = 0.1
    weight_decay: Optional[float] = None
    grad_norm: Optional[float] = None
    seed: int = 42
    fast: bool = True
    num_workers: Optional[int] = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def eval_sets(self) -> dict[str, tuple[str, str]]:
        """{split: (txt_db, img_db)}: "val" and, when configured, "test"."""
        out = {"val": (self.val_txt_db, self.val_img_db)}
        if self.test_txt_db:
            out["test"] = (self.test_txt_db, self.test_img_db)
        return out


SINGULAR = {"train_txt_db": "train_txt_dbs", "train_img_db": "train_img_dbs"}


def _resolve(path: str, base_dir: str) -> str:
    if ";" in path:
        return ";".join(_resolve(p, base_dir) for p in path.split(";"))
    if path.startswith(BUNDLED_PREFIX):
        return resolve_bundled(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _exists(key: str, path: str) -> None:
    for part in path.split(";"):
        if not os.path.isdir(part):
            raise FileNotFoundError(f"{key}: database directory {part!r} does not exist")


def _positive(cfg: FinetuneConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")


def parse_finetune_config(raw: dict[str, Any], base_dir: str = ".", where: str = "finetune config") -> FinetuneConfig:
    """Validate a config dict and resolve its paths (``bundled:`` or relative to ``base_dir``)."""
    if not isinstance(raw, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(raw).__name__}")
    raw = dict(raw)
    if raw.get("task") not in TASKS:
        raise ValueError(f"{where}: 'task' must be one of {sorted(TASKS)}, got {raw.get('task')!r}")
    task = get_task(raw["task"])
    for single, plural in SINGULAR.items():
        if single in raw:
            if plural in raw:
                raise ValueError(f"{where}: give {single!r} or {plural!r}, not both")
            raw[plural] = [raw.pop(single)]
    for key, why in IGNORED_KEYS.items():
        if key in raw:
            logger.info("%s: key %r is ignored: %s", where, key, why)
            if key == "n_workers" and "num_workers" not in raw:
                raw["num_workers"] = raw[key]
            del raw[key]
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"options"}
    options = {k: raw.pop(k) for k in list(raw) if k not in fields}
    options = task.check_options(options, where)
    missing = sorted({"output_dir", "train_txt_dbs", "train_img_dbs", "val_txt_db", "val_img_db"} - set(raw))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    cfg = FinetuneConfig(**raw, options=options)
    if len(cfg.train_txt_dbs) != len(cfg.train_img_dbs) or not cfg.train_txt_dbs:
        raise ValueError(
            f"{where}: train_txt_dbs and train_img_dbs must be non-empty lists of equal length, got "
            f"{cfg.train_txt_dbs} and {cfg.train_img_dbs}"
        )
    if bool(cfg.test_txt_db) != bool(cfg.test_img_db):
        raise ValueError(f"{where}: give both test_txt_db and test_img_db, or neither")
    cfg.train_txt_dbs = [_resolve(p, base_dir) for p in cfg.train_txt_dbs]
    cfg.train_img_dbs = [_resolve(p, base_dir) for p in cfg.train_img_dbs]
    for key in ("val_txt_db", "val_img_db", "test_txt_db", "test_img_db"):
        if getattr(cfg, key):
            setattr(cfg, key, _resolve(getattr(cfg, key), base_dir))
    for key in ("train_txt_dbs", "train_img_dbs"):
        for path in getattr(cfg, key):
            _exists(key, path)
    for key in ("val_txt_db", "val_img_db", "test_txt_db", "test_img_db"):
        if getattr(cfg, key):
            _exists(key, getattr(cfg, key))
    _check_values(cfg, where)
    if cfg.checkpoint == "auto":
        auto = AUTO_CHECKPOINTS[cfg.checkpoint_from]
        cfg.checkpoint = auto if os.path.isdir(auto) else None
        logger.info("%s: checkpoint 'auto' -> %s", where, cfg.checkpoint or f"none ({auto} does not exist)")
    elif cfg.checkpoint:
        cfg.checkpoint = _resolve(cfg.checkpoint, base_dir)
        if not os.path.exists(cfg.checkpoint):
            raise FileNotFoundError(f"{where}: checkpoint {cfg.checkpoint!r} does not exist")
    return cfg


def _check_values(cfg: FinetuneConfig, where: str) -> None:
    _positive(cfg, ("train_batch_size", "val_batch_size", "learning_rate", "lr_mul", "valid_steps"))
    _positive(cfg, ("num_train_steps", "max_txt_len", "max_bb", "min_bb", "num_bb"))
    if cfg.save_steps is None:
        cfg.save_steps = cfg.valid_steps
    _positive(cfg, ("save_steps",))
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if cfg.gradient_accumulation_steps is not None and cfg.gradient_accumulation_steps < 1:
        raise ValueError(f"gradient_accumulation_steps must be >= 1, got {cfg.gradient_accumulation_steps}")
    if cfg.betas is not None and (len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {cfg.betas}")
    if cfg.checkpoint_from not in ("pretrain", "vcr_pretrain"):
        raise ValueError(f"{where}: checkpoint_from must be 'pretrain' or 'vcr_pretrain', got {cfg.checkpoint_from!r}")


def load_finetune_config(path: str) -> FinetuneConfig:
    """Read and validate a fine-tuning config JSON (relative paths are relative to the file's directory)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fine-tuning config {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"fine-tuning config {path!r} is not valid JSON: {err}") from None
    return parse_finetune_config(raw, os.path.dirname(os.path.abspath(path)), where=path)


def finetune_ds_config(ds: dict[str, Any], cfg: FinetuneConfig) -> dict[str, Any]:
    """``ds`` with the training config's optimizer settings applied (``gradient_accumulation_steps``, ``grad_norm``
    -> ``gradient_clipping``, -1 = none, ``weight_decay``, ``betas``); the input is not modified."""
    out = json.loads(json.dumps(ds))
    if cfg.gradient_accumulation_steps is not None:
        out["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    if cfg.grad_norm is not None:
        out["gradient_clipping"] = 0.0 if cfg.grad_norm == -1 else float(cfg.grad_norm)
    params = out.setdefault("optimizer", {}).setdefault("params", {})
    if cfg.weight_decay is not None:
        params["weight_decay"] = cfg.weight_decay
    if cfg.betas is not None:
        params["betas"] = list(cfg.betas)
    return out
