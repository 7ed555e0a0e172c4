"""Downstream tasks: each module holds a task's model (original head names), data, metric and database builder;
``TASKS`` maps the names that ``finetune.py --task``, ``evaluate.py --task`` and ``python -m uniter_fast.build
--task`` take to their :class:`~uniter_fast.tasks.spec.Task`. A task defined outside the package joins with
:func:`register` (see ``docs/adding-a-task.md``)."""

from __future__ import annotations

from uniter_fast.tasks.itm import ItmHardNegTask, ItmTask
from uniter_fast.tasks.nlvr2 import Nlvr2Task
from uniter_fast.tasks.re import ReTask
from uniter_fast.tasks.spec import Task
from uniter_fast.tasks.vcr import VcrTask
from uniter_fast.tasks.vcr_pretrain import VcrPretrainTask
from uniter_fast.tasks.ve import VeTask
from uniter_fast.tasks.vqa import VqaTask

TASKS: dict[str, Task] = {
    "vqa": VqaTask(),
    "ve": VeTask(),
    "nlvr2": Nlvr2Task(),
    "re": ReTask(),
    "vcr": VcrTask(),
    "vcr_pretrain": VcrPretrainTask(),
    "itm": ItmTask(),
    "itm-hn": ItmHardNegTask(),
}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` under ``task.name`` (a new name; ``ValueError`` if it is taken or empty), so the
    CLIs run it in this process; returns it."""
    if not isinstance(task, Task) or not task.name:
        raise ValueError(f"register needs a Task instance with a name, got {task!r}")
    if task.name in TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered ({type(TASKS[task.name]).__name__})")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The task called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def answering_tasks() -> list[str]:
    """The names of the tasks that answer queries on new images (``Task.answers_queries``), sorted."""
    return sorted(name for name, task in TASKS.items() if task.answers_queries)


__all__ = ["TASKS", "Task", "answering_tasks", "get_task", "register"]
