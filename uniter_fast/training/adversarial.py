"""VILLA's adversarial fine-tuning (AFT; Gan et al., NeurIPS 2020, arXiv 2006.06195; the released
``train_{vqa,nlvr2,ve,vcr}_adv.py`` of github.com/zhegan27/VILLA): the config block and the micro-batch step.

Per micro-batch: a clean forward with gradient (its logits ``z``), then K = ``adv_steps`` perturbed forwards, each
with loss ``(task_loss(adv) + adv_kl_weight * SKL(z, z_adv)) / K`` and a backward, the parameter gradients summing
over the K steps (one optimizer step per batch); a task without logits (pretraining's MRFR) has no KL and so no clean
forward, nor has one whose KL weight is 0. A run of several objectives (pretraining, VCR's second stage) may weigh the
KL per objective (``adv_kl_weights``, overriding ``adv_kl_weight`` for the objectives it names). ``SKL`` is the
symmetric KL of the softmax of the logits, summed over the classes and averaged over the rows (VILLA's
``kl.sum(1).mean()``, equal to its VQA ``.mean() x #answers``).
Between steps each perturbation ascends, ``delta += lr * g / ||g||`` (per row of the batch over all its positions,
L2 or L-inf), ``g`` unscaled from the loss scale, then is projected to ``adv_max_norm`` (0: none). Perturbations:
``uniter_fast.model.perturbation`` (word embeddings after the lookup; raw region features before ``img_linear``).

The KL back-propagates through the clean logits too, as in the released code. Rather than keep every graph with
``retain_graph=True`` (VILLA issue #4) and run the clean graph's backward K times, the step takes the KL against a
detached copy of ``z``, sums the gradients that reach it over the K steps, and back-propagates that sum through the
clean graph once at the end: the same gradients (backward is linear), one backward fewer per step, and only the clean
graph and the current perturbed graph alive at a time.

``reuse_clean_forward`` (opt-in; needs ``adv_init_mag`` 0): the first perturbation is zero, so step 1's perturbed
forward is the clean forward (same dropout masks: the clean ones). The clean forward then carries the zero
perturbations as leaves; step 1's ascent direction comes from an input-only backward of ``task(z) / K`` through the
clean graph (``torch.autograd.backward(..., inputs=deltas)``: no weight gradient is computed), its KL is 0, and its
parameter gradients are folded into the final backward through the clean graph. K forwards, K full backwards and one
input-only backward instead of K + 1 forwards and K + 1 backwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

import torch

from uniter_fast.errors import ConfigError
from uniter_fast.json_types import is_number
from uniter_fast.losses.fused_linear import kept_gradients
from uniter_fast.model.perturbation import delta_grid, delta_slots, with_deltas

MODALITIES = ("text", "image", "text+image", "alter")
NORM_TYPES = ("l2", "linf")
MicroStep = Callable[[Any, dict, str], dict]
"""``micro_step(engine, batch, task) -> {name: 0-dim tensor}``: forward(s) and backward(s) of one micro-batch."""


@dataclasses.dataclass
class AdversarialConfig:
    """The ``adversarial`` block of a fine-tuning or pretraining config (VILLA's option names; defaults: the
    released fine-tuning configs')."""

    adv_steps: int = 3
    adv_lr_txt: float = 1e-3
    adv_lr_img: float = 1e-3
    adv_kl_weight: float = 1.5
    adv_max_norm: float = 0.0
    adv_init_mag: float = 0.0
    norm_type: str = "l2"
    adv_modality: str = "text"
    reuse_clean_forward: bool = False
    adv_kl_weights: dict[str, float] = dataclasses.field(default_factory=dict)

    def kl_weight(self, objective: str) -> float:
        """The KL weight of ``objective`` (``UniterPreTrainedModel.objective``): its ``adv_kl_weights`` entry, else
        ``adv_kl_weight``."""
        return self.adv_kl_weights.get(objective, self.adv_kl_weight)

    @property
    def branches(self) -> list[tuple[bool, bool]]:
        """(perturb text, perturb image) of each perturbed forward of a step: one, or two for ``alter``."""
        if self.adv_modality == "alter":
            return [(True, False), (False, True)]
        return [("text" in self.adv_modality, "image" in self.adv_modality)]


def parse_adversarial(raw: Any, where: str) -> AdversarialConfig:
    """The ``adversarial`` block ``raw`` (a JSON object) checked; one-line ``ConfigError`` naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: 'adversarial' must be a JSON object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(AdversarialConfig)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} in 'adversarial'; valid keys are {sorted(fields)}")
    cfg = AdversarialConfig(**raw)
    for name, value in dataclasses.asdict(cfg).items():
        key = f"{where}: adversarial.{name}"
        if name == "adv_steps":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
        elif name == "norm_type":
            if value not in NORM_TYPES:
                raise ConfigError(f"{key} must be one of {list(NORM_TYPES)}, got {value!r}")
        elif name == "adv_modality":
            if value not in MODALITIES:
                raise ConfigError(f"{key} must be one of {list(MODALITIES)}, got {value!r}")
        elif name == "reuse_clean_forward":
            if not isinstance(value, bool):
                raise ConfigError(f"{key} must be true or false, got {value!r}")
        elif name == "adv_kl_weights":
            if not isinstance(value, dict) or not all(_weight(w) for w in value.values()):
                raise ConfigError(f"{key} must be a JSON object of objective: finite number >= 0, got {value!r}")
        elif not _weight(value):
            raise ConfigError(f"{key} must be a finite number >= 0, got {value!r}")
    if cfg.reuse_clean_forward and cfg.adv_init_mag != 0:
        raise ConfigError(
            f"{where}: adversarial.adv_init_mag must be 0 with reuse_clean_forward true (step 1 reuses the clean "
            f"forward at a zero perturbation), got {cfg.adv_init_mag!r}"
        )
    return cfg


def _weight(value: Any) -> bool:
    """Whether ``value`` is a finite number >= 0 (not a bool)."""
    return is_number(value) and math.isfinite(value) and value >= 0


def check_kl_weights(cfg: AdversarialConfig, objectives: list[str], where: str) -> None:
    """``ConfigError`` naming ``where`` unless every objective that ``cfg.adv_kl_weights`` names is one of the run's
    ``objectives`` with a KL (its task logits; pretraining's MRFR has none)."""
    unknown = sorted(set(cfg.adv_kl_weights) - set(objectives))
    if unknown:
        raise ConfigError(
            f"{where}: adversarial.adv_kl_weights names {unknown}, which this run does not train with a KL; "
            f"its objectives with one are {sorted(objectives)}"
        )


def parse_adversarial_block(raw: dict[str, Any], where: str) -> Optional[AdversarialConfig]:
    """The ``adversarial`` block of a run config ``raw`` (absent or null: None), checked; ``capture`` true with it is
    refused in one line (the captured step replays the plain step only)."""
    if raw.get("adversarial") is None:
        return None
    cfg = parse_adversarial(raw["adversarial"], where)
    if raw.get("capture") is True:
        raise ConfigError(
            f"{where}: capture true and an adversarial block: the captured step replays the plain step only; "
            "set capture false"
        )
    return cfg


def symmetric_kl(clean: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """KL(p || q) + KL(q || p) of p = softmax(clean), q = softmax(adv) over the last dim, summed over it and averaged
    over the rows; [R, C] logits (any float dtype) -> fp32 0-dim. Entries of -1e4 (RE's non-regions) get p = q = 0."""
    clean, adv = clean.float(), adv.float()
    log_p, log_q = clean.log_softmax(-1), adv.log_softmax(-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()


def ascend(delta: torch.Tensor, grad: torch.Tensor, lr: float, norm_type: str, max_norm: float) -> torch.Tensor:
    """One ascent of ``delta`` [B, ...] along ``grad`` (same shape, unscaled): ``delta + lr * g / ||g||`` with the
    norm per row over all its positions (L2, or L-inf), clamped at 1e-8; then projected to ``max_norm`` (L2: rows
    longer than it rescaled to it; L-inf: entries clamped to +-max_norm; 0: none). Returns a new detached tensor."""
    rows = grad.flatten(1)
    norm = rows.norm(dim=1) if norm_type == "l2" else rows.abs().amax(dim=1)
    shape = (-1,) + (1,) * (delta.dim() - 1)
    delta = (delta + lr * grad / norm.clamp(min=1e-8).view(shape)).detach()
    if max_norm > 0:
        if norm_type == "l2":
            length = delta.flatten(1).norm(dim=1)
            delta = delta * torch.where(length > max_norm, max_norm / length, torch.ones_like(length)).view(shape)
        else:
            delta = delta.clamp(-max_norm, max_norm)
    return delta


def initial_delta(shape: torch.Size, valid: torch.Tensor, init_mag: float, norm_type: str) -> torch.Tensor:
    """fp32 zeros of ``shape`` [B, N, D] (``init_mag`` 0, VILLA's released setting), else uniform noise at the
    ``valid`` [B, N] positions as FreeLB initialises it: L2, U(-1, 1) x init_mag / sqrt(valid positions x D) per
    row; L-inf, U(-init_mag, init_mag)."""
    delta = torch.zeros(shape, device=valid.device)
    if init_mag == 0:
        return delta
    mask = valid[..., None].float()
    if norm_type == "l2":
        dims = (valid.sum(1).float() * shape[-1]).clamp(min=1).view(-1, 1, 1)
        return delta.uniform_(-1, 1) * mask * (init_mag / dims.sqrt())
    return delta.uniform_(-init_mag, init_mag) * mask


def plain_step(engine: Any, batch: dict, task: str) -> dict:
    """The plain micro-batch step: forward, backward (gradients summed over micro-batches); the forward's outputs."""
    out = engine(batch, task)
    engine.backward(out["loss"], scale_wrt_gas=False)
    return out


class LossScale:
    """Records the gradient that reaches a loss in backward: the loss scale the engine multiplied it by (1 in fp32 /
    bf16, the dynamic scale in fp16), read whatever scaler the engine uses."""

    def __init__(self, loss: torch.Tensor) -> None:
        self.value = torch.ones((), device=loss.device)
        loss.register_hook(self._record)

    def _record(self, grad: torch.Tensor) -> None:
        self.value = grad.detach().float()


def input_scale(engine: Any) -> float:
    """The loss scale for a backward that does not go through ``engine.backward`` (the input-only backward of
    ``reuse_clean_forward``): the DeepSpeed optimizer's current ``loss_scale`` (fp16), else 1. Its value cancels in
    the ascent (g / scale); it only keeps fp16 gradients in range as the engine's own backward does."""
    value = getattr(getattr(engine, "optimizer", None), "loss_scale", None)
    scale = 1.0 if value is None else float(value)  # a number or a 0-dim tensor, as the scaler keeps it
    return scale if math.isfinite(scale) and scale > 0 else 1.0


@contextlib.contextmanager
def engine_hooks_suspended(outputs: dict) -> Iterator[None]:
    """Runs the body without the hooks a DeepSpeed engine put on the forward's ``outputs`` (the tensors of the dict),
    then registers them again. The engine's backward prologue (ZeRO's gradient bookkeeping, and a refusal under
    ZeRO-0) runs from those hooks once per forward, on the first backward through it: an input-only backward is no
    engine backward and must not take it from the ``engine.backward`` that follows. No-op for other engines."""
    managers = {}
    for tensor in outputs.values():
        for manager in getattr(tensor, "_backward_hook_managers", ()):  # DeepSpeed's OutputBackwardHookManager
            managers[id(manager)] = manager
    for manager in managers.values():
        manager.remove_hooks()
    try:
        yield
    finally:
        for manager in managers.values():
            manager.register_hooks_on_outputs(outputs)


def backward(engine: Any, loss: torch.Tensor, last: bool) -> None:
    """``engine.backward(loss)`` (gradients summed) for one of several backward passes of a micro-batch: on a DeepSpeed
    engine only the ``last`` may be a gradient-accumulation boundary (where ZeRO reduces the summed gradients into its
    partitions); the others are marked as within the accumulation, as the micro-batches before a boundary are."""
    if hasattr(engine, "set_gradient_accumulation_boundary"):
        natural = (engine.micro_steps + 1) % engine.gradient_accumulation_steps() == 0
        engine.set_gradient_accumulation_boundary(natural and last)
    engine.backward(loss, scale_wrt_gas=False)


class AdversarialStep:
    """The AFT micro-batch step for the training loop (``Trainer(micro_step=...)``): ``step(engine, batch, task)``
    runs the forwards and backwards of one micro-batch and returns ``loss`` (the sum of the K step losses: the
    objective whose gradient was accumulated), ``adv_task_loss`` and ``adv_kl`` (their means over the perturbed
    forwards), detached 0-dim tensors. ``engine`` is a DeepSpeed engine or anything with its ``__call__(batch, task,
    with_logits=...)`` and ``backward(loss, scale_wrt_gas=False)``; the task model's forward must take
    ``with_logits`` and return ``logits`` (None where the task has no softmax to compare: its perturbed forwards then
    take the task loss only). ``model``: the task model the engine runs; its ``config.hidden_size`` is the width H of
    the word embeddings; its ``objective(task)`` names the KL weight of the task's steps
    (:meth:`AdversarialConfig.kl_weight`). A task for which its ``has_logits(task)`` is False (pretraining's MRFR), or
    whose KL weight is 0, has nothing for the clean forward to give: that forward is skipped (K forwards and K
    backwards, the last one the accumulation boundary; ``adv_kl`` 0).
    ``adv_steps`` 0 is the plain step. With ``reuse_clean_forward`` the input-only backward is scaled by the engine's
    ``optimizer.loss_scale`` where it has one (:func:`input_scale`)."""

    def __init__(self, cfg: AdversarialConfig, model: Any) -> None:
        self.cfg, self.hidden_size, self.has_logits = cfg, model.config.hidden_size, model.has_logits
        self.objective = model.objective
        self.trace: Optional[list[dict[str, Any]]] = None  # set to [] to record the perturbations (tests)

    def __call__(self, engine: Any, batch: dict, task: str) -> dict:
        cfg = self.cfg
        if cfg.adv_steps == 0:
            return plain_step(engine, batch, task)
        slots = delta_slots(batch) if "packed" in batch else None
        branches = [self._initial(batch, text, image) for text, image in cfg.branches]
        count = cfg.adv_steps * len(branches)
        kl_weight = cfg.kl_weight(self.objective(task))
        # no KL (no logits: MRFR; or a weight of 0): no clean forward, and none to share; step 1 is a perturbed
        # forward at the zero perturbation
        with_kl = self.has_logits(task) and kl_weight > 0
        reuse = cfg.reuse_clean_forward and with_kl
        clean_out: Optional[dict] = None
        if reuse:  # the zero perturbations of step 1 ride on the clean forward, as leaves
            shared = {key: delta.requires_grad_() for deltas in branches for key, delta in deltas.items()}
            clean_out = engine(with_deltas(batch, shared.get("txt"), shared.get("img"), slots), task, with_logits=True)
        elif with_kl:
            clean_out = engine(batch, task, with_logits=True)
        clean_logits = None if clean_out is None else clean_out["logits"]
        clean = None if clean_logits is None else clean_logits.detach().float().requires_grad_()
        clean_grad = None if clean is None else torch.zeros_like(clean)
        total = torch.zeros((), device=batch["txt_lens"].device)
        task_sum, kl_sum = torch.zeros_like(total), torch.zeros_like(total)
        first = 0
        if reuse:  # step 1 is the clean forward: L_1 = task(z) / K, its KL 0
            clean_task = clean_out["loss"].detach().float()
            loss = clean_task * len(branches) / count
            total, task_sum = total + loss, task_sum + clean_task * len(branches)
            self._record(loss, branches)
            if cfg.adv_steps > 1:
                branches = self._shared_ascent(engine, clean_out, branches, count)
            first = 1
        for astep in range(first, cfg.adv_steps):
            loss = torch.zeros_like(total)
            for deltas in branches:
                for delta in deltas.values():
                    delta.requires_grad_()
                perturbed = with_deltas(batch, deltas.get("txt"), deltas.get("img"), slots)
                out = engine(perturbed, task, with_logits=clean is not None)
                kl = torch.zeros_like(total) if clean is None else symmetric_kl(clean, out["logits"])
                loss = loss + out["loss"].float() + kl_weight * kl
                task_sum, kl_sum = task_sum + out["loss"].detach().float(), kl_sum + kl.detach()
            loss = loss / count
            scale = LossScale(loss)
            last = clean is None and not reuse and astep + 1 == cfg.adv_steps
            backward(engine, loss, last=last)
            total = total + loss.detach()
            if clean is not None:
                clean_grad += clean.grad / scale.value
                clean.grad = None
            self._record(loss, branches)
            if astep + 1 < cfg.adv_steps:
                branches = [self._ascended(deltas, scale.value) for deltas in branches]
        # through the clean graph once: the KL's gradient at the clean logits summed over the K steps, and with
        # reuse_clean_forward step 1's task loss (its parameter gradients)
        final = None if clean is None else (clean_logits.float() * clean_grad).sum()
        if reuse:
            step_1 = clean_out["loss"].float() * (len(branches) / count)
            final = step_1 if final is None else final + step_1
        if final is not None:
            backward(engine, final, last=True)
        return {"loss": total, "adv_task_loss": task_sum / count, "adv_kl": kl_sum / count}

    def _shared_ascent(
        self, engine: Any, clean_out: dict, branches: list[dict[str, torch.Tensor]], count: int
    ) -> list[dict[str, torch.Tensor]]:
        """Step 1's ascent with ``reuse_clean_forward``: the gradient of each zero perturbation (a leaf of the clean
        forward ``clean_out``) of its branch's ``task(z) / count``, from an input-only backward through the clean
        graph (no parameter gradient; the graph is kept for the final backward); the ascended perturbations."""
        scale = input_scale(engine)
        leaves = [delta for deltas in branches for delta in deltas.values()]
        with engine_hooks_suspended(clean_out), kept_gradients():  # the fused losses' gradients serve the final pass
            torch.autograd.backward(clean_out["loss"].float() * (scale / count), inputs=leaves, retain_graph=True)
        return [self._ascended(deltas, scale) for deltas in branches]

    def _record(self, loss: torch.Tensor, branches: list[dict[str, torch.Tensor]]) -> None:
        """Append a step's loss and perturbations to ``trace`` when it is on (tests)."""
        if self.trace is not None:
            self.trace.append(
                {"loss": loss.detach(), "deltas": [{k: d.detach() for k, d in b.items()} for b in branches]}
            )

    def _initial(self, batch: dict, text: bool, image: bool) -> dict[str, torch.Tensor]:
        cfg, out = self.cfg, {}
        size, txt_width, img_width = delta_grid(batch)
        txt_lens, num_bbs = batch["txt_lens"], batch["num_bbs"]
        if text:
            valid = torch.arange(txt_width, device=txt_lens.device)[None] < txt_lens[:, None]
            shape = torch.Size((size, txt_width, self.hidden_size))
            out["txt"] = initial_delta(shape, valid, cfg.adv_init_mag, cfg.norm_type)
        if image:
            valid = torch.arange(img_width, device=num_bbs.device)[None] < num_bbs[:, None]
            feat = batch["img_feat"] if "img_feat" in batch else batch["packed"]["img_feat"]
            shape = torch.Size((size, img_width, feat.size(-1)))
            out["img"] = initial_delta(shape, valid, cfg.adv_init_mag, cfg.norm_type)
        return out

    def _ascended(self, deltas: dict[str, torch.Tensor], scale: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg, out = self.cfg, {}
        for key, delta in deltas.items():
            lr = cfg.adv_lr_txt if key == "txt" else cfg.adv_lr_img
            grad = delta.grad.float() / scale
            grad = torch.where(torch.isfinite(grad), grad, torch.zeros_like(grad))  # an fp16 overflow (step skipped)
            out[key] = ascend(delta.detach(), grad, lr, cfg.norm_type, cfg.adv_max_norm)
        return out
