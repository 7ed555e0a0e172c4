"""The training config of ``pretrain.py``: a JSON file in the spirit of the original ``config/pretrain-*.json``, the
shared run fields (``uniter_fast.training.config``) plus pretraining's own.

Everything is checked when the file is read, so that a typo, an unknown task, a non-positive mix ratio or a missing
database fails with a message naming the field before any model is built. Paths may use the ``bundled:`` prefix
(``bundled:txt_train``, ``bundled:txt_val``, ``bundled:img``) for the corpus that ships with the package
(``uniter_fast.data.default_corpus()``, built on first use).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, ClassVar, Optional, Union

from uniter_fast.config import UniterConfig
from uniter_fast.json_types import check_types
from uniter_fast.pretraining.model import TASKS, WITHOUT_LOGITS, pretraining_model_size, task_kind
from uniter_fast.training.adversarial import AdversarialConfig, check_kl_weights, parse_adversarial_block
from uniter_fast.training.budget import BudgetModel
from uniter_fast.training.config import RunConfig, check_keys, parse_run_config, read_run_config, resolve_path
from uniter_fast.training.logs import PRETRAINED_SUBDIR

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
BUNDLED_NAMES = ("txt_train", "txt_val", "img")
CURVES_NAME = "curves.png"  # the pictures of a whole run (uniter_fast.pretraining.plots)
ALIGNMENT_NAME = "alignment.png"


@dataclasses.dataclass
class DatasetSpec:
    """One dataset: txt_db dirs paired one-to-one with img_db dirs, its tasks and (training) their mix ratios."""

    name: str
    db: list[str]
    img: list[str]
    tasks: list[str]
    mix_ratio: list[int] = dataclasses.field(default_factory=list)

    def task_names(self) -> list[str]:
        """``{task}_{name}`` for each task, e.g. ``itm_coco`` (the MetaLoader keys)."""
        return [f"{task}_{self.name}" for task in self.tasks]


@dataclasses.dataclass
class OtSettings:
    """IPOT settings of the WRA loss (the original's are fixed at beta 0.5, 50 iterations, k 1)."""

    beta: float = 0.5
    iteration: int = 50
    k: int = 1


@dataclasses.dataclass
class TrainingConfig(RunConfig):
    """A training config: the shared run fields (:class:`~uniter_fast.training.config.RunConfig`, with the original
    ``pretrain.py`` defaults re-declared below) and pretraining's own: the datasets and their tasks, the model, the
    masking and ITM settings, the WRA's OT settings, the optional task curriculum ``phases`` and the optional
    ``adversarial`` block (VILLA's adversarial pretraining, :mod:`uniter_fast.training.adversarial`; absent or null:
    plain pretraining)."""

    train_datasets: list[DatasetSpec] = dataclasses.field(default_factory=list)
    val_datasets: list[DatasetSpec] = dataclasses.field(default_factory=list)
    model: str = "tiny"
    train_batch_size: Union[int, str] = 10240
    val_batch_size: int = 10240
    num_train_steps: int = 200000
    warmup_steps: int = 10000
    learning_rate: float = 5e-5
    valid_steps: int = 5000
    save_steps: Optional[int] = 5000
    mrm_prob: float = 0.15
    itm_neg_prob: float = 0.5
    itm_ot_lambda: float = 0.1
    ot: OtSettings = dataclasses.field(default_factory=OtSettings)
    phases: Optional[list[dict[str, Any]]] = None
    adversarial: Optional[AdversarialConfig] = None

    required: ClassVar[tuple[str, ...]] = ("output_dir", "train_datasets", "val_datasets")
    auto_budget: ClassVar[bool] = True

    def budget_model(self) -> BudgetModel:
        """The model config (``model`` with ``model_overrides``), the training tasks' kinds and the pretraining
        model's size, which size a ``train_batch_size`` of ``"auto"``."""
        kinds = sorted({task_kind(task) for spec in self.train_datasets for task in spec.tasks})
        config = configured_model_config(self)
        return config, kinds, pretraining_model_size(config)

    def run_outputs(self) -> tuple[str, ...]:
        """The export ``pretrained/`` and the pictures ``curves.png``, ``alignment.png``."""
        return (PRETRAINED_SUBDIR, CURVES_NAME, ALIGNMENT_NAME)

    def phase_starts(self) -> Optional[list[tuple[int, dict[str, int]]]]:
        """The curriculum as ``(first 0-based step, mix)`` pairs for the ``MetaLoader``; ``None`` without phases."""
        if self.phases is None:
            return None
        starts, first = [], 0
        for phase in self.phases:
            starts.append((first, dict(phase["mix"])))
            first += phase.get("steps", 0)
        return starts

    def all_task_names(self) -> list[str]:
        """Training task names in config order."""
        return [name for spec in self.train_datasets for name in spec.task_names()]


def resolve_bundled_corpus(path: str, base_dir: str) -> str:
    """``bundled:<name>`` -> the bundled corpus dir; other paths relative to ``base_dir`` (the config file's)."""
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX) :]
        if name not in BUNDLED_NAMES:
            raise ValueError(
                f"unknown bundled path {path!r}; expected one of {[BUNDLED_PREFIX + n for n in BUNDLED_NAMES]}"
            )
        from uniter_fast.data import default_corpus

        corpus = default_corpus()
        return {"txt_train": corpus.txt_db, "txt_val": corpus.txt_db_val, "img": corpus.img_db}[name]
    return resolve_path(path, base_dir)


def _dataset(where: str, raw: dict, training: bool, base_dir: str) -> DatasetSpec:
    check_keys(where, raw, DatasetSpec)
    missing = sorted({"name", "db", "img", "tasks"} - set(raw))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    check_types(DatasetSpec, raw, where)
    spec = DatasetSpec(**raw)
    if not spec.db or len(spec.db) != len(spec.img):
        raise ValueError(
            f"{where}: 'db' and 'img' must be non-empty lists of equal length, got {spec.db} and {spec.img}"
        )
    for task in spec.tasks:
        try:
            task_kind(task)
        except ValueError:
            raise ValueError(f"{where}: unknown task {task!r}; expected one of {list(TASKS)}") from None
    if not spec.tasks or len(set(spec.tasks)) != len(spec.tasks):
        raise ValueError(f"{where}: 'tasks' must be a non-empty list without repeats, got {spec.tasks}")
    if training:
        if len(spec.mix_ratio) != len(spec.tasks):
            raise ValueError(
                f"{where}: 'mix_ratio' needs one entry per task ({len(spec.tasks)}), got {len(spec.mix_ratio)}"
            )
        for task, ratio in zip(spec.tasks, spec.mix_ratio):
            if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio <= 0:
                raise ValueError(f"{where}: mix_ratio of task {task!r} must be an integer > 0, got {ratio!r}")
    spec.db = [resolve_bundled_corpus(p, base_dir) for p in spec.db]
    spec.img = [resolve_bundled_corpus(p, base_dir) for p in spec.img]
    for key in ("db", "img"):
        for path in getattr(spec, key):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{where}.{key}: database directory {path!r} does not exist")
    return spec


def _check_phases(phases: Any, task_names: list[str]) -> None:
    """``phases``: a non-empty list of ``{"steps": int > 0, "mix": {task name: int > 0}}``; the last has no "steps"."""
    if not isinstance(phases, list) or not phases:
        raise ValueError(f"phases must be a non-empty list of {{'steps', 'mix'}} objects, got {phases!r}")
    for i, phase in enumerate(phases):
        where, last = f"phases[{i}]", i == len(phases) - 1
        if not isinstance(phase, dict):
            raise TypeError(f"{where} must be a JSON object, got {type(phase).__name__}")
        allowed = {"mix"} if last else {"steps", "mix"}
        if set(phase) != allowed:
            expected = "only 'mix' (the last phase runs to num_train_steps)" if last else "'steps' and 'mix'"
            raise ValueError(f"{where}: expected keys {expected}, got {sorted(phase)}")
        steps = phase.get("steps", 1)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps <= 0:
            raise ValueError(f"{where}: 'steps' must be an integer > 0, got {steps!r}")
        mix = phase["mix"]
        if not isinstance(mix, dict) or not mix:
            raise ValueError(f"{where}: 'mix' must be a non-empty object of task name -> ratio, got {mix!r}")
        for name, ratio in mix.items():
            if name not in task_names:
                raise ValueError(f"{where}: unknown task {name!r} in 'mix'; training tasks are {task_names}")
            if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio <= 0:
                raise ValueError(f"{where}: ratio of task {name!r} must be an integer > 0, got {ratio!r}")


def parse_training_config(raw: dict[str, Any], base_dir: str = ".", where: str = "training config") -> TrainingConfig:
    """Validate a config dict (see :class:`TrainingConfig`) and resolve its paths against ``base_dir``; messages name
    the config ``where``."""
    check_keys(where, raw, TrainingConfig)
    for key in TrainingConfig.required:
        if key not in raw:
            raise ValueError(f"{where}: missing key {key!r}")
    fields = dict(raw)
    for key, training in (("train_datasets", True), ("val_datasets", False)):
        if not isinstance(raw[key], list) or not raw[key]:
            raise ValueError(f"{key} must be a non-empty list of datasets, got {raw[key]!r}")
        fields[key] = [_dataset(f"{key}[{i}]", d, training, base_dir) for i, d in enumerate(raw[key])]
    check_keys(f"{where}: ot", raw.get("ot", {}), OtSettings)
    check_types(OtSettings, raw.get("ot", {}), f"{where}: ot")
    fields["ot"] = OtSettings(**raw.get("ot", {}))
    fields["adversarial"] = parse_adversarial_block(raw, where)
    cfg = parse_run_config(TrainingConfig, fields, where, base_dir, lambda p: resolve_bundled_corpus(p, base_dir))
    if cfg.ot.beta <= 0 or cfg.ot.iteration < 1 or cfg.ot.k < 1:
        raise ValueError(f"ot: need beta > 0, iteration >= 1 and k >= 1, got {dataclasses.asdict(cfg.ot)}")
    for name in ("mrm_prob", "itm_neg_prob"):
        if not 0.0 < getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {getattr(cfg, name)}")
    if cfg.itm_ot_lambda < 0:
        raise ValueError(f"itm_ot_lambda must be >= 0, got {cfg.itm_ot_lambda}")
    names = cfg.all_task_names()
    if len(set(names)) != len(names):
        raise ValueError(f"train_datasets: task names must be unique across datasets, got {names}")
    if cfg.phases is not None:
        _check_phases(cfg.phases, names)
        before_last = sum(phase["steps"] for phase in cfg.phases[:-1])
        if before_last >= cfg.num_train_steps:  # a shortened run (a smoke test) stops inside the curriculum
            logger.warning(
                "%s: phases: the phases before the last take %d steps, not fewer than num_train_steps %d, so the last "
                "phase (%s) does not run",
                where,
                before_last,
                cfg.num_train_steps,
                sorted(cfg.phases[-1]["mix"]),
            )
    if cfg.adversarial is not None:
        objectives = {task_kind(name) for name in names} - set(WITHOUT_LOGITS)
        check_kl_weights(cfg.adversarial, sorted(objectives), where)
    return cfg


def load_training_config(path: str, checkpoint_given: bool = False) -> TrainingConfig:
    """Read and validate a training config JSON; relative paths in it are relative to the file's directory. With
    ``checkpoint_given`` (a ``--checkpoint`` on the command line replaces it) the file's ``checkpoint`` is not read."""
    raw, base_dir = read_run_config(path, "training config", checkpoint_given)
    return parse_training_config(raw, base_dir, path)


def configured_model_config(cfg: TrainingConfig) -> UniterConfig:
    """``cfg.model`` (a preset name or a config JSON) with ``cfg.model_overrides``."""
    base = UniterConfig.from_json_file(cfg.model) if os.path.isfile(cfg.model) else UniterConfig.preset(cfg.model)
    return UniterConfig.from_dict({**base.to_dict(), **cfg.model_overrides})
