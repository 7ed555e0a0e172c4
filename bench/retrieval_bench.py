"""Exact vs fast retrieval evaluation in the same run, on the bundled itm test set.

Exact scores every text x image pair with the cross-encoder (as the original ``utils/itm_eval.py``); fast ranks
with the first stage (single-modality passes + projections) and re-ranks the top k images of each text and the top
k texts of each image. Reported per mode: wall time, cross-encoder passes, every recall figure, the first stage's
recall at k; plus the projected cost of COCO 5k (25,000 texts x 5,000 images) on this device from the measured
per-pair throughput of a ``--cost-config`` (default base) cross-encoder on COCO-shaped pairs (14-token captions,
36 regions) with random weights.

    python bench/retrieval_bench.py                      # < 3 min on 2 CPU cores: quick tiny model, 50 test images
    python bench/retrieval_bench.py --full               # all 150 test images (750 captions), k in 4 8 16 32
    python bench/retrieval_bench.py --checkpoint output/finetune-itm-tower-tiny/finetuned --full --splits val test
                                                         # a 300-image gallery (val + test: neither is trained on)
    python bench/retrieval_bench.py --checkpoint output/finetune-itm-tiny/finetuned --full
    python bench/retrieval_bench.py --device cuda --full # GPU: bf16 autocast, the COCO projection on this GPU

Without ``--checkpoint`` a tiny model is first trained from scratch for ``--train-steps`` on the bundled train
captions (the itm loss + first stage), so that the first stage means something; its recall figures describe that
quick model, not UNITER.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
from harness import (
    add_output_arguments,
    batch_bytes,
    device_name,
    output_dir,
    plot_grouped_bars,
    print_table,
    synchronize,
    time_fn,
    write_json,
)
from tqdm import tqdm

from uniter_fast.config import IMG_DIM, UniterConfig
from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.data.gallery import ImageGallery
from uniter_fast.data.loader import move_to_device
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import collate_rows, row
from uniter_fast.tasks.itm import ItmEvalDataset, ItmRankDataset
from uniter_fast.tasks.itm_eval import evaluate_retrieval, score_pairs, scoring_autocast, token_batches

COCO_TEXTS, COCO_IMAGES, COCO_TXT_LEN, COCO_BOXES = 25_000, 5_000, 14, 36
RECALLS = ("img_r1", "img_r5", "img_r10", "txt_r1", "txt_r5", "txt_r10", "r_mean")


def subset_db(splits: list[str], images: int, out: str) -> str:
    """A txt_db with the captions of the first ``images`` images of each bundled ``itm/txt_<split>`` of ``splits``
    (all: the splits, whose images are disjoint)."""
    sources = [TxtTokLmdb(resolve_bundled(f"bundled:itm/txt_{split}"), -1) for split in splits]
    with TxtDbWriter(out, sources[0].meta) as writer:
        for source in sources:
            for image in list(source.img2txts)[:images]:
                for id_ in source.img2txts[image]:
                    writer.add(id_, source[id_]["input_ids"], image)
    return out


def quick_model(steps: int, device: torch.device, seed: int) -> torch.nn.Module:
    """A tiny retrieval model trained from scratch on the bundled train captions (AdamW 2e-3, 16 texts x 7 pairs)."""
    task = get_task("itm")
    options = task.check_options({"negative_size": 3, "first_stage_dim": 64}, "bench")
    torch.manual_seed(seed)
    model = task.build_model(UniterConfig.tiny(vocab_size=1100), options, fast=True).to(device)
    data = ItmRankDataset(
        TxtTokLmdb(resolve_bundled("bundled:itm/txt_train"), 60),
        DetectFeatLmdb(resolve_bundled("bundled:pool/img_det")),
        options["negative_size"],
        seed,
    )
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    for _ in tqdm(range(steps), desc="quick itm training"):
        batch = data.collate([data[int(i)] for i in rng.choice(len(data), 16, replace=False)])
        loss = model(move_to_device(batch, device))["loss"]
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
    return model.eval()


class RandomPairs:
    """``texts`` random captions x ``images`` random images of COCO's shape (14 tokens, 36 regions), in the form
    ``itm_eval.score_pairs`` reads: ``txt_lens`` / ``num_bbs`` int64, ``pairs_batch`` (the task collate, both
    layouts), ``pair_text`` and ``gallery_images`` (float32 features [36, 2048] and boxes [36, 7])."""

    def __init__(self, texts: int, images: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.texts = [torch.randint(5, 1000, (COCO_TXT_LEN,), generator=gen) for _ in range(texts)]
        self.images = [
            (torch.rand(COCO_BOXES, IMG_DIM, generator=gen), torch.rand(COCO_BOXES, 7, generator=gen))
            for _ in range(images)
        ]
        self.txt_lens = np.full(texts, COCO_TXT_LEN, dtype=np.int64)
        self.num_bbs = np.full(images, COCO_BOXES, dtype=np.int64)

    def pairs_batch(self, txt_index: np.ndarray, img_index: np.ndarray) -> dict[str, Any]:
        """The task collate's batch (both layouts) of the pairs (text ``txt_index[p]``, image ``img_index[p]``)."""
        pairs = zip(txt_index.tolist(), img_index.tolist())
        return collate_rows([row(self.texts[t], *self.images[i]) for t, i in pairs], "itm")

    def pair_text(self, txt_index: int) -> torch.Tensor:
        """Text ``txt_index``'s ids int64 [14]."""
        return self.texts[txt_index]

    def gallery_images(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every image's (features, boxes)."""
        return self.images

    def every_pair(self) -> tuple[np.ndarray, np.ndarray]:
        """(text, image) indices int64 [texts x images] of every pair, row-major (as exact evaluation)."""
        texts, images = self.txt_lens.size, self.num_bbs.size
        return np.repeat(np.arange(texts), images), np.tile(np.arange(images), texts)


def random_cross_encoder(config: str, device: torch.device) -> torch.nn.Module:
    """A random-weight ``config`` ITM model (fast path, no first stage) on ``device``, in eval mode."""
    task = get_task("itm")
    model = task.build_model(UniterConfig.preset(config), task.check_options({"first_stage_dim": 0}, "bench"), True)
    return model.to(device).eval()


def pair_throughput(config: str, device: torch.device, pairs: int) -> float:
    """Cross-encoder pairs / s of a random-weight ``config`` model on COCO-shaped pairs (bf16 autocast on GPU)."""
    model = random_cross_encoder(config, device)
    batch = move_to_device(RandomPairs(1, pairs).pairs_batch(np.zeros(pairs, dtype=np.int64), np.arange(pairs)), device)

    def step() -> None:
        with torch.no_grad(), scoring_autocast(device):
            model(batch, compute_loss=False)

    return pairs / time_fn(step, device, warmup=1, repeats=3 if device.type == "cpu" else 10)


def scoring_speed(
    device: torch.device, config: str, texts: int, images: int, batch_tokens: int = 8192, repeats: int = 2
) -> list[dict[str, Any]]:
    """Exact scoring of ``texts`` x ``images`` COCO-shaped random pairs by a random-weight ``config`` cross-encoder,
    three ways (median of ``repeats`` after a warm-up; on CUDA device time from the first kernel to the last, host
    gaps included): ``model only``, the forwards of batches built and moved beforehand (the ceiling); ``task
    collate``, each batch collated on the host (both layouts) and moved, as ``score_pairs`` built them before the
    gallery; ``gallery``, ``itm_eval.score_pairs`` itself (the device-resident gallery, its copy to the device
    included). Rows: ``way``, ``pairs``, ``seconds``, ``pairs_per_s``, ``vs_model_only``."""
    model = random_cross_encoder(config, device)
    pairs = RandomPairs(texts, images)
    txt_index, img_index = pairs.every_pair()
    chunks = list(token_batches(pairs.txt_lens[txt_index] + pairs.num_bbs[img_index], batch_tokens))
    move = lambda b: move_to_device(b, device)  # noqa: E731
    prebuilt = [move(pairs.pairs_batch(txt_index[c], img_index[c])) for c in chunks]

    def forwards(batches: Any) -> None:
        with torch.no_grad(), scoring_autocast(device):
            for batch in batches:
                model(batch, compute_loss=False)

    ways = {
        "model only": lambda: forwards(prebuilt),
        "task collate": lambda: forwards(move(pairs.pairs_batch(txt_index[c], img_index[c])) for c in chunks),
        "gallery": lambda: score_pairs(model, pairs, txt_index, img_index, batch_tokens, move, "gallery"),
    }
    rows = []
    for way, run in ways.items():
        seconds = time_fn(run, device, warmup=1, repeats=repeats)
        rows.append({"way": way, "config": config, "pairs": len(txt_index), "seconds": seconds})
        rows[-1]["pairs_per_s"] = len(txt_index) / seconds
    for r in rows:
        r["vs_model_only"] = r["pairs_per_s"] / rows[0]["pairs_per_s"]
    return rows


def batch_building(dataset: ItmEvalDataset, device: torch.device, batch_size: int, texts: int = 8) -> dict[str, float]:
    """Host microseconds per pair to build and move to ``device`` the exact evaluation's batches of the first
    ``texts`` texts x every image (median of 3 after a warm-up): ``collate``, the task collate of both layouts (what
    ``score_pairs`` built before the gallery), ``gallery``, the packed batches gathered from the device-resident
    ``ImageGallery`` (what it builds on the packed path), and ``gallery_host``, the same with the gallery on the
    ``meta`` device (no data: the host's work alone, as on a GPU, where the gather runs on the device)."""
    images = len(dataset.all_img_ids)
    txt_index, img_index = np.repeat(np.arange(texts), images), np.tile(np.arange(images), texts)
    chunks = list(token_batches(dataset.txt_lens[txt_index] + dataset.num_bbs[img_index], batch_size))
    galleries = {
        name: ImageGallery(dataset.gallery_images(), where)
        for name, where in (("gallery", device), ("gallery_host", torch.device("meta")))
    }

    def from_gallery(name: str) -> Callable[[np.ndarray], dict[str, Any]]:
        return lambda c: galleries[name].pairs_batch(
            [dataset.pair_text(t) for t in txt_index[c].tolist()], img_index[c]
        )

    builders = {"collate": lambda c: dataset.pairs_batch(txt_index[c], img_index[c])}
    builders.update({name: from_gallery(name) for name in galleries})
    out = {}
    for name, build in builders.items():
        target = torch.device("meta") if name == "gallery_host" else device
        times = []
        for _ in range(4):
            begin = time.perf_counter()
            for chunk in chunks:
                move_to_device(build(chunk), target)
            synchronize(device)
            times.append(time.perf_counter() - begin)
        out[name] = statistics.median(times[1:]) / len(txt_index) * 1e6
    return out


def distill_batches(device: torch.device, groups: tuple[int, ...] = (16, 32, 64)) -> list[dict[str, Any]]:
    """Building one distillation batch of G bundled training groups (``train_first_stage_only``: each text with its
    image; the teacher grid of every text x image, G² pairs), host time moved to ``device`` with the grid's
    regions in place (median of 4 after a warm-up): ``task collate``, the batch and the grid's G² pairs collated on
    the host (both layouts), as the loader built it before; ``index grid``, the loader's batch, whose grid is index
    arithmetic, then ``teacher_batch`` gathering the regions on the device; ``index grid, host part``, the same on
    the ``meta`` device (no data: the host's work alone, as on a GPU, where the gather runs on the device). Rows:
    ``way``, ``groups``, ``ms``, ``grid_mb`` (the grid's bytes handed to the device), ``vs_task_collate``."""
    txt_db = TxtTokLmdb(resolve_bundled("bundled:itm/txt_train"), 60)
    img_db = DetectFeatLmdb(resolve_bundled("bundled:pool/img_det"))
    plain, crossed = (ItmRankDataset(txt_db, img_db, 0, 0, cross) for cross in (False, True))
    model = random_cross_encoder("tiny", device)

    def task_collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        positives = [it["rows"][0] for it in items]
        grid = [row(t["input_ids"], i["img_feat"], i["img_pos_feat"]) for t in positives for i in positives]
        move_to_device(plain.collate(items), device)
        return move_to_device(collate_rows(grid, "itm"), device)

    def index_grid(items: list[dict[str, Any]], where: torch.device = device) -> dict[str, Any]:
        return model.teacher_batch(move_to_device(crossed.collate(items), where))

    ways = {
        "task collate": task_collate,
        "index grid": index_grid,
        "index grid, host part": lambda items: index_grid(items, torch.device("meta")),
    }
    rows = []
    for size in groups:
        items = [crossed[i] for i in range(size)]
        index_bytes = batch_bytes(crossed.collate(items)["cross_pairs"])  # what the index grid hands the device
        for way, build in ways.items():
            times = []
            for _ in range(5):
                begin = time.perf_counter()
                grid = build(items)
                synchronize(device)
                times.append(time.perf_counter() - begin)
            rows.append({"way": way, "groups": size, "ms": statistics.median(times[1:]) * 1e3})
            rows[-1]["grid_mb"] = (batch_bytes(grid) if way == "task collate" else index_bytes) / 2**20
        for r in rows[-len(ways) :]:
            r["vs_task_collate"] = rows[-len(ways)]["ms"] / r["ms"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", default=None, help="itm export dir / original .pt (default: quick model)")
    parser.add_argument("--train-steps", type=int, default=100, help="steps of the quick model (no --checkpoint)")
    parser.add_argument("--images", type=int, default=50, help="images of each split (x5 captions); --full: 150")
    parser.add_argument("--splits", nargs="+", default=["test"], choices=["val", "test"], help="the gallery's splits")
    parser.add_argument("--top-k", type=int, nargs="+", default=None, help="k values (default 4 16; --full 4 8 16 32)")
    parser.add_argument("--batch-size", type=int, default=8192, help="tokens per cross-encoder batch")
    parser.add_argument("--cost-config", default="base", choices=["tiny", "base", "large"])
    parser.add_argument("--cost-pairs", type=int, default=None, help="pairs per throughput batch (16 CPU, 256 GPU)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true")
    add_output_arguments(parser)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    images = 150 if args.full else args.images
    top_ks = args.top_k or ([4, 8, 16, 32] if args.full else [4, 16])

    if args.checkpoint:
        model, _ = load_task_model(get_task("itm"), args.checkpoint, {}, fast=True)
        model.to(device).eval()
    else:
        model = quick_model(args.train_steps, device, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        txt = subset_db(args.splits, images, os.path.join(tmp, "txt"))
        dataset = ItmEvalDataset(TxtTokLmdb(txt, -1), DetectFeatLmdb(resolve_bundled("bundled:pool/img_det")))
        move = lambda b: move_to_device(b, device)  # noqa: E731
        rows = []
        start = time.perf_counter()
        exact = evaluate_retrieval(model, dataset, args.batch_size, "exact", to_device=move).metrics
        rows.append({"mode": "exact", "k": None, "seconds": time.perf_counter() - start, **exact})
        for k in top_ks:
            start = time.perf_counter()
            fast = evaluate_retrieval(model, dataset, args.batch_size, "fast", k, to_device=move).metrics
            fast["first_stage_img_rk"] = fast.pop(f"first_stage_img_r{k}")
            fast["first_stage_txt_rk"] = fast.pop(f"first_stage_txt_r{k}")
            rows.append({"mode": "fast", "k": k, "seconds": time.perf_counter() - start, **fast})
        building = batch_building(dataset, device, args.batch_size)
        distill = distill_batches(device)
        gallery = len(dataset.all_img_ids)
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
        r["max_recall_gap_points"] = 100 * max(abs(r[key] - rows[0][key]) for key in RECALLS)
    cost_pairs = args.cost_pairs or (256 if device.type == "cuda" else 16)
    per_pair = pair_throughput(args.cost_config, device, cost_pairs)
    seconds_per_pair = 1 / per_pair + building["gallery"] / 1e6
    coco = {"exact": COCO_TEXTS * COCO_IMAGES * seconds_per_pair}
    for k in top_ks:  # upper bound: the union is at most texts x k + images x k pairs
        coco[f"fast_k{k}"] = (COCO_TEXTS + COCO_IMAGES) * k * seconds_per_pair
    coco["exact_task_collate"] = COCO_TEXTS * COCO_IMAGES * (1 / per_pair + building["collate"] / 1e6)
    print_table(
        rows,
        ["mode", "k", "seconds", "speedup", "cross_pairs", *RECALLS, "max_recall_gap_points"]
        + ["first_stage_img_rk", "first_stage_txt_rk"],
    )
    recall_of_exact = {k: v for k, v in rows[0].items() if "_top10_" in k}
    if recall_of_exact:  # exact evaluation of a model with a trained first stage
        ks = {k: int(v) for k, v in rows[0].items() if re.fullmatch(r"first_stage_(img|txt)_k\d+pct", k)}
        print(f"\nfirst stage's recall of the exact top 10 at k = {ks}:")
        print_table([recall_of_exact], list(recall_of_exact))
    print(
        f"\nbatch building (host, per pair, {gallery} images): task collate {building['collate']:.1f} us, "
        f"device-resident gallery {building['gallery']:.1f} us ({building['collate'] / building['gallery']:.1f}x), "
        f"its host part {building['gallery_host']:.1f} us (gallery on the meta device)"
    )
    print("\ndistillation batches (one batch of G training groups and its G x G teacher grid, moved to the device):")
    print_table(distill, ["way", "groups", "ms", "grid_mb", "vs_task_collate"])
    print(f"{args.cost_config} cross-encoder on {device_name(device)}: {per_pair:.1f} pairs/s (COCO-shaped pairs)")
    for mode, seconds in coco.items():
        print(f"  projected COCO 5k test ({mode}): {seconds / 3600:.2f} h (cross-encoder + batch building)")
    meta = {
        "splits": args.splits,
        "images": gallery,
        "texts": len(dataset.ids),
        "model": args.checkpoint or f"quick tiny model, {args.train_steps} steps from scratch",
        "batch_tokens": args.batch_size,
        "cost_config": args.cost_config,
        "cost_pairs_per_batch": cost_pairs,
        "cost_pairs_per_second": per_pair,
        "batch_building_us_per_pair": building,
        "distill_batches": distill,
        "coco5k_projected_hours": {m: s / 3600 for m, s in coco.items()},
        "threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "note": "COCO projections add the measured batch building per pair (bundled pairs: 17 regions on average, "
        "COCO's 36 cost more) to the cross-encoder's time; fast ones count texts x k + images x k pairs (the union "
        "is smaller) and omit the first stage's single-modality passes (30k, each cheaper than a pair); "
        "exact_task_collate: exact with the task collate's batches (before the device-resident gallery)",
    }
    out = output_dir(args)
    name = "retrieval_bench" + "".join(f"_{split}" for split in args.splits if args.splits != ["test"])
    print(write_json(name, device, rows, meta, out))
    groups = [f"{r['mode']}" + (f" k={r['k']}" if r["k"] else "") for r in rows]
    series = {
        "wall time (s)": [r["seconds"] for r in rows],
        "cross-encoder pairs / 1000": [r["cross_pairs"] / 1000 for r in rows],
    }
    title = f"retrieval evaluation, {len(dataset.ids)} texts x {gallery} images"
    print(plot_grouped_bars(name, device, groups, series, "seconds | kilo-pairs", title, True, out))


if __name__ == "__main__":
    main()
