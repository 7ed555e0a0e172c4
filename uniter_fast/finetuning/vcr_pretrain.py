"""Run VCR's second-stage pretraining (``finetune.py --task vcr_pretrain``) on the pretraining loop.

The task mixer draws ``mlm_vcr`` / ``mrfr_vcr`` / ``mrckl_vcr`` by ``mix_ratio`` (one task per optimizer step, as
pretraining), validation is pretraining's (MLM / MRC accuracy, MRFR loss) and the export goes to
``output_dir/pretrained`` (``UniterForPretraining`` keys with the VCR tables), which ``--task vcr`` fine-tunes from.
"""

from __future__ import annotations

import os
from collections import defaultdict
from typing import Any, Optional

from uniter_fast.data import MetaLoader, TaskLoader
from uniter_fast.finetuning.config import FinetuneConfig
from uniter_fast.pretraining.data import SIZE_MULTIPLE
from uniter_fast.pretraining.engine import build_engine
from uniter_fast.pretraining.trainer import Trainer, open_output_dir
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import ConcatTaskDatasets, DbCache, eval_batches


def run_vcr_pretraining(
    cfg: FinetuneConfig,
    ds_config: dict[str, Any],
    rank: int,
    world: int,
    num_workers: int,
    resume: bool = False,
    stop_after: Optional[int] = None,
    config_overrides: Optional[dict[str, Any]] = None,
) -> tuple[dict[str, dict[str, float]], str]:
    """Second-stage pretraining as ``cfg`` says; returns (final validation metrics by task, the summary text)."""
    task = get_task("vcr_pretrain")
    dbs = DbCache(cfg)
    txt_paths = list(cfg.train_txt_dbs) + [txt for txt, _ in cfg.eval_sets().values()]
    options = {**cfg.options, **task.data_options(dbs, txt_paths, cfg.options)}
    model, options = load_task_model(task, cfg.checkpoint, options, cfg.model_config, cfg.fast, config_overrides)
    parts: dict[str, list[Any]] = defaultdict(list)
    for txt_path, img_path in zip(cfg.train_txt_dbs, cfg.train_img_dbs):
        for kind, dataset in task.datasets(dbs, txt_path, img_path, options, True, cfg.seed).items():
            parts[kind].append(dataset)
    loaders, ratios = {}, {}
    for kind, ratio in zip(options["tasks"], options["mix_ratio"]):
        dataset = parts[kind][0] if len(parts[kind]) == 1 else ConcatTaskDatasets(parts[kind])
        if cfg.train_batch_size < SIZE_MULTIPLE * int(dataset.lens.max()):
            raise ValueError(
                f"train_batch_size={cfg.train_batch_size} tokens cannot hold {SIZE_MULTIPLE} examples of "
                f"up to {int(dataset.lens.max())} tokens; use >= {SIZE_MULTIPLE * int(dataset.lens.max())}"
            )
        name = f"{kind}_vcr"
        loaders[name] = TaskLoader(dataset, cfg.train_batch_size, cfg.seed, rank, world, num_workers, droplast=True)
        ratios[name] = ratio
    stream = MetaLoader(loaders, ratios, ds_config["gradient_accumulation_steps"], seed=cfg.seed)
    val_txt, val_img = cfg.eval_sets()["val"]
    val_sets = {f"{k}_vcr": d for k, d in task.datasets(dbs, val_txt, val_img, options, False, cfg.seed).items()}

    writer = open_output_dir(cfg.output_dir, rank)
    engine = build_engine(model, cfg, ds_config)
    trainer = Trainer(
        engine,
        cfg,
        stream,
        lambda: {name: eval_batches(d, cfg.val_batch_size, rank, world) for name, d in val_sets.items()},
        cfg.output_dir,
        writer,
    )
    if resume:
        trainer.resume()
    results = trainer.train(stop_after)
    lines = [
        f"\nfinal VCR second-stage pretraining metrics after {trainer.step} steps ({world} rank(s), ZeRO-"
        f"{engine.zero_optimization_stage()}):",
        trainer.summary(results),
    ]
    if trainer.step == cfg.num_train_steps:
        lines.append(f"pretrained weights for --task vcr: {os.path.join(cfg.output_dir, 'pretrained')}")
    if writer is not None:
        writer.close()
    return results, "\n".join(lines)
