"""Gallery search (``python -m uniter_fast.search``) on a CPU: index throughput and query latency for a 1,000-image
gallery, with the tiny model and UNITER-base (random weights: the cost, not the ranking).

Index throughput = 1 / (detector time per image + embedding-stage time per image):

* detector: the BUTD ResNet-101 (``random_state_dict``, the MILVLG layout) at Caffe's test settings (600-pixel
  shorter side, 300 RoIs), fp32, one photo a call, on ``--detector-images`` bundled photos after one warm-up call;
  the median per image. It does not depend on the retrieval model.
* embedding stage: regions -> first-stage embedding (``embed_images``) and the shard writes of the index
  (``GalleryIndex.add_shard``, shards of 64), on all ``--gallery`` images after a warm-up shard. The regions are
  drawn from the bundled pool's img_db (random images of ``bundled:pool/img_det``, their stored fp16 features and
  boxes), so their box counts are the bundled ones (10 to 29, 17 on average).

Query latency (``search``, the index read from disk, medians of ``--repeats`` after one warm-up query): the first
stage over the gallery (tokenising, the text pass, dot products, sort), the cross-encoder over the default shortlist
(5% of the gallery: 50 images) and over every image (``--exact``, median of ``--exact-repeats``).

    python bench/search_bench.py                      # a few minutes on 2 CPU cores
    python bench/search_bench.py --models tiny        # the tiny model only (a minute)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np
import torch
from harness import add_output_arguments, device_name, output_dir, plot_grouped_bars, print_table, write_json

from uniter_fast.config import UniterConfig
from uniter_fast.data import DetectFeatLmdb
from uniter_fast.data.img_db import image_tensors
from uniter_fast.data.tokenizer import WordPiece, build_vocab
from uniter_fast.extract import Extractor, random_state_dict
from uniter_fast.extract.config import DetectorConfig
from uniter_fast.inference.gallery import GalleryIndex
from uniter_fast.inference.gallery_search import embed_images, search, shortlist_size
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled

QUERIES = ["a man riding a horse on a beach", "two dogs playing with a red ball", "a plate of food on a table"]
SHARD = 64


def retrieval_model(name: str, vocab_size: int, seed: int) -> torch.nn.Module:
    """A random-weight itm model (``tiny`` or ``base``) with a 64-d first stage, in eval mode."""
    task = get_task("itm")
    torch.manual_seed(seed)
    config = UniterConfig.tiny(vocab_size=vocab_size) if name == "tiny" else UniterConfig.base()
    model = task.build_model(config, task.check_options({"first_stage_dim": 64}, "bench"), True)
    return model.eval()


def gallery_regions(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``count`` images' stored regions drawn (with replacement) from the bundled pool img_db."""
    db = DetectFeatLmdb(resolve_bundled("bundled:pool/img_det"))
    names = list(db.name2nbb)
    picks = np.random.default_rng(seed).choice(len(names), count, replace=True)
    return [{k: np.array(v) for k, v in db.views(names[int(i)], ("features", "norm_bb")).items()} for i in picks]


def build_index(path: str, model: torch.nn.Module, regions: list[dict[str, np.ndarray]]) -> float:
    """Fill a new index at ``path`` with ``regions`` (shards of 64) after a warm-up shard; seconds of the fill."""
    embed_images(model, [image_tensors(r) for r in regions[:SHARD]])  # warm-up
    made_with = {"first_stage_dim": model.first_stage_dim, "note": "search_bench"}
    index = GalleryIndex.create_or_resume(path, os.path.dirname(path), made_with)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(regions), SHARD):
            shard = regions[first : first + SHARD]
            embeddings = embed_images(model, [image_tensors(r) for r in shard])
            index.add_shard([f"image{first + i:05d}.jpg" for i in range(len(shard))], shard, embeddings.numpy())
    return time.perf_counter() - start


def query_times(
    model: torch.nn.Module, toker: WordPiece, index: GalleryIndex, repeats: int, exact_repeats: int
) -> dict[str, float]:
    """Median seconds of the query steps: first stage, the shortlist's and the exact cross-encoder pass."""
    search(model, toker, index, QUERIES[0], top_k=5)  # warm-up
    steps: dict[str, list[float]] = {"first_stage": [], "read": [], "shortlist": [], "exact": []}
    for r in range(repeats):
        result = search(model, toker, index, QUERIES[r % len(QUERIES)], top_k=5)
        steps["first_stage"].append(result.seconds["first_stage"])
        steps["read"].append(result.seconds["read"])
        steps["shortlist"].append(result.seconds["cross_encoder"])
    for r in range(exact_repeats):
        result = search(model, toker, index, QUERIES[r % len(QUERIES)], top_k=5, exact=True)
        steps["exact"].append(result.seconds["first_stage"] + result.seconds["read"] + result.seconds["cross_encoder"])
    return {k: statistics.median(v) for k, v in steps.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gallery", type=int, default=1000, help="gallery images")
    parser.add_argument("--models", nargs="+", default=["tiny", "base"], choices=["tiny", "base"])
    parser.add_argument("--detector-images", type=int, default=1, help="photos timed through the R101 detector")
    parser.add_argument("--repeats", type=int, default=5, help="timed queries (first stage + shortlist)")
    parser.add_argument("--exact-repeats", type=int, default=1, help="timed exact queries (every image)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    add_output_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    detector = measure_detector(args.detector_images)
    print(f"detector (R101, Caffe settings, fp32): {detector:.2f} s / image")
    regions = gallery_regions(args.gallery, args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "vocab.txt")
        size = build_vocab(QUERIES, vocab)
        toker = WordPiece(vocab)
        for name in args.models:
            model = retrieval_model(name, size, args.seed)
            path = os.path.join(tmp, f"index-{name}")
            embed = build_index(path, model, regions) / len(regions)
            times = query_times(model, toker, GalleryIndex.open(path), args.repeats, args.exact_repeats)
            rows.append(
                {
                    "model": name,
                    "detector_s_per_image": detector,
                    "embed_s_per_image": embed,
                    "index_images_per_s": 1 / (detector + embed),
                    "embed_only_images_per_s": 1 / embed,
                    "first_stage_ms": 1e3 * times["first_stage"],
                    "read_ms": 1e3 * times["read"],
                    "shortlist": shortlist_size(len(regions), 5, None),
                    "shortlist_cross_ms": 1e3 * times["shortlist"],
                    "query_ms": 1e3 * (times["first_stage"] + times["read"] + times["shortlist"]),
                    "exact_query_ms": 1e3 * times["exact"],
                }
            )
    columns = list(rows[0])
    print_table(rows, columns)
    meta: dict[str, Any] = {
        "gallery": args.gallery,
        "boxes_per_image_mean": float(np.mean([len(r["features"]) for r in regions])),
        "detector": "random R101 (MILVLG layout), DetectorConfig() Caffe settings, fp32, one image a call",
        "detector_images": args.detector_images,
        "repeats": args.repeats,
        "exact_repeats": args.exact_repeats,
        "models": "random weights: UniterConfig.tiny / UniterConfig.base, first_stage_dim 64",
        "threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    out = output_dir(args)
    print(write_json("search_bench", device, rows, meta, out))
    series = {
        "first stage (ms)": [r["first_stage_ms"] for r in rows],
        "query, shortlist 5% (ms)": [r["query_ms"] for r in rows],
        "exact query (ms)": [r["exact_query_ms"] for r in rows],
        "embedding stage per image (ms)": [1e3 * r["embed_s_per_image"] for r in rows],
    }
    title = f"gallery search, {args.gallery} images; detector {detector:.1f} s / image ({device_name(device)})"
    print(plot_grouped_bars("search_bench", device, [r["model"] for r in rows], series, "ms", title, True, out))


def measure_detector(count: int) -> float:
    """Median seconds per image of the random-weight R101 detector at Caffe's settings (fp32, one image a call), on
    ``count`` bundled photos after one warm-up call."""
    from extract_bench import sample_images

    extractor = Extractor(random_state_dict("milvlg", DetectorConfig()), config=DetectorConfig())
    images = sample_images(count + 1)
    extractor.extract([images[0]])
    times = []
    for image in images[1:]:
        start = time.perf_counter()
        extractor.extract([image])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
