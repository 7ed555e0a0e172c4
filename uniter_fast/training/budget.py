"""Token budgets: the tokens of one optimizer update (``tokens_per_update``), the gradient accumulation that keeps it
on any number of ranks, and the micro-batch budget ``train_batch_size: "auto"`` sized from the device's memory.

The rule. A micro-batch holds ``train_batch_size`` tokens (the original's token-bucket count: the longest example of
the batch times its examples, ~1.006x the valid tokens for length-bucketed batches), each of ``world`` ranks runs
``gradient_accumulation_steps`` of them per update, so an update holds ``train_batch_size * world *
gradient_accumulation_steps`` tokens. With ``tokens_per_update`` given, the accumulation is derived:
``tokens_per_update / (train_batch_size * world)``, which must be an integer >= 1 (:func:`accumulation_steps`). The
original UNITER-base recipe: 10240 tokens x 8 GPUs x 2 steps = 163,840 tokens per update.

``"auto"`` (:func:`auto_budget`): on CUDA, the largest budget of the ladder (multiples of :data:`LADDER_STEP` up to
:data:`MAX_AUTO_TOKENS`) that divides the tokens per update per rank and whose estimated training memory
(:func:`training_memory`) fits :data:`SAFE_FRACTION` of the device's memory; without CUDA, or without
``tokens_per_update``, the recipe's own budget (the config class's default, 10240 for pretraining).

The estimate (bytes, for ``T`` valid tokens of a micro-batch on one rank):

* static: :data:`BYTES_PER_PARAMETER` = 20 per parameter (bf16 weights and gradients, DeepSpeed's fp32 master
  weights and gradient partitions, AdamW's two fp32 moments; unpartitioned: one rank's worst case);
* saved activations (what autograd keeps from the forward for the backward): per valid token
  ``L * (A_H * h + A_I * i) + E_H * h + E_0`` plus, for ITM+WRA, ``ITM_H * h + ITM_0``, with ``L`` layers, hidden
  size ``h``, intermediate size ``i``; each layer's attention (:func:`attention_bytes`: flash keeps q, k, v in bf16
  and a log-sum-exp); 2 bytes per Linear weight the task runs (autocast's bf16 copies);
* transient: :data:`BACKWARD_LAYERS` layers' activations (the backward's working set) and the MLM logits of one
  chunk of the fused loss (at most 1/8 of the masked rows' [rows, vocab] fp32 logits, 3 copies).

The activation constants are measured, not assumed: :func:`saved_tensor_bytes` sums the storages autograd saves
during a forward under bf16 autocast on the token-bucket batches a run draws from the bundled corpus
(``bench/budget_calibration.py`` fits them for the tiny, base and large widths at 1 and 2 layers, the CPU attention's
padded q, k, v and scores counted, not fitted). Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", arXiv 2205.05198) count ~34 bytes per token per layer per hidden in 16-bit without the attention
scores: 18 h + 4 i at i = 4h (their attention's q, k, v are 4 h of the 18 h; here they are in
:func:`attention_bytes`). The fitted ``A_I`` = 3.96 is their 4 (the GELU's input and the second Linear's input, bf16);
``A_H`` = 22.2 is larger than their 14 h outside q, k, v because autocast casts the LayerNorm output once per
Linear (three bf16 copies for q, k and v) and keeps the residual stream and the LayerNorm inputs in fp32.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Callable, Optional, Union

import torch

from uniter_fast.config import UniterConfig
from uniter_fast.errors import ConfigError

AUTO = "auto"
"""The ``train_batch_size`` value that sizes the micro-batch from the device's memory."""
LADDER_STEP = 2048
"""``auto`` budgets are multiples of this (10240, the original's, is one)."""
MAX_AUTO_TOKENS = 65536
"""The largest ``auto`` budget (the issue's 32-64k valid tokens for UNITER-base on an 80 GB GPU)."""
SAFE_FRACTION = 0.8
"""The share of the device's total memory the estimate may fill (the rest: the allocator's fragmentation, DeepSpeed's
communication buckets, the CUDA context, the estimate's error)."""
BYTES_PER_PARAMETER = 20
"""bf16 weight and gradient (2 + 2), fp32 master weight and gradient partition (4 + 4), AdamW's moments (8)."""
BACKWARD_LAYERS = 2
"""Layers' worth of activations the backward holds beside the saved ones (a layer's gradients and recomputations)."""
FLASH_BYTES_PER_HIDDEN = 6
"""Flash / varlen attention keeps q, k, v in bf16 (its output is the next Linear's input, in ``A_H``)..."""
FLASH_BYTES_PER_HEAD = 4
"""... and an fp32 log-sum-exp per head and token."""
PADDED_BYTES_PER_HIDDEN = 12
"""PyTorch's math SDPA over padded sequences (the CPU path) keeps q, k, v padded in fp32..."""
PADDED_BYTES_PER_SCORE = 12
"""... and three fp32 [B, heads, s, s] tensors of scores."""
MLM_MASK_SHARE = 0.15
"""Masked rows of an MLM batch per token (the masking probability; every token counted as text: an upper bound)."""

# measured (bench/budget_calibration.py, budget 4096, 24 forwards; every row within 1.4% of its fit): saved bytes
# per valid token under bf16 autocast on the fast path, besides the attention and the weight copies
A_H = 22.2
"""Per layer, per hidden unit (Korthikanti et al.: 14, their 18 less q, k, v, which are in :func:`attention_bytes`)."""
A_I = 3.96
"""Per layer, per intermediate unit (Korthikanti et al.: 4)."""
E_H = 10.3
"""Embeddings and heads, per hidden unit."""
E_0 = 2386.0
"""Embeddings' inputs (the region features in bf16 for the image Linear), per token."""
ITM_H = 7.3
"""ITM+WRA's extra (the WRA's normalised text and region states, the OT grids), per hidden unit..."""
ITM_0 = 77.0
"""... and per token."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """The estimated training memory of one micro-batch on one rank, in bytes."""

    static: int
    saved: int
    transient: int

    @property
    def total(self) -> int:
        """static + saved + transient."""
        return self.static + self.saved + self.transient


HEAD_MODULES = {
    "mlm": ("cls.",),
    "mrfr": ("feat_regress.",),
    "mrc": ("region_classifier.",),
    "mrckl": ("region_classifier.",),
    "itm": ("uniter.pooler.", "itm_output"),
}
"""The modules of ``UniterForPretraining`` that each task's forward runs besides the encoder and its embeddings."""
FUSED_PROJECTIONS = ("cls.predictions.decoder", "region_classifier.net.3")
"""The heads' output projections, which the fused losses read in chunks without keeping a bf16 copy."""


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """``UniterForPretraining(config)``'s ``parameters`` and, per task, the weights of the Linear layers its forward
    runs (``cast_weights``: what autocast keeps a bf16 copy of during the forward), less the fused losses'
    projections."""

    parameters: int
    cast_weights: dict[str, int]


BudgetModel = tuple[UniterConfig, list[str], ModelSize]
"""What sizes an ``"auto"`` budget: the model config, the training task kinds and the model's :class:`ModelSize`."""


def model_size(model: torch.nn.Module) -> ModelSize:
    """The counts of :class:`ModelSize` of a pretraining model (build it on the meta device: no memory, no init)."""
    linear = {
        name: m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name not in FUSED_PROJECTIONS
    }
    heads = tuple(prefix for prefixes in HEAD_MODULES.values() for prefix in prefixes)
    shared = sum(n for name, n in linear.items() if not name.startswith(heads))
    cast = {
        task: shared + sum(n for name, n in linear.items() if name.startswith(prefixes))
        for task, prefixes in HEAD_MODULES.items()
    }
    return ModelSize(sum(p.numel() for p in model.parameters()), cast)


def attention_bytes(config: UniterConfig, tokens: int, padded: Optional[tuple[int, int]] = None) -> int:
    """Bytes one layer's attention keeps besides the Linear inputs: flash / varlen kernels on ``tokens`` valid tokens
    (``padded`` None: the GPU), or PyTorch's math SDPA over ``padded`` = (sequences B, longest s) (the CPU)."""
    h, heads = config.hidden_size, config.num_attention_heads
    if padded is None:
        return int(tokens * (FLASH_BYTES_PER_HIDDEN * h + FLASH_BYTES_PER_HEAD * heads))
    sequences, longest = padded
    return sequences * longest * (PADDED_BYTES_PER_HIDDEN * h + PADDED_BYTES_PER_SCORE * heads * longest)


def layer_bytes_per_token(config: UniterConfig) -> float:
    """Saved bytes per valid token of one encoder layer under bf16 autocast with flash attention:
    ``A_H*h + A_I*i`` and the attention's (:func:`attention_bytes`)."""
    return A_H * config.hidden_size + A_I * config.intermediate_size + attention_bytes(config, 1)


def token_bytes(config: UniterConfig, task: str) -> float:
    """Saved bytes per valid token of a ``task`` micro-batch (``mlm``, ``mrfr``, ``mrc``, ``mrckl``, ``itm``) besides
    the attention and the weight copies: the layers' ``A_H*h + A_I*i``, the embeddings and heads, ITM+WRA's extra."""
    h, layers = config.hidden_size, config.num_hidden_layers
    per_token = layers * (A_H * h + A_I * config.intermediate_size) + E_H * h + E_0
    return per_token + (ITM_H * h + ITM_0 if task == "itm" else 0.0)


def saved_bytes(
    config: UniterConfig, task: str, tokens: int, size: ModelSize, padded: Optional[tuple[int, int]] = None
) -> int:
    """Estimated bytes autograd saves in the forward of a ``task`` micro-batch of ``tokens`` valid tokens under bf16
    autocast: :func:`token_bytes` per token, the bf16 copies of the task's ``size.cast_weights`` and each layer's
    :func:`attention_bytes` (``padded``: (B, longest) for the CPU's padded attention; None: flash, the GPU)."""
    attention = config.num_hidden_layers * attention_bytes(config, tokens, padded)
    return int(token_bytes(config, task) * tokens + 2 * size.cast_weights[task] + attention)


def training_memory(config: UniterConfig, tasks: list[str], tokens: int, size: ModelSize) -> MemoryEstimate:
    """One rank's training memory for micro-batches of ``tokens`` tokens of the worst of ``tasks`` on a GPU (flash
    attention: no scores), see the module docstring."""
    saved = max(saved_bytes(config, task, tokens, size) for task in tasks)
    transient = BACKWARD_LAYERS * layer_bytes_per_token(config) * tokens
    if "mlm" in tasks:
        transient += 3 * 4 * MLM_MASK_SHARE * tokens * config.vocab_size / 8
    return MemoryEstimate(BYTES_PER_PARAMETER * size.parameters, saved, int(transient))


def accumulation_steps(tokens_per_update: int, budget: int, world: int) -> int:
    """``tokens_per_update / (budget * world)``: the micro-batches per rank and update; a ``ConfigError`` (one line
    naming the fields, the expected and the given values) unless it is an integer >= 1."""
    per_step = budget * world
    if tokens_per_update < per_step:
        raise ConfigError(
            f"tokens_per_update={tokens_per_update} is smaller than one micro-batch on every rank: "
            f"train_batch_size={budget} x {world} rank(s) = {per_step} tokens; give tokens_per_update >= {per_step} "
            f"or a smaller train_batch_size"
        )
    if tokens_per_update % per_step:
        low = tokens_per_update // per_step * per_step
        raise ConfigError(
            f"tokens_per_update={tokens_per_update} is not a multiple of train_batch_size={budget} x {world} "
            f"rank(s) = {per_step} tokens (the accumulation steps must be an integer); expected a multiple such as "
            f"{low} or {low + per_step}"
        )
    return tokens_per_update // per_step


def cuda_memory_bytes() -> Optional[int]:
    """The total memory of the current CUDA device in bytes; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


def auto_budget(
    model: BudgetModel, tokens_per_update: int, world: int, device_memory: int
) -> tuple[int, MemoryEstimate]:
    """The largest ladder budget (multiple of :data:`LADDER_STEP`, <= :data:`MAX_AUTO_TOKENS`) that divides the
    tokens per update per rank and whose :func:`training_memory` fits ``SAFE_FRACTION * device_memory``; with its
    estimate. A ``ConfigError`` when none does."""
    config, tasks, size = model
    per_rank, rem = divmod(tokens_per_update, world)
    for budget in range(MAX_AUTO_TOKENS, 0, -LADDER_STEP):
        if rem or per_rank % budget:
            continue
        estimate = training_memory(config, tasks, budget, size)
        if estimate.total <= SAFE_FRACTION * device_memory:
            return budget, estimate
    raise ConfigError(
        f'train_batch_size "auto": no multiple of {LADDER_STEP} tokens divides tokens_per_update={tokens_per_update} '
        f"per rank ({world} rank(s)) and fits {SAFE_FRACTION:.0%} of the device's {device_memory / 2**30:.1f} GiB; "
        "give train_batch_size in tokens"
    )


@dataclasses.dataclass(frozen=True)
class BudgetChoice:
    """The resolved budget of a run: the micro-batch ``budget`` (tokens per rank), the ``accumulation`` steps, the
    ``tokens_per_update`` (None when not configured) and, for ``auto`` on CUDA, the ``estimate`` and the
    ``device_memory`` (bytes)."""

    budget: int
    accumulation: Optional[int]
    tokens_per_update: Optional[int]
    world: int
    how: str
    estimate: Optional[MemoryEstimate] = None
    device_memory: Optional[int] = None

    def line(self) -> str:
        """The run's one log line about its budget."""
        text = f"token budget: train_batch_size={self.budget} ({self.how})"
        if self.estimate is not None and self.device_memory is not None:
            text += (
                f", estimated training memory {self.estimate.total / 2**30:.1f} GiB of the device's "
                f"{self.device_memory / 2**30:.1f} GiB"
            )
        if self.accumulation is not None:
            text += (
                f", gradient_accumulation_steps={self.accumulation} x {self.world} rank(s) -> "
                f"tokens_per_update={self.tokens_per_update}"
            )
        return text


def choose_budget(
    train_batch_size: Union[int, str],
    tokens_per_update: Optional[int],
    world: int,
    fallback: int,
    model: Optional[BudgetModel] = None,
    device_memory: Optional[int] = None,
) -> BudgetChoice:
    """Resolve a run's ``train_batch_size`` (tokens, or :data:`AUTO`) and ``tokens_per_update`` on ``world`` ranks:
    ``auto`` picks :func:`auto_budget` for ``model`` (its config and training tasks) on a CUDA device of
    ``device_memory`` bytes, else ``fallback`` (the recipe's budget); the accumulation comes from
    :func:`accumulation_steps` when ``tokens_per_update`` is given (else None: ``ds.json``'s or the run config's)."""
    estimate = None
    if train_batch_size != AUTO:
        budget, how = int(train_batch_size), "configured"
    elif tokens_per_update is None:
        budget, how = fallback, f"auto without tokens_per_update: the recipe's {fallback}"
    elif device_memory is None or model is None:
        budget, how = fallback, f"auto without a CUDA device: the recipe's {fallback}"
    else:
        budget, estimate = auto_budget(model, tokens_per_update, world, device_memory)
        how = "auto"
    accumulation = None if tokens_per_update is None else accumulation_steps(tokens_per_update, budget, world)
    return BudgetChoice(budget, accumulation, tokens_per_update, world, how, estimate, device_memory)


def saved_tensor_bytes(fn: Callable[[], Any], model: torch.nn.Module) -> int:
    """The peak bytes of the tensors autograd graphs hold for backward during ``fn()``, on any device: each saved
    tensor's storage counted once while some graph holds it (``torch.autograd.graph.saved_tensors_hooks``), the
    parameters' storages left out. What a step keeps alive between its forwards and backwards; the CUDA allocator's
    peak adds the transient buffers."""
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live: dict[int, list[int]] = {}  # storage pointer -> [graph references, bytes]
    state = {"now": 0, "peak": 0}

    class Saved:
        def __init__(self, tensor: torch.Tensor) -> None:
            self.tensor = tensor

    def release(pointer: int) -> None:
        live[pointer][0] -= 1
        if live[pointer][0] == 0:
            state["now"] -= live.pop(pointer)[1]

    def pack(tensor: torch.Tensor) -> Saved:
        saved = Saved(tensor)
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer in excluded or pointer == 0:
            return saved
        if pointer not in live:
            live[pointer] = [0, storage.nbytes()]
            state["now"] += storage.nbytes()
            state["peak"] = max(state["peak"], state["now"])
        live[pointer][0] += 1
        weakref.finalize(saved, release, pointer)
        return saved

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda saved: saved.tensor):
        fn()
    return state["peak"]


def forward_saved_bytes(model: torch.nn.Module, batch: dict[str, Any], task: str) -> int:
    """:func:`saved_tensor_bytes` of ``model(batch, task)`` (a pretraining forward, training mode) under bf16
    autocast on the device of ``batch["txt_lens"]``."""
    device = batch["txt_lens"].device.type
    model.train()

    def forward() -> Any:
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(batch, task)

    return saved_tensor_bytes(forward, model)


def padded_shape(batch: dict[str, Any]) -> tuple[int, int]:
    """(sequences, longest joint length) of a batch (``txt_lens`` / ``num_bbs`` [B]): the shape a padded attention
    runs on."""
    lengths = batch["txt_lens"] + batch["num_bbs"]
    return int(lengths.numel()), int(lengths.max())
