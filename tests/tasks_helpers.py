"""Shared helpers of the task tests: tiny models with non-trivial parameters, tiny task exports, random rows,
original-layout checkpoints, fast-vs-reference comparison and a short learning loop on a bundled set."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch

from uniter_fast.config import UniterConfig
from uniter_fast.model import Model
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model, save_task_model
from uniter_fast.tasks.data import collate_rows, row

VOCAB = 200


def tiny_config(**overrides: Any) -> UniterConfig:
    """The tiny model without dropout (deterministic comparisons), eager attention."""
    fields = dict(attention_backend="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return UniterConfig.tiny(**{**fields, **overrides})


def perturb(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter (LayerNorm 1/0 and zero biases would hide mistakes)."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn_like(param))
    return model


def export_task_model(
    task_name: str, options: dict[str, Any], config: UniterConfig, path: str, seed: int = 0, noise: float = 0.0
) -> str:
    """A fresh ``task_name`` model of ``config`` (``torch.manual_seed(seed)``; every parameter perturbed by ``noise``
    when > 0) exported to ``path`` as ``finetune.py`` exports it (``task.json`` with the options); returns ``path``."""
    task = get_task(task_name)
    torch.manual_seed(seed)
    model, full = load_task_model(task, None, options, config)
    if noise > 0:
        perturb(model, noise)
    save_task_model(model, task, full, path)
    return path


def random_row(
    gen: torch.Generator,
    txt_len: int,
    num_bb: int,
    vocab: int = VOCAB,
    txt_types: Optional[list[int]] = None,
    img_type: Optional[int] = None,
) -> dict[str, Any]:
    """One sequence: [CLS]-free random ids of length ``txt_len``, relu'd random features, valid 7-d boxes."""
    ids = torch.randint(5, vocab, (txt_len,), generator=gen)
    feat = torch.randn(num_bb, 2048, generator=gen).relu()
    corners = torch.rand(num_bb, 4, generator=gen).sort(dim=1).values[:, [0, 2, 1, 3]]
    wh = corners[:, 2:] - corners[:, :2]
    pos = torch.cat([corners, wh, wh[:, :1] * wh[:, 1:]], dim=1)
    types = None if txt_types is None else torch.tensor(txt_types)
    img_types = None if img_type is None else torch.full((num_bb,), img_type, dtype=torch.long)
    return row(ids, feat, pos, types, img_types)


def random_batch(lengths: list[tuple[int, int]], seed: int = 0, **row_kwargs: Any) -> dict[str, Any]:
    """A collated batch (padded + packed) of random rows with (text, regions) ``lengths``."""
    gen = torch.Generator().manual_seed(seed)
    return collate_rows([random_row(gen, t, n, **row_kwargs) for t, n in lengths], "test")


def encoder_rows(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The padded last-layer output [B, L, H] of ``model.uniter`` (with the batch's type ids), in float64."""
    return model.uniter.forward_batch(batch).double()


def encoder_keys(config: UniterConfig) -> list[str]:
    """The ``uniter.*`` keys of a UNITER encoder (from the encoder itself)."""
    return [f"uniter.{k}" for k in Model(config).state_dict()]


def original_checkpoint(
    config: UniterConfig,
    head_shapes: dict[str, tuple[int, ...]],
    type_rows: int = 2,
    extra_words: int = 0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """A state_dict with the original key names and shapes: the encoder (``type_rows`` type rows, ``extra_words``
    appended word rows) plus ``head_shapes``, random fp16 values as the original's apex O2 saves."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in Model(config).state_dict().items():
        shape = list(value.shape)
        if key == "embeddings.token_type_embeddings.weight":
            shape[0] = type_rows
        if key == "embeddings.word_embeddings.weight":
            shape[0] += extra_words
        state[f"uniter.{key}"] = torch.randn(shape, generator=gen).half()
    for key, shape in head_shapes.items():
        state[key] = torch.randn(shape, generator=gen).half()
    return state


def compare_fast_reference(
    build: Callable[[bool], torch.nn.Module], batch: dict[str, Any], rtol: float = 1e-5
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Run one training step's forward + backward on the fast (packed) and reference (padded) paths of two models
    with the same weights; assert the losses and every gradient agree to ``rtol``. Returns both gradients."""
    fast, reference = build(True), build(False)
    reference.load_state_dict(fast.state_dict())
    grads = []
    losses = []
    for model in (fast, reference):
        model.zero_grad()
        loss = model(batch)["loss"]
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.isfinite(losses[0]) and math.isclose(float(losses[0]), float(losses[1]), rel_tol=rtol)
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=rtol * 10, atol=1e-6, msg=name)
    return grads[0], grads[1]


def learn_subset(
    model: torch.nn.Module, dataset: Any, examples: int, steps: int, batch: int = 16, lr: float = 3e-3, seed: int = 0
) -> list[float]:
    """Train ``model`` (AdamW, the original betas) for ``steps`` on the first ``examples`` items of ``dataset``;
    returns the loss of every step."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    items = [dataset[i] for i in range(examples)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (10x slower on a busy 2-core box)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    losses = []
    for _ in range(steps):
        chosen = rng.choice(examples, size=min(batch, examples), replace=False)
        loss = model(dataset.collate([items[i] for i in chosen]))["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        losses.append(float(loss.detach()))
    model.eval()
    torch.set_num_threads(threads)
    return losses
