"""The captured training step: forward and backward of a fixed-shape batch replayed as a CUDA graph.

On a GPU the UNITER step is launch-bound (hundreds of small kernels, each launched by the host). With ``"capture":
true`` in a run config, :class:`CapturedStep` pads each batch to fixed shapes (:mod:`uniter_fast.data.buckets`),
captures the model's forward and backward once per shape with ``torch.cuda.make_graphed_callables`` and replays
them for every later batch of that shape; a new shape is captured when first seen (all graphs share one memory
pool). The graphed forward is an autograd Function: its backward replays the captured backward and hands each
parameter its gradient, so everything after it runs as before, eagerly: gradient accumulation into ``.grad``,
DeepSpeed's gradient hooks (ZeRO-1/2 bucketing and reduction), loss scaling, clipping and the optimizer step. The
replay runs inside the engine's own forward (the model's ``forward`` stands in for the graph during that call), so
DeepSpeed's per-step bookkeeping and the hooks it puts on the loss run as in an uncaptured step.
The parameters a task's step reaches get a zero ``.grad`` before each replay where they have none: autograd would
otherwise adopt the graph's own gradient buffer as ``.grad``, which the next replay overwrites (0 + g is g exactly,
and the parameters the task does not reach keep ``None``, as in the eager step).

Where capture is impossible the step runs eagerly on the unpadded batch (exactly the run without capture) and one
log line says why: a device other than CUDA, the reference path (``fast: false``), a model whose loss reads the
padded layout or host values (``UniterPreTrainedModel.captures``: RE's rank loss, which draws a negative per row from
the host-checked ``num_bbs``; ITM with hard negatives, which picks and re-packs rows on the host), DeepSpeed ZeRO-3
(it gathers and frees parameters in module hooks inside forward and backward, host logic a graph would not repeat)
or DeepSpeed's ``torch_autocast`` (the engine wraps its own forward in autocast), a batch that cannot be padded
(ITM's ``itm-hn`` batches, whose ``sides`` has no padding), or a capture that fails (a host sync in the step).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from uniter_fast.data.buckets import Buckets, NotCapturable, pad_batch, shape_key
from uniter_fast.data.loader import move_to_device, pin_batch

logger = logging.getLogger(__name__)

Batch = dict[str, Any]
NOT_CAPTURED = "is not capturable (captures: False; its loss reads the padded layout or host values)"
"""The reason logged for a model whose ``captures`` is False (``UniterPreTrainedModel.captures``)."""


def capture_blocker(model: nn.Module, device: torch.device, engine: Any = None) -> Optional[str]:
    """Why the training step of ``model`` on ``device`` (under the DeepSpeed ``engine``, if any) cannot be
    captured; None when it can."""
    if device.type != "cuda":
        return f"device {device.type}: CUDA graphs need a CUDA device"
    if not getattr(model, "fast", False):
        return "the reference path (fast: false) runs the padded layout, whose shapes change with every batch"
    if not getattr(model, "captures", False):
        return f"{type(model).__name__} {NOT_CAPTURED}"
    if engine is not None and engine.zero_optimization_partition_weights():
        return "DeepSpeed ZeRO-3 gathers and frees parameters in module hooks inside forward and backward"
    if engine is not None and getattr(engine, "torch_autocast_enabled", lambda: False)():
        return "DeepSpeed torch_autocast wraps the engine's forward in autocast"
    return None


def flatten(batch: Batch) -> tuple[list[torch.Tensor], Callable[[Sequence[torch.Tensor]], Batch]]:
    """The tensors of a (nested) batch dict in a fixed order, and the function that rebuilds the dict from such a
    list (other values, such as ``task`` and ``max_seqlen``, are kept as constants)."""
    tensors: list[torch.Tensor] = []

    def walk(node: Any) -> Callable[[Sequence[torch.Tensor]], Any]:
        if isinstance(node, dict):
            parts = {key: walk(value) for key, value in node.items()}
            return lambda values: {key: part(values) for key, part in parts.items()}
        if isinstance(node, torch.Tensor):
            position = len(tensors)
            tensors.append(node)
            return lambda values: values[position]
        return lambda values: node

    return tensors, walk(batch)


class _GraphedStep(nn.Module):
    """``model(batch, task)`` as a module of tensors only (what ``make_graphed_callables`` captures); the outputs
    in the order of ``keys`` (set on the first call)."""

    def __init__(self, model: nn.Module, rebuild: Callable[[Sequence[torch.Tensor]], Batch], task: str) -> None:
        super().__init__()
        self.model, self.rebuild, self.task = model, rebuild, task
        self.keys: list[str] = []

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(self.rebuild(tensors), self.task)
        self.keys = sorted(out)
        return tuple(out[key] for key in self.keys)


class CapturedStep:
    """The forward of one training micro-batch, graph-captured per fixed shape (module doc).

    ``step(batch, task)`` takes a host batch of the fast collate and returns the model's outputs (``loss`` and the
    logged terms, 0-dim, on ``device``); back-propagate ``loss`` as usual (``engine.backward``). ``model`` is the
    module (a DeepSpeed engine's ``module``); ``engine`` the DeepSpeed engine around it, if any, whose forward runs
    the eager step. ``blocker`` is None while capture is on, else why it is off. At most ``max_graphs`` shapes are
    captured (each graph keeps its inputs and its parameter gradients in the shared pool); a batch of a further
    shape turns capture off for the rest of the run, with its log line.
    """

    def __init__(
        self, model: nn.Module, device: torch.device, buckets: Buckets, engine: Any = None, max_graphs: int = 64
    ) -> None:
        self.model, self.device, self.buckets, self.max_graphs = model, torch.device(device), buckets, max_graphs
        self.eager = engine if engine is not None else model
        self.graphs: dict[tuple[Any, ...], _GraphedStep] = {}
        self.reached: dict[str, list[nn.Parameter]] = {}  # task -> the parameters its step gives a gradient
        self.pool: Any = None
        self.blocker: Optional[str] = None
        self._off(capture_blocker(model, self.device, engine))

    def _off(self, reason: Optional[str]) -> None:
        """Turn capture off for the rest of the run with one log line saying why (nothing when ``reason`` is None)."""
        if reason is not None and self.blocker is None:
            self.blocker = reason
            logger.warning("capture: off (%s); the training step runs uncaptured", reason)

    def __call__(self, batch: Batch, task: str) -> dict[str, torch.Tensor]:
        """The outputs of ``model(batch, task)``: replayed from the graph of the batch's fixed shape, else eager."""
        if self.blocker is None:
            try:
                fixed = pad_batch(batch, self.buckets)
            except NotCapturable as err:
                self._off(str(err))
        if self.blocker is not None:
            return self.eager(move_to_device(batch, self.device), task)
        device_batch = move_to_device(pin_batch(fixed), self.device)  # pageable memory would sync the stream
        tensors, rebuild = flatten(device_batch)
        key = (task, shape_key(fixed))
        if key not in self.graphs and len(self.graphs) >= self.max_graphs:
            self._off(f"{self.max_graphs} graphs are held (max_graphs); a new shape would need another")
            return self.eager(move_to_device(batch, self.device), task)
        if task not in self.reached:  # one eager step, gradients returned, not accumulated
            params = [p for p in self.model.parameters() if p.requires_grad]
            grads = torch.autograd.grad(self.model(device_batch, task)["loss"], params, allow_unused=True)
            self.reached[task] = [p for p, g in zip(params, grads) if g is not None]
        if key not in self.graphs:
            graphed = self._capture(tensors, rebuild, task)
            if graphed is None:
                return self.eager(move_to_device(batch, self.device), task)
            self.graphs[key] = graphed
        for param in self.reached[task]:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        return self._replay(self.graphs[key], tensors, device_batch, task)

    def _replay(
        self, graphed: _GraphedStep, tensors: list[torch.Tensor], batch: Batch, task: str
    ) -> dict[str, torch.Tensor]:
        """``eager(batch, task)`` (the engine's forward, with its per-step bookkeeping and the hooks it puts on the
        loss for its backward) with the model's forward replaced, for this call, by the replay of ``graphed``."""

        def replay(*_: Any) -> dict[str, torch.Tensor]:
            outputs = graphed(*tensors)
            return dict(zip(graphed.keys, outputs))

        self.model.forward = replay
        try:
            return self.eager(batch, task)
        finally:
            del self.model.forward

    def _capture(
        self, tensors: list[torch.Tensor], rebuild: Callable[[Sequence[torch.Tensor]], Batch], task: str
    ) -> Optional[_GraphedStep]:
        """Capture forward + backward of ``task`` on these inputs (a few warm-up runs first); None, with capture
        turned off, when the step cannot be captured."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        step = _GraphedStep(self.model, rebuild, task)
        try:
            return torch.cuda.make_graphed_callables(step, tuple(tensors), allow_unused_input=True, pool=self.pool)
        except RuntimeError as err:  # e.g. "operation not permitted when stream is capturing": a host sync
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self._off(f"capturing the {task} step failed: {first_line}")
            return None
