"""Every parameter that a model's forward reads outside its owning module's forward is declared in
``model.external_parameters()``, which DeepSpeed ZeRO-3 needs (docs/pretraining.md, "ZeRO-3").

ZeRO-3 gathers a parameter for the forwards (and backwards) of the module that owns it and of the modules it is
registered with. These tests apply that rule without DeepSpeed: each parameter lookup (``module.weight``, which is
also how ZeRO-3 sees a use) is logged with the modules whose forwards are running, for every pretraining task and
every task model that has example batches, on the fast and the reference path, with and without the loss.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from tests.pretrain_batches import task_batch
from tests.tasks_helpers import tiny_config
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.pretraining.model import TASKS as PRETRAINING_TASKS
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.tasks import TASKS

EXAMPLE_TASKS = [name for name, task in TASKS.items() if task.has_example]


class LoggedLookups(dict):
    """A module's ``_parameters`` that logs every lookup with the modules whose forwards are running."""

    def __init__(self, owner: nn.Module, params: dict, log: list, running: list[nn.Module]) -> None:
        super().__init__(params)
        self.owner, self.log, self.running = owner, log, running

    def __getitem__(self, key: str) -> Any:
        param = super().__getitem__(key)
        if self.running and param is not None:
            self.log.append((self.owner, key, param, tuple(self.running)))
        return param


def undeclared_reads(model: UniterPreTrainedModel, run: Callable[[], Any]) -> list[str]:
    """``run()`` with every lookup logged; the parameters read while neither their owner's forward nor the forward
    of a module they are declared for (``model.external_parameters()``) was running, as "owner.name in module"."""
    running: list[nn.Module] = []
    log: list = []

    def enter(module: nn.Module, args: Any) -> None:
        running.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        running.pop()

    for module in model.modules():
        module._parameters = LoggedLookups(module, module._parameters, log, running)
        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    run()
    declared = {(id(module), id(param)) for module, param in model.external_parameters()}
    names = {id(module): name or "the model" for name, module in model.named_modules()}
    undeclared = set()
    for owner, key, param, active in log:
        if any(owner is m or (id(m), id(param)) in declared for m in active):
            continue
        undeclared.add(f"{names[id(owner)]}.{key} in {names[id(active[-1])]}")
    return sorted(undeclared)


def forward_and_backward(model: nn.Module, batch: dict, compute_loss: bool, *task: str) -> Callable[[], None]:
    """The model's outputs for ``batch`` (validation) or its loss and backward (training)."""

    def run() -> None:
        if compute_loss:
            model(batch, *task)["loss"].backward()
        else:
            with torch.no_grad():
                model(batch, *task, compute_loss=False)

    return run


@pytest.mark.parametrize("compute_loss", [True, False], ids=["loss", "outputs"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("task", PRETRAINING_TASKS)
def test_pretraining_declares_what_its_forward_reads(task: str, fast: bool, compute_loss: bool) -> None:
    torch.manual_seed(0)
    model = UniterForPretraining(tiny_config(), fast=fast)
    batch = task_batch(task, [5, 9, 7], [4, 6, 3], model.config.vocab_size)
    assert undeclared_reads(model, forward_and_backward(model, batch, compute_loss, task)) == []


@pytest.mark.parametrize("compute_loss", [True, False], ids=["loss", "outputs"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("name", EXAMPLE_TASKS)
def test_task_models_declare_what_their_forwards_read(name: str, fast: bool, compute_loss: bool) -> None:
    torch.manual_seed(0)
    config = tiny_config()
    task = TASKS[name]
    options, batch = task.example(config, 3, np.random.default_rng(0), (6, 12), (4, 9))
    model = task.build_model(config, options, fast=fast)
    task.prepare_model(model, options)
    assert undeclared_reads(model, forward_and_backward(model, batch, compute_loss)) == []


def test_the_log_finds_a_head_weight_read_outside_its_forward() -> None:
    """Without the heads' declarations, the MRC-kl training forward reads the classifier's output Linear (the
    parameter whose missing gather failed the first ZeRO-3 backward) and its bias outside their module's forward."""
    model = UniterForPretraining(tiny_config(), fast=True)
    model.external_parameters = model.uniter.external_parameters  # the encoder's pairs only
    batch = task_batch("mrckl", [5, 9], [4, 6], model.config.vocab_size)
    reads = undeclared_reads(model, forward_and_backward(model, batch, True, "mrckl"))
    assert reads == ["region_classifier.net.3.bias in the model", "region_classifier.net.3.weight in the model"]
