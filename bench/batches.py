"""Inputs for the benchmarks and the correctness checks: random UNITER-shaped padded encoder batches and per-task
pretraining batches built by the real collates, the pretraining batches of the bundled corpus as a run draws them
(:func:`corpus_batches`), and the downstream task datasets of the bundled tiny configs.

Lengths follow the original's ``config/pretrain-*.json``: text 10-60 tokens including [CLS]/[SEP]
(max_txt_len 60) and 10-100 regions (conf_th 0.2 clamped to [min_bb, max_bb]), drawn uniformly; ``quick`` callers
pass smaller ranges. Features are fresh random draws (ReLU'd Gaussians like detector features), never zeros.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch
from harness import IMG_RANGE, TXT_RANGE

from uniter_fast.config import IMG_DIM, IMG_LABEL_DIM, IMG_POS_DIM
from uniter_fast.data import TokenBucketSampler, move_to_device
from uniter_fast.data.reference import itm_collate, mlm_collate, mrm_collate
from uniter_fast.layout import joint_layout
from uniter_fast.tasks import get_task
from uniter_fast.tasks.data import DbCache, TaskDataset

MASK_PROB = 0.15
MASK_ID = 103
PRETRAIN_TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")


def random_batch(
    size: int,
    vocab: int,
    generator: torch.Generator,
    device: torch.device,
    txt_range: tuple[int, int] = TXT_RANGE,
    img_range: tuple[int, int] = IMG_RANGE,
    img_dim: int = IMG_DIM,
) -> dict[str, Any]:
    """A padded UNITER batch (contract 1 keys, plus ``txt_lens``/``num_bbs`` [B] int64) with uniformly drawn
    lengths in ``txt_range`` / ``img_range`` (inclusive); float32 features, zero only at pads."""
    txt_lens = torch.randint(txt_range[0], txt_range[1] + 1, (size,), generator=generator)
    num_bbs = torch.randint(img_range[0], img_range[1] + 1, (size,), generator=generator)
    max_txt, max_img = int(txt_lens.max()), int(num_bbs.max())
    txt_valid = torch.arange(max_txt)[None] < txt_lens[:, None]
    img_valid = torch.arange(max_img)[None] < num_bbs[:, None]
    attn_masks, gather_index = joint_layout(txt_lens, num_bbs)
    batch = {
        "input_ids": torch.randint(1, vocab, (size, max_txt), generator=generator) * txt_valid,
        "position_ids": torch.arange(max_txt)[None],
        "img_feat": torch.randn(size, max_img, img_dim, generator=generator) * img_valid[..., None],
        "img_pos_feat": torch.rand(size, max_img, IMG_POS_DIM, generator=generator) * img_valid[..., None],
        "attn_masks": attn_masks,
        "gather_index": gather_index,
        "txt_lens": txt_lens,
        "num_bbs": num_bbs,
    }
    return {k: v.to(device) for k, v in batch.items()}


def random_items(
    task: str,
    size: int,
    vocab: int,
    rng: np.random.Generator,
    txt_range: tuple[int, int] = TXT_RANGE,
    img_range: tuple[int, int] = IMG_RANGE,
    lengths: Optional[list[tuple[int, int]]] = None,
) -> list[dict[str, Any]]:
    """``size`` dataset items of ``task`` (one of :data:`PRETRAIN_TASKS`) in the collate format of
    ``uniter_fast.data.collate``: 15% masking with at least one masked token/region, detector-like soft labels,
    alternating ITM targets. Lengths (text incl. [CLS]/[SEP], regions) are ``lengths`` when given (``size`` pairs,
    text >= 3), else drawn uniformly from the ranges."""
    if task not in PRETRAIN_TASKS:
        raise ValueError(f"task must be one of {PRETRAIN_TASKS}, got {task!r}")
    if lengths is not None and len(lengths) != size:
        raise ValueError(f"lengths must hold {size} (text, regions) pairs, got {len(lengths)}")
    items = []
    for i in range(size):
        if lengths is None:
            t = int(rng.integers(max(3, txt_range[0]), txt_range[1] + 1))
            n = int(rng.integers(img_range[0], img_range[1] + 1))
        else:
            t, n = lengths[i]
        item = {
            "input_ids": torch.from_numpy(rng.integers(5, vocab, t)),
            "img_feat": torch.from_numpy(rng.standard_normal((n, IMG_DIM), dtype=np.float32)).relu(),
            "img_pos_feat": torch.from_numpy(rng.random((n, IMG_POS_DIM), dtype=np.float32)),
        }
        if task == "mlm":
            chosen = rng.random(t) < MASK_PROB
            chosen[[0, -1]] = False
            chosen[int(rng.integers(1, t - 1))] = True
            item["txt_labels"] = torch.where(torch.from_numpy(chosen), item["input_ids"], -1)
            item["input_ids"] = item["input_ids"].masked_fill(torch.from_numpy(chosen), MASK_ID)
        elif task == "itm":
            item["target"] = i % 2
        else:
            mask = rng.random(n) < MASK_PROB
            mask[int(rng.integers(n))] = True
            item["img_mask"] = torch.from_numpy(mask)
            logits = torch.from_numpy(3 * rng.standard_normal((n, IMG_LABEL_DIM), dtype=np.float32))
            item["soft_labels"] = torch.softmax(logits, dim=-1)
        items.append(item)
    return items


def collate(task: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The reference collate of ``task`` (uniter_fast.data.reference): both layouts, the padded keys and
    ``packed``, so one batch feeds the reference and the fast path alike."""
    if task == "mlm":
        return mlm_collate(items)
    if task == "itm":
        return itm_collate(items)
    return mrm_collate(items, task)


def task_batch(
    task: str,
    size: int,
    vocab: int,
    seed: int,
    device: torch.device,
    txt_range: tuple[int, int] = TXT_RANGE,
    img_range: tuple[int, int] = IMG_RANGE,
) -> dict[str, Any]:
    """A collated ``task`` batch of ``size`` random items (seeded), moved to ``device``."""
    items = random_items(task, size, vocab, np.random.default_rng(seed), txt_range, img_range)
    return move_to_device(collate(task, items), device)


def task_datasets(name: str) -> tuple[Any, dict[str, TaskDataset]]:
    """(config, {split: dataset}) of task ``name``'s tiny config (``configs/finetune-<name>-tiny.json``, what
    ``finetune.py --task name`` reads: the bundled sets), through the task's own ``train_streams`` and
    ``eval_dataset``. Splits: "train" and the evaluation splits, suffixed where one split has several datasets (a
    stream per objective of the VCR second stage, "train mlm_vcr", ...; the parts of a concatenation, VCR's
    "train vcr 0" Q->A and "train vcr 1" QA->R)."""
    from uniter_fast.finetuning.config import default_config, load_finetune_config

    cfg = load_finetune_config(default_config(name))
    task, dbs = get_task(name), DbCache(cfg)
    options = {**cfg.options, **task.data_options(dbs, cfg.txt_dbs(), cfg.options)}
    streams = task.train_streams(dbs, cfg.train_pairs(), options, cfg.seed)
    made: dict[str, Any] = {f"train {stream}": dataset for stream, (dataset, _) in streams.items()}
    for split, (txt, img) in cfg.eval_sets().items():
        data = task.eval_dataset(dbs, txt, img, options, split, cfg.seed)
        made.update({f"{split} {key}": d for key, d in data.items()} if isinstance(data, dict) else {split: data})
    out = {}
    for key, dataset in made.items():
        parts = getattr(dataset, "parts", None)
        out.update({f"{key} {i}": part for i, part in enumerate(parts)} if parts else {key: dataset})
    return cfg, out


def length_corpus(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A corpus of ``size`` UNITER-shaped examples, as lengths: text [N] int64 (incl. [CLS]/[SEP], in
    :data:`TXT_RANGE`) and regions [N] int64 (in :data:`IMG_RANGE`), drawn uniformly (seeded)."""
    rng = np.random.default_rng([seed, size])
    return rng.integers(TXT_RANGE[0], TXT_RANGE[1] + 1, size), rng.integers(IMG_RANGE[0], IMG_RANGE[1] + 1, size)


def sampled_batches(
    task: str,
    count: int,
    batch_tokens: int,
    size_multiple: int,
    vocab: int,
    seed: int,
    device: torch.device,
    corpus_size: int = 8192,
) -> list[dict[str, Any]]:
    """The first ``count`` batches of epoch 0 that the token-bucket sampler (``uniter_fast.data.sampler``, the
    original's algorithm) draws from :func:`length_corpus` with the token budget ``batch_tokens`` and
    ``size_multiple``, each collated from random ``task`` items of the sampled lengths and moved to ``device``. The
    sampler's lengths are wordpieces + regions, as the original's (text minus [CLS]/[SEP])."""
    txt, img = length_corpus(corpus_size, seed)
    sampler = TokenBucketSampler(txt - 2 + img, batch_size=batch_tokens, size_multiple=size_multiple, seed=seed)
    rng = np.random.default_rng([seed, 1])
    out = []
    for indices in sampler.batches(0)[:count]:
        lengths = [(int(txt[i]), int(img[i])) for i in indices]
        out.append(move_to_device(collate(task, random_items(task, len(indices), vocab, rng, lengths=lengths)), device))
    return out


def corpus_batches(task: str, budget: int, count: int, epoch: int = 0, layout: str = "packed") -> list[dict[str, Any]]:
    """The first ``count`` training batches of ``epoch`` that a pretraining run of ``configs/pretrain-tiny.json``
    draws for ``task`` (a kind: ``mlm``, ``mrfr``, ``mrc``, ``mrckl``, ``itm``) at the token budget ``budget``: the
    bundled corpus, the real task dataset and collate, the token-bucket sampler with the run's seed and ``droplast``;
    CPU tensors in ``layout`` (``packed``: region features fp16, as the fast path; ``padded``: float32)."""
    from uniter_fast.data import TokenBucketSampler, batch_loader
    from uniter_fast.pretraining.config import load_training_config
    from uniter_fast.pretraining.data import DataBuilder

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_training_config(os.path.join(root, "configs", "pretrain-tiny.json"))
    data = DataBuilder(cfg, rank=0, world=1, num_workers=0)
    dataset = data.dataset(cfg.train_datasets[0], task, budget, "budget")
    dataset.set_epoch(epoch)
    sampler = TokenBucketSampler(dataset.lens, batch_size=budget, seed=cfg.seed, droplast=True)
    feat_dtype = torch.float16 if layout == "packed" else torch.float32
    chosen = sampler.batches(epoch)[:count]
    return list(batch_loader(dataset, chosen, rank=0, layout=layout, num_workers=0, feat_dtype=feat_dtype))
