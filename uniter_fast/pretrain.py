"""UNITER pretraining with DeepSpeed: ``deepspeed uniter_fast/pretrain.py --ds_config ds.json [--config cfg.json]``.

Also runs as ``python uniter_fast/pretrain.py ...`` (one process) and under ``torchrun``. Without ``--config`` it
trains the tiny model of ``configs/pretrain-tiny.json`` on the bundled corpus (a few minutes on a CPU).
"""

import os
import sys

# Run as a script, this file's directory (uniter_fast/) is sys.path[0]; its ot/ and data/ would shadow top-level
# packages such as POT's ``ot``. Drop it before anything else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
# MKL picks CPU kernels by memory alignment, so the same math can round differently after a resume; strict CNR mode
# keeps results bit-identical (``--resume`` continues exactly). Read when MKL loads, so before torch is imported.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import argparse  # noqa: E402
import logging  # noqa: E402
from typing import Optional  # noqa: E402

REPO_ROOT = os.path.dirname(_HERE)
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "pretrain-tiny.json")
logger = logging.getLogger("uniter_fast.pretrain")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Command-line options (the DeepSpeed launcher adds ``--local_rank``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", default=os.path.join(REPO_ROOT, "ds.json"), help="DeepSpeed config JSON")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="training config JSON (default: tiny, bundled data)")
    parser.add_argument("--output_dir", default=None, help="override output_dir of the training config")
    parser.add_argument("--num_train_steps", type=int, default=None, help="override num_train_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--stop_after", type=int, default=None, help="stop (with a checkpoint) after this step")
    parser.add_argument("--reference", action="store_true", help="reference path (padded encoder, reference losses)")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="data loader processes per task (default: 0 on CPU, 2 on GPU)"
    )
    parser.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict:
    """Train as configured; returns the final validation metrics ({task: {metric: value}})."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from uniter_fast.checkpoint import load_checkpoint
    from uniter_fast.config import UniterConfig
    from uniter_fast.pretraining.config import load_training_config
    from uniter_fast.pretraining.engine import build_engine, init_ranks, load_ds_config, setup_environment
    from uniter_fast.pretraining.model import UniterForPretraining
    from uniter_fast.pretraining.trainer import Trainer, open_output_dir

    cfg = load_training_config(args.config)
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    if args.num_train_steps is not None:
        cfg.num_train_steps = args.num_train_steps
    if args.reference:
        cfg.fast = False
    setup_environment()
    ds_config = load_ds_config(args.ds_config, cfg)
    rank, world, num_workers = init_ranks(cfg.seed, args.num_workers)

    from uniter_fast.pretraining.data import DataBuilder

    data = DataBuilder(cfg, rank, world, num_workers)
    stream = data.train_stream(ds_config["gradient_accumulation_steps"])
    val_sets = data.val_datasets()

    model_config = (
        UniterConfig.from_json_file(cfg.model) if os.path.isfile(cfg.model) else UniterConfig.preset(cfg.model)
    )
    model_config = UniterConfig.from_dict({**model_config.to_dict(), **cfg.model_overrides})
    vocab = data.vocab_size()
    if vocab > model_config.vocab_size:
        raise ValueError(f"model vocab_size {model_config.vocab_size} is smaller than the text dbs' vocabulary {vocab}")
    model = UniterForPretraining(model_config, fast=cfg.fast, itm_ot_lambda=cfg.itm_ot_lambda, ot_settings=vars(cfg.ot))
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint, strict=False)

    writer = open_output_dir(cfg.output_dir, rank)
    engine = build_engine(model, cfg, ds_config)
    trainer = Trainer(
        engine,
        cfg,
        stream,
        lambda: {name: data.val_batches(dset) for name, dset in val_sets.items()},
        cfg.output_dir,
        writer,
    )
    if args.resume:
        trainer.resume()
    results = trainer.train(args.stop_after)
    if rank == 0:
        writer.close()
        print(f"\nfinal metrics after {trainer.step} steps ({world} rank(s), ZeRO-{engine.zero_optimization_stage()}):")
        print(trainer.summary(results))
        if trainer.step == cfg.num_train_steps:
            from uniter_fast.pretraining.plots import write_pictures

            curves, alignment = write_pictures(cfg, model_config, cfg.output_dir)
            print(f"consolidated fp32 weights: {os.path.join(cfg.output_dir, 'pretrained')}")
            print(f"training and validation curves: {curves}")
            print(f"word-region alignment of validation pairs: {alignment}")
    return results


if __name__ == "__main__":
    main()
