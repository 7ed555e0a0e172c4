"""UNITER pretraining: the model with its heads (``model.py``, ``heads.py``), the training config, the objectives'
data and validation, and the recipe behind ``uniter_fast/pretrain.py`` (``run.py``) on the shared training floor
``uniter_fast.training`` (see ``docs/pretraining.md``)."""

from uniter_fast.pretraining.config import TrainingConfig, load_training_config, parse_training_config
from uniter_fast.pretraining.model import TASKS, UniterForPretraining, task_kind
from uniter_fast.pretraining.validate import validate

__all__ = [
    "TASKS",
    "TrainingConfig",
    "UniterForPretraining",
    "load_training_config",
    "parse_training_config",
    "task_kind",
    "validate",
]
