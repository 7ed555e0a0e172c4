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
import logging
import os
from typing import Any, ClassVar, Optional

from uniter_fast.files import read_json
from uniter_fast.tasks import TASKS, get_task
from uniter_fast.tasks.bundled import BUNDLED_PREFIX, resolve_bundled
from uniter_fast.training.adversarial import AdversarialConfig, check_kl_weights, parse_adversarial_block
from uniter_fast.training.cli import REPO_ROOT
from uniter_fast.training.config import RunConfig, field_names, parse_run_config, read_run_config, resolve_path
from uniter_fast.training.logs import PRETRAINED_SUBDIR

logger = logging.getLogger(__name__)

PRETRAIN = "pretrain"
RESULTS_SUBDIR = "results"  # the predictions of every validation: results/{split}_results_{step}.*
IGNORED_KEYS = {
    "fp16": "precision comes from ds.json (bf16 / fp16 sections)",
    "pin_mem": "memory pinning follows the device",
    "n_workers": "use --num_workers",
    "rank": "set by the launcher",
    "optim": "the optimizer is ds.json's (AdamW, as every original config)",
    "decay": "the schedule is the original linear warm-up and decay",
}


@dataclasses.dataclass
class FinetuneConfig(RunConfig):
    """A fine-tuning config: the shared run fields (:class:`~uniter_fast.training.config.RunConfig`, whose defaults
    are the original ``train_*.py`` argument defaults) and fine-tuning's own: the task, its databases, the model
    config and checkpoint source, ``lr_mul``, ``dropout``, the optional ``adversarial`` block (VILLA's adversarial
    fine-tuning, :mod:`uniter_fast.training.adversarial`; absent or null: plain fine-tuning) and the task's options
    (the config's other keys)."""

    task: str = ""
    train_txt_dbs: list[str] = dataclasses.field(default_factory=list)
    train_img_dbs: list[str] = dataclasses.field(default_factory=list)
    val_txt_db: str = ""
    val_img_db: str = ""
    test_txt_db: Optional[str] = None
    test_img_db: Optional[str] = None
    model_config: Optional[str] = None
    checkpoint_from: str = PRETRAIN
    compressed_db: bool = False
    lr_mul: float = 1.0
    dropout: float = 0.1
    adversarial: Optional[AdversarialConfig] = None
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    required: ClassVar[tuple[str, ...]] = (
        "output_dir",
        "train_txt_dbs",
        "train_img_dbs",
        "val_txt_db",
        "val_img_db",
    )

    def run_outputs(self) -> tuple[str, ...]:
        """The task's export dir (``finetuned/``; ``pretrained/`` for vcr_pretrain) and the predictions ``results/``."""
        return (get_task(self.task).export_dir, RESULTS_SUBDIR)

    def train_pairs(self) -> list[tuple[str, str]]:
        """(txt_db, img_db) of every training pair."""
        return list(zip(self.train_txt_dbs, self.train_img_dbs))

    def eval_sets(self) -> dict[str, tuple[str, str]]:
        """{split: (txt_db, img_db)}: "val" and, when configured, "test"."""
        out = {"val": (self.val_txt_db, self.val_img_db)}
        if self.test_txt_db:
            out["test"] = (self.test_txt_db, self.test_img_db)
        return out

    def txt_dbs(self) -> list[str]:
        """Every txt_db of the config (training, then evaluation)."""
        return list(self.train_txt_dbs) + [txt for txt, _ in self.eval_sets().values()]


SINGULAR = {"train_txt_db": "train_txt_dbs", "train_img_db": "train_img_dbs"}


def default_config(task: str) -> str:
    """``configs/finetune-<task>-tiny.json`` (``_`` in the task name becomes ``-``): the task's bundled tiny run."""
    return os.path.join(REPO_ROOT, "configs", f"finetune-{task.replace('_', '-')}-tiny.json")


def auto_checkpoint(checkpoint_from: str, where: str) -> str:
    """The export of the default run of ``checkpoint_from``, under the working directory: ``pretrain`` ->
    ``output/pretrain-tiny/pretrained``; a task name -> its tiny config's ``output_dir`` and the task's export dir
    (``vcr_pretrain``: ``output/vcr-pretrain-tiny/pretrained``; ``itm``: ``output/finetune-itm-tiny/finetuned``)."""
    if checkpoint_from == PRETRAIN:
        return os.path.join("output", "pretrain-tiny", PRETRAINED_SUBDIR)
    if checkpoint_from not in TASKS:
        raise ValueError(
            f"{where}: checkpoint_from must be {PRETRAIN!r} or a task of {sorted(TASKS)}, got {checkpoint_from!r}"
        )
    output_dir = read_json(default_config(checkpoint_from), "fine-tuning config")["output_dir"]
    return os.path.join(output_dir, get_task(checkpoint_from).export_dir)


def _resolve(path: str, base_dir: str) -> str:
    if ";" in path:
        return ";".join(_resolve(p, base_dir) for p in path.split(";"))
    if path.startswith(BUNDLED_PREFIX):
        return resolve_bundled(path)
    return resolve_path(path, base_dir)


def _exists(key: str, path: str) -> None:
    for part in path.split(";"):
        if not os.path.isdir(part):
            raise FileNotFoundError(f"{key}: database directory {part!r} does not exist")


DATABASES_CHECKED = {"all": ("train", "eval"), "eval": ("eval",), "none": ()}


def parse_finetune_config(
    raw: dict[str, Any], base_dir: str = ".", where: str = "finetune config", databases: str = "all"
) -> FinetuneConfig:
    """Validate a config dict and resolve its paths (``bundled:`` or relative to ``base_dir``). ``databases``: which
    databases must exist, "all" (training), "eval" (the val / test ones: evaluation) or "none" (its settings only)."""
    if databases not in DATABASES_CHECKED:
        raise ValueError(f"databases must be one of {sorted(DATABASES_CHECKED)}, got {databases!r}")
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
    fields = set(field_names(FinetuneConfig)) - {"options"}
    options = {k: raw.pop(k) for k in list(raw) if k not in fields}
    raw["options"] = task.check_options(options, where)
    raw["adversarial"] = parse_adversarial_block(raw, where)
    if raw["adversarial"] is not None:
        task.check_adversarial(raw["options"], where)
        check_kl_weights(raw["adversarial"], task.kl_objectives(raw["options"]), where)
    auto = os.path.abspath(auto_checkpoint(raw.get("checkpoint_from", PRETRAIN), where))  # the working directory's
    if raw.get("checkpoint") == "auto":
        raw["checkpoint"] = auto if os.path.isdir(auto) else None
        logger.info("%s: checkpoint 'auto' -> %s", where, raw["checkpoint"] or f"none ({auto} does not exist)")
    cfg = parse_run_config(FinetuneConfig, raw, where, base_dir, lambda p: _resolve(p, base_dir))
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
    checked = DATABASES_CHECKED[databases]
    for key in ("train_txt_dbs", "train_img_dbs") if "train" in checked else ():
        for path in getattr(cfg, key):
            _exists(key, path)
    for key in ("val_txt_db", "val_img_db", "test_txt_db", "test_img_db") if "eval" in checked else ():
        if getattr(cfg, key):
            _exists(key, getattr(cfg, key))
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout}")
    if isinstance(cfg.lr_mul, bool) or not isinstance(cfg.lr_mul, (int, float)) or cfg.lr_mul <= 0:
        raise ValueError(f"lr_mul must be a number > 0, got {cfg.lr_mul!r}")
    return cfg


def load_finetune_config(path: str, checkpoint_given: bool = False, databases: str = "all") -> FinetuneConfig:
    """Read and validate a fine-tuning config JSON (relative paths are relative to the file's directory). With
    ``checkpoint_given`` (a ``--checkpoint`` on the command line replaces it) the file's ``checkpoint`` is not read;
    ``databases``: which of its databases must exist (:func:`parse_finetune_config`)."""
    raw, base_dir = read_run_config(path, "fine-tuning config", checkpoint_given)
    return parse_finetune_config(raw, base_dir, where=path, databases=databases)
