"""A pretraining process on fixed batches of the bundled corpus, for the rank and accumulation tests.

``python tests/pretrain_worker.py ranks OUT`` (or under ``deepspeed --num_gpus 2``) trains the tiny model with the
real ``Trainer`` and DeepSpeed engine (ZeRO-2, fp32, no dropout) for one round of every task on *global* batches: with
W ranks, rank r gets the r-th of W equal shards of each global batch; with one rank, the whole global batch. The
shards are chosen so that every shard has the same loss denominator (examples for ITM, masked tokens for MLM, masked
regions for MRFR / MRC-kl); then the mean of the ranks' mean losses, which the original's averaged gradients
optimise, is the global batch's mean loss, and W ranks must follow the same trajectory as one rank. Writes
``OUT/train_steps.jsonl`` and ``OUT/pretrained/`` (rank 0).

``python tests/pretrain_worker.py accum OUT`` (one rank) runs one optimizer step of each task with
``gradient_accumulation_steps`` = 3 through ``Trainer.train_step`` and saves, in ``OUT/grads.pt``, the gradients
the engine hands to its optimizer at the accumulation boundary and the original's: the sum of the three
micro-batches' gradients, by plain autograd on a copy of the model. Each step follows validation forwards of its
task (``compute_loss=False``, which call the heads' own modules). ``zero3`` does the same under ZeRO-3, then saves a
checkpoint and adds to ``grads.pt`` its consolidated weights (``exported``) and the engine's gathered ones
(``trained``).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import sys
from typing import Any, Iterator

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("itm", "mlm", "mrfr", "mrckl")
SHARD = 4  # examples per shard
SHARDS = 2  # shards per global batch: one per rank with 2 ranks, all of them with 1 rank
ACCUM = 3


def training_config(output_dir: str, steps: int) -> Any:
    """The tiny config on the bundled corpus, ``steps`` steps, no validation or checkpoint before the end."""
    from uniter_fast.pretraining.config import parse_training_config

    with open(os.path.join(REPO, "configs", "pretrain-tiny.json"), encoding="utf-8") as f:
        raw = json.load(f)
    raw.update(output_dir=output_dir, num_train_steps=steps, warmup_steps=2, valid_steps=10**6, save_steps=10**6)
    raw["model_overrides"] = {
        **raw.get("model_overrides", {}),
        "hidden_dropout_prob": 0.0,  # dropout masks are drawn per rank: no run on other ranks could match them
        "attention_probs_dropout_prob": 0.0,
    }
    return parse_training_config(raw, os.path.join(REPO, "configs"))


def ds_config(cfg: Any, grad_accum: int, stage: int = 2) -> dict:
    """``ds.json`` in fp32 (rounding to bf16 would hide what the comparison measures) with ZeRO ``stage``."""
    from uniter_fast.training.engine import complete_ds_config

    with open(os.path.join(REPO, "ds.json"), encoding="utf-8") as f:
        ds = json.load(f)
    ds["bf16"] = {"enabled": False}
    ds["gradient_accumulation_steps"] = grad_accum
    ds["zero_optimization"]["stage"] = stage
    return complete_ds_config(ds, cfg)


def datasets(cfg: Any) -> dict[str, Any]:
    """One dataset per task over the training dbs, the same on every rank (ITM negatives from the whole db)."""
    from uniter_fast.data import DetectFeatLmdb, ItmDataset, MlmDataset, MrcDataset, MrfrDataset, TxtTokLmdb

    spec = cfg.train_datasets[0]
    txt = TxtTokLmdb(spec.db[0], cfg.max_txt_len)
    img = DetectFeatLmdb(spec.img[0], cfg.conf_th, cfg.max_bb, cfg.min_bb, cfg.num_bb)
    return {
        "itm": ItmDataset(txt, img, cfg.itm_neg_prob, seed=cfg.seed),
        "mlm": MlmDataset(txt, img, seed=cfg.seed),
        "mrfr": MrfrDataset(txt, img, cfg.mrm_prob, seed=cfg.seed),
        "mrckl": MrcDataset(txt, img, cfg.mrm_prob, seed=cfg.seed),
    }


def _split(task: str, records: list[Any], draws: Any) -> list[Any]:
    """The batch-wide ``draws`` of ``records`` cut into one :class:`Draws` per record."""
    from uniter_fast.data.records import Draws

    if task == "itm":
        return [Draws() for _ in records]
    if task == "mlm":
        cuts = np.cumsum([r.wordpieces.size for r in records])[:-1]
        return [Draws(words=w, labels=lab) for w, lab in zip(np.split(draws.words, cuts), np.split(draws.labels, cuts))]
    cuts = np.cumsum([r.features.shape[0] for r in records])[:-1]
    return [Draws(regions=m) for m in np.split(draws.regions, cuts)]


def _join(task: str, parts: list[Any]) -> Any:
    """One :class:`Draws` for the records whose per-record draws are ``parts`` (in order)."""
    from uniter_fast.data.records import Draws

    if task == "itm":
        return Draws()
    if task == "mlm":
        return Draws(words=np.concatenate([d.words for d in parts]), labels=np.concatenate([d.labels for d in parts]))
    return Draws(regions=np.concatenate([d.regions for d in parts]))


def denominator(task: str, draws: Any) -> int:
    """What the task's mean loss divides by, for one example's draws."""
    if task == "mlm":
        return int((draws.labels != -1).sum())
    if task in ("mrfr", "mrckl"):
        return int(draws.regions.sum())
    return 1


def equal_shards(task: str, dataset: Any, start: int, shards: int) -> list[list[tuple[Any, Any]]]:
    """``shards`` groups of :data:`SHARD` (record, its draws) from ``start`` on, with equal loss denominators; the
    masks are drawn once for the whole pool, so a shard's examples are masked the same in any batch they join."""
    from uniter_fast.data.datasets import batch_generator
    from uniter_fast.data.records import draw

    records = [dataset[i] for i in range(start, start + 12 * shards * SHARD)]
    rng = batch_generator(dataset.seed, 0, 0, start)
    pool = list(zip(records, _split(task, records, draw(task, records, rng, dataset.token_ids, dataset.mask_prob))))
    first = list(range(SHARD))
    target = sum(denominator(task, pool[i][1]) for i in first)
    groups, used = [[pool[i] for i in first]], set(first)
    for _ in range(1, shards):
        free = [i for i in range(len(pool)) if i not in used]
        pick = next(
            c for c in itertools.combinations(free, SHARD) if sum(denominator(task, pool[i][1]) for i in c) == target
        )
        groups.append([pool[i] for i in pick])
        used.update(pick)
    return groups


class FixedStream:
    """(task, batch) per micro-step: step s trains TASKS[s % 4] on this rank's shard of that step's global batch
    (world 1: the whole global batch; world :data:`SHARDS`: shard ``rank``), in the layout of ``cfg.fast``."""

    def __init__(self, data: dict[str, Any], cfg: Any, steps: int, rank: int, world: int, micro: int = 1) -> None:
        from uniter_fast.data.collate import collate

        if world not in (1, SHARDS):
            raise ValueError(f"world must be 1 or {SHARDS}, got {world}")
        layout, feat_dtype = ("packed", torch.float16) if cfg.fast else ("padded", torch.float32)
        self.batches = []
        for step in range(steps):
            task = TASKS[step % len(TASKS)]
            for m in range(micro):
                shards = equal_shards(task, data[task], start=(step * micro + m) * 200, shards=SHARDS)
                pairs = shards[rank] if world == SHARDS else [pair for shard in shards for pair in shard]
                records = [record for record, _ in pairs]
                draws = _join(task, [d for _, d in pairs])
                batch = collate(task, records, draws, data[task].token_ids, layout, feat_dtype)
                self.batches.append((task, batch))
        self.position = 0

    def __iter__(self) -> Iterator[tuple[str, dict]]:
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def build(out_dir: str, steps: int, grad_accum: int, stage: int = 2) -> tuple[Any, Any, Any, Any]:
    """(training config, model before the engine, its untouched copy, engine) with the same init on every rank."""
    from uniter_fast.config import UniterConfig
    from uniter_fast.pretraining.model import UniterForPretraining
    from uniter_fast.training.distributed import setup_environment
    from uniter_fast.training.engine import build_engine
    from uniter_fast.training.rng import seed_everything

    setup_environment()
    import deepspeed

    deepspeed.init_distributed()
    cfg = training_config(out_dir, steps)
    seed_everything(cfg.seed)
    model_config = UniterConfig.from_dict({**UniterConfig.preset(cfg.model).to_dict(), **cfg.model_overrides})
    model = UniterForPretraining(model_config, fast=cfg.fast, itm_ot_lambda=cfg.itm_ot_lambda, ot_settings=vars(cfg.ot))
    reference = copy.deepcopy(model)
    engine = build_engine(model, cfg, ds_config(cfg, grad_accum, stage))
    return cfg, model, reference, engine


def run_ranks(out_dir: str) -> None:
    from uniter_fast.pretraining.run import pretrained_export
    from uniter_fast.training.loop import Trainer

    steps = 2 * len(TASKS)
    cfg, model, _, engine = build(out_dir, steps, grad_accum=1)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    stream = FixedStream(datasets(cfg), cfg, steps, rank, world)
    os.makedirs(out_dir, exist_ok=True)
    export = pretrained_export(model.config, out_dir)
    Trainer(engine, cfg, stream, validate=lambda engine, step: {}, export=export).train()


def _grad(param: torch.Tensor, grad: Any) -> torch.Tensor:
    """A detached copy of ``grad``, zeros for a parameter the loss does not reach."""
    return torch.zeros_like(param) if grad is None else grad.detach().clone()


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` with every parameter whole (gathered under ZeRO-3)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


def validation_forwards(engine: Any, task: str, batch: dict) -> None:
    """Two validation forwards (``compute_loss=False``, as validation runs its batches). Under ZeRO-3 the second
    one leaves DeepSpeed a trace of the modules they call, by which it prefetches them in the next forward."""
    engine.eval()
    with torch.no_grad():
        for _ in range(2):
            engine(batch, task, compute_loss=False)
    engine.train()


def run_accum(out_dir: str, stage: int = 2) -> None:
    from deepspeed.utils import safe_get_full_grad

    from uniter_fast.checkpoint import read_deepspeed
    from uniter_fast.training.loop import Trainer

    cfg, model, reference, engine = build(out_dir, len(TASKS), grad_accum=ACCUM, stage=stage)
    stream = iter(FixedStream(datasets(cfg), cfg, len(TASKS), rank=0, world=1, micro=ACCUM))
    trainer = Trainer(engine, cfg, stream, validate=lambda engine, step: {}, export=lambda *_: None)
    captured: dict[str, dict[str, torch.Tensor]] = {}
    real_step = engine.step

    def step_and_capture() -> None:
        if engine.is_gradient_accumulation_boundary():
            captured[current] = {n: _grad(p, safe_get_full_grad(p)) for n, p in model.named_parameters()}
        real_step()

    engine.step = step_and_capture
    expected = {}
    for task in TASKS:
        micro_batches = [next(stream) for _ in range(ACCUM)]
        validation_forwards(engine, task, micro_batches[0][1])
        reference.zero_grad(set_to_none=True)
        reference.load_state_dict(full_state(model))
        for _, batch in micro_batches:
            reference(batch, task)["loss"].backward()  # the original: plain backward, .grad accumulates (sums)
        expected[task] = {n: _grad(p, p.grad) for n, p in reference.named_parameters()}
        current = task
        trainer.train_step(micro_batches)
    os.makedirs(out_dir, exist_ok=True)
    saved: dict[str, Any] = {"engine": captured, "original": expected}
    if stage == 3:
        engine.save_checkpoint(os.path.join(out_dir, "ckpt"), tag="end")
        saved.update(exported=read_deepspeed(os.path.join(out_dir, "ckpt"), "end"), trained=full_state(model))
    torch.save(saved, os.path.join(out_dir, "grads.pt"))


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    mode, out = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    {"ranks": run_ranks, "accum": run_accum, "zero3": lambda d: run_accum(d, stage=3)}[mode](out)
