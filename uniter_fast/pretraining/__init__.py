"""UNITER pretraining: the model with its heads, the training config, optimizer groups, validation and
the DeepSpeed loop behind ``uniter_fast/pretrain.py`` (see ``docs/pretraining.md``)."""

from uniter_fast.pretraining.config import TrainingConfig, load_training_config, parse_training_config
from uniter_fast.pretraining.model import TASKS, UniterForPretraining, task_kind
from uniter_fast.pretraining.optim import build_scheduler, lr_at, param_groups
from uniter_fast.pretraining.validate import validate

__all__ = [
    "TASKS",
    "TrainingConfig",
    "UniterForPretraining",
    "build_scheduler",
    "load_training_config",
    "lr_at",
    "param_groups",
    "parse_training_config",
    "task_kind",
    "validate",
]
