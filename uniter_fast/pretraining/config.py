"""The training config of ``pretrain.py``: a JSON file in the spirit of the original ``config/pretrain-*.json``.

Everything is checked when the file is read, so that a typo, an unknown task, a non-positive mix ratio or a missing
database fails with a message naming the field before any model is built. Paths may use the ``bundled:`` prefix
(``bundled:txt_train``, ``bundled:txt_val``, ``bundled:img``) for the corpus that ships with the package
(``uniter_fast.data.default_corpus()``, built on first use).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from uniter_fast.pretraining.model import TASKS, task_kind

BUNDLED_PREFIX = "bundled:"
BUNDLED_NAMES = ("txt_train", "txt_val", "img")


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
class TrainingConfig:
    """All fields of a training config JSON, with the original's defaults where it has them (spec §3.6)."""

    train_datasets: list[DatasetSpec]
    val_datasets: list[DatasetSpec]
    output_dir: str
    model: str = "tiny"
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint: Optional[str] = None
    train_batch_size: int = 10240
    val_batch_size: int = 10240
    num_train_steps: int = 200000
    warmup_steps: int = 10000
    learning_rate: float = 5e-5
    valid_steps: int = 5000
    save_steps: int = 5000
    max_txt_len: int = 60
    conf_th: float = 0.2
    max_bb: int = 100
    min_bb: int = 10
    num_bb: int = 36
    mrm_prob: float = 0.15
    itm_neg_prob: float = 0.5
    itm_ot_lambda: float = 0.1
    ot: OtSettings = dataclasses.field(default_factory=OtSettings)
    fast: bool = True
    seed: int = 42
    phases: Optional[list[dict[str, Any]]] = None

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


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _check_keys(where: str, given: dict, cls: type) -> None:
    if not isinstance(given, dict):
        raise TypeError(f"{where} must be a JSON object, got {type(given).__name__}")
    unknown = sorted(set(given) - _field_names(cls))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(_field_names(cls))}")


def _resolve_path(path: str, base_dir: str) -> str:
    """``bundled:<name>`` -> the bundled corpus dir; relative paths are taken from ``base_dir``."""
    if path.startswith(BUNDLED_PREFIX):
        name = path[len(BUNDLED_PREFIX) :]
        if name not in BUNDLED_NAMES:
            raise ValueError(
                f"unknown bundled path {path!r}; expected one of {[BUNDLED_PREFIX + n for n in BUNDLED_NAMES]}"
            )
        from uniter_fast.data import default_corpus

        corpus = default_corpus()
        return {"txt_train": corpus.txt_db, "txt_val": corpus.txt_db_val, "img": corpus.img_db}[name]
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _dataset(where: str, raw: dict, training: bool, base_dir: str) -> DatasetSpec:
    _check_keys(where, raw, DatasetSpec)
    missing = sorted({"name", "db", "img", "tasks"} - set(raw))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
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
    spec.db = [_resolve_path(p, base_dir) for p in spec.db]
    spec.img = [_resolve_path(p, base_dir) for p in spec.img]
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


def _positive(cfg: TrainingConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"{name} must be a number > 0, got {value!r}")


def parse_training_config(raw: dict[str, Any], base_dir: str = ".") -> TrainingConfig:
    """Validate a config dict (see :class:`TrainingConfig`) and resolve its paths against ``base_dir``."""
    _check_keys("training config", raw, TrainingConfig)
    for key in ("train_datasets", "val_datasets", "output_dir"):
        if key not in raw:
            raise ValueError(f"training config: missing key {key!r}")
    fields = dict(raw)
    for key, training in (("train_datasets", True), ("val_datasets", False)):
        if not isinstance(raw[key], list) or not raw[key]:
            raise ValueError(f"{key} must be a non-empty list of datasets, got {raw[key]!r}")
        fields[key] = [_dataset(f"{key}[{i}]", d, training, base_dir) for i, d in enumerate(raw[key])]
    _check_keys("ot", raw.get("ot", {}), OtSettings)
    fields["ot"] = OtSettings(**raw.get("ot", {}))
    if raw.get("checkpoint"):
        fields["checkpoint"] = _resolve_path(raw["checkpoint"], base_dir)
        if not os.path.exists(fields["checkpoint"]):
            raise FileNotFoundError(f"checkpoint {fields['checkpoint']!r} does not exist")
    cfg = TrainingConfig(**fields)
    _positive(cfg, ("train_batch_size", "val_batch_size", "num_train_steps", "learning_rate", "valid_steps"))
    _positive(cfg, ("save_steps", "max_txt_len", "max_bb", "min_bb", "num_bb"))
    if cfg.ot.beta <= 0 or cfg.ot.iteration < 1 or cfg.ot.k < 1:
        raise ValueError(f"ot: need beta > 0, iteration >= 1 and k >= 1, got {dataclasses.asdict(cfg.ot)}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
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
    return cfg


def load_training_config(path: str) -> TrainingConfig:
    """Read and validate a training config JSON; relative paths in it are relative to the file's directory."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training config {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"training config {path!r} is not valid JSON: {err}") from None
    return parse_training_config(raw, os.path.dirname(os.path.abspath(path)))
