"""BUTD region-feature extractor: images/s and the FLOP floor, fast path vs reference path in the same run.

The detector is the full ResNet-101 with random weights in the MILVLG layout (the real loader reads them), at
Caffe's settings (600/1000 resize, 6000 -> 300 proposals, 14x14 RoIs through res5, 1,600-class max-confidence loop).

CPU (default; a few minutes on 2 cores): one bundled photo (grace_hopper.jpg, 600 x 512 resized to 703 x 600):
trunk + RPN timed on the whole image, RoI pooling of its 300 RoIs, res5 + class head on a chunk of ``--rois`` RoIs
scaled to 300, the max-confidence loop and box selection on 300 RoIs; images/s = 1 / the sum. Then the fast path end
to end (``Extractor.extract`` on the photo, after one warm-up run) in a fresh process, which also reports its peak
resident memory (weights, torch and the extraction). Both wall time and process CPU time are recorded (the machine
may be shared). The floor is the image's FLOPs over this machine's measured fp32 matmul rate. ``--full`` adds a
measured end-to-end run on the bundled photos.

GPU (``--device cuda``): :func:`gpu_check`, also callable from a GPU suite: end-to-end images/s at batch 1/8/32 in
fp32 and bf16 on the fast path and fp32 on the reference path, the floor at the measured matmul rate, CPU (fp32,
reference path) vs GPU agreement (without TF32) and bf16 drift from fp32 (feature cosine, RoI and selected-box overlap).

    python bench/extract_bench.py                   # CPU
    python bench/extract_bench.py --full            # CPU, plus end to end on the bundled photos (minutes)
    python bench/extract_bench.py --device cuda     # GPU
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import statistics
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from harness import (
    add_output_arguments,
    device_name,
    output_dir,
    plot_grouped_bars,
    print_table,
    proc_status,
    synchronize,
    time_fn,
    write_json,
)

from uniter_fast.extract import Detector, DetectorConfig, Extractor, RawDetections, load_bgr, random_state_dict
from uniter_fast.extract.agreement import agreement
from uniter_fast.extract.config import IMG_FEAT_DIM, NUM_CLASSES
from uniter_fast.extract.preprocess import resize_scale, resized_size
from uniter_fast.extract.select import finalize, npz_record

CONFIG = DetectorConfig()


def sample_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` BGR images: the photos bundled with matplotlib / scikit-image (cycled), else smooth random ones."""
    paths = []
    try:
        import matplotlib.cbook

        paths.append(str(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)))
    except ImportError:
        pass
    try:
        import skimage.data

        folder = os.path.dirname(skimage.data.__file__)
        for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png"):
            if os.path.isfile(os.path.join(folder, name)):
                paths.append(os.path.join(folder, name))
    except ImportError:
        pass
    if paths:
        photos = [load_bgr(p) for p in paths]
        return [photos[i % len(photos)] for i in range(count)]
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        h, w = (480, 640) if i % 2 == 0 else (640, 427)
        coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, h // 32, w // 32)))
        smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        images.append(smooth[0].permute(1, 2, 0).clamp(0, 255).numpy().astype(np.uint8))
    return images


def detector_flops(config: DetectorConfig, height: int, width: int, num_rois: int) -> dict[str, float]:
    """Forward FLOPs (2 per multiply-add, convs and linears) of the trunk + RPN head on a resized [height, width]
    image and of res5 + class head on ``num_rois`` RoIs, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        det = Detector(config)
        image = torch.empty(1, 3, height, width)
        pooled = torch.empty(num_rois, 1024, config.roi_pool_size, config.roi_pool_size)
    with FlopCounterMode(display=False) as trunk:
        det.proposal_generator.rpn_head(det.backbone(image))
    with FlopCounterMode(display=False) as head:
        det.roi_heads.box_predictor.cls_score(det.roi_heads.res5(pooled).mean(dim=(2, 3)))
    return {"trunk_rpn": float(trunk.get_total_flops()), "roi_head": float(head.get_total_flops())}


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls without TF32 inside (cuDNN's default is TF32 on Ampere and newer: its ~1e-3
    error reorders the near-tied RPN scores of random weights, so CPU-vs-GPU agreement is measured without it)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Measured FLOP/s of a [size, size] @ [size, size] matmul (the floor's yardstick)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32  # fp32 convs run as cuDNN allows
    try:
        return 2.0 * size**3 / time_fn(lambda: a @ b, device, warmup=2, repeats=5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``fn`` after warm-up (harness.time_fn for the wall)."""
    cpu: list[float] = []

    def run() -> None:
        start = time.process_time()
        fn()
        synchronize(device)
        cpu.append(time.process_time() - start)

    wall = time_fn(run, device, warmup, repeats)
    return wall, statistics.median(cpu[warmup:])


def stage_fns(extractor: Extractor, image: np.ndarray, rois: int) -> dict[str, Callable[[], Any]]:
    """Callables for each stage of one image: RoI pooling of all its proposals, res5 + heads on the first ``rois``."""
    det = extractor.detector
    blobs, scales = extractor.blobs([image])
    size = tuple(blobs[0].shape[1:])
    x = blobs[0][None].contiguous(memory_format=extractor.memory_format)
    fmap = det.backbone(x)
    proposals = det.proposal_generator(fmap, size, scales, extractor.ops)
    pooled = det.roi_heads.pool([fmap[0]], proposals, extractor.ops)[:rois]
    count = proposals[0].shape[0]
    logits = torch.randn(count, NUM_CLASSES, generator=torch.Generator().manual_seed(0)).to(x.device)
    raw_all = RawDetections(proposals[0], x.new_zeros(count, IMG_FEAT_DIM).float(), torch.softmax(4 * logits, 1))

    def trunk_rpn() -> None:
        with torch.no_grad():
            det.proposal_generator(det.backbone(x), size, scales, extractor.ops)

    def roi_pool() -> None:
        det.roi_heads.pool([fmap[0]], proposals, extractor.ops)

    def roi_head() -> None:
        with torch.no_grad():
            feat = det.roi_heads.res5(pooled.contiguous(memory_format=extractor.memory_format)).mean(dim=(2, 3))
            det.roi_heads.box_predictor(feat)

    def post() -> None:
        for d in finalize([raw_all], scales, [image.shape[:2]], extractor.config.nms_thresh):
            npz_record(d, extractor.config)

    stages = {"preprocess": lambda: extractor.blobs([image]), "trunk_rpn": trunk_rpn, "roi_pool": roi_pool}
    return {**stages, "roi_head": roi_head, "post": post}


def cpu_rows(args: argparse.Namespace, weights: dict, image: np.ndarray) -> list[dict[str, Any]]:
    """Stage times of the reference and fast paths on one image; res5 + heads scaled to 300 RoIs."""
    device = torch.device("cpu")
    rows = []
    for path, fast in (("reference", False), ("fast", True)):
        extractor = Extractor(weights, device, torch.float32, CONFIG, fast=fast, chunk=args.rois)
        fns = stage_fns(extractor, image, args.rois)
        scale = {"roi_head": CONFIG.rpn_post_nms_top_n / args.rois}
        for stage, fn in fns.items():
            wall, cpu = timed(fn, device, args.warmup, args.repeats)
            factor = scale.get(stage, 1.0)
            rows.append(
                {
                    "path": path,
                    "ops": extractor.ops,
                    "stage": stage,
                    "ms": 1e3 * wall * factor,
                    "cpu_ms": 1e3 * cpu * factor,
                    "scaled_from_rois": args.rois if stage in scale else None,
                }
            )
    return rows


END_TO_END_TIMEOUT_S = 1800  # a spawned extraction that dies (out of memory, bad weights) puts nothing


def peak_rss_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` of /proc/self/status (reset by exec, unlike ``ru_maxrss``,
    which a spawned child inherits from the parent it was forked from), else ``ru_maxrss``."""
    try:
        return proc_status("VmHWM")
    except (OSError, RuntimeError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _end_to_end_child(weights_path: str, image: np.ndarray, results: Any) -> None:
    """In a fresh process: load the weights, extract ``image`` once (warm-up) and once timed; put (wall s, CPU s,
    peak RSS bytes) on ``results``."""
    extractor = Extractor(weights_path, "cpu", torch.float32, CONFIG)
    extractor.extract([image])
    start, cpu = time.perf_counter(), time.process_time()
    extractor.extract([image])
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    results.put((wall, cpu, peak_rss_bytes()))


def end_to_end(weights: dict, image: np.ndarray, directory: str) -> dict[str, Any]:
    """The fast path end to end on ``image`` in a fresh (spawned) process: its row, with the process's peak RSS."""
    import multiprocessing
    import tempfile

    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        path = os.path.join(tmp, "weights.pth")
        torch.save(weights, path)
        results = context.Queue()
        child = context.Process(target=_end_to_end_child, args=(path, image, results))
        child.start()
        try:
            wall, cpu, peak = results.get(timeout=END_TO_END_TIMEOUT_S)
        except queue.Empty:
            child.kill()
            raise RuntimeError(
                f"the end-to-end child process gave no result in {END_TO_END_TIMEOUT_S} s (exit code {child.exitcode})"
            ) from None
        child.join()
    return {"path": "fast_end_to_end", "stage": "total", "ms": 1e3 * wall, "cpu_ms": 1e3 * cpu,
            "images_per_s": 1 / wall, "images_per_cpu_s": 1 / cpu, "peak_rss_mb": peak / 2**20}  # fmt: skip


def throughput(extractor: Extractor, images: Sequence[np.ndarray], batch_size: int, warmup: int, repeats: int) -> float:
    """End-to-end images/s (decoded uint8 images in, npz records in memory out) over ``images`` in batches."""

    def run() -> None:
        for start in range(0, len(images), batch_size):
            extractor.extract(images[start : start + batch_size])

    return len(images) / time_fn(run, extractor.device, warmup, repeats)


def gpu_check(
    device: str = "cuda",
    batch_sizes: Sequence[int] = (1, 8, 32),
    dtypes: Sequence[str] = ("fp32", "bf16"),
    num_images: int = 32,
    warmup: int = 1,
    repeats: int = 2,
    chunk: int = 1024,
    seed: int = 0,
    weights: Optional[dict] = None,
    config: DetectorConfig = CONFIG,
    matmul_size: int = 8192,
) -> dict[str, Any]:
    """Throughput, floor and agreement of the extractor on ``device`` with random R-101 weights (see module doc).

    Returns {"device", "rows": [{path, dtype, batch, images_per_s, floor_images_per_s, ...}], "agreement", "meta"}.
    ``weights``/``config`` replace the random ResNet-101 and Caffe's settings (e.g. for a quick smoke run).
    """
    dev = torch.device(device)
    weights = weights if weights is not None else random_state_dict("milvlg", config, seed)
    images = sample_images(num_images, seed)
    height, width = images[0].shape[:2]
    scale = resize_scale(height, width, config.test_scale, config.max_size)
    flops = detector_flops(Extractor(weights, "cpu", config=config).config, *resized_size(height, width, scale),
                           config.rpn_post_nms_top_n)  # fmt: skip
    per_image = flops["trunk_rpn"] + flops["roi_head"]
    cpu_ref = Extractor(weights, "cpu", torch.float32, config, fast=False).detect(images[:1])
    rows, checks, fp32_dets = [], {}, None
    for dtype in dtypes:
        extractor = Extractor(weights, dev, dtype, config, fast=True, chunk=chunk)
        with strict_fp32() if dtype == "fp32" else contextlib.nullcontext():
            dets = extractor.detect(images[:4])
        if dtype == "fp32":
            fp32_dets = dets
            checks["cpu_vs_device_fp32"] = agreement(cpu_ref, dets[:1], config)
        elif fp32_dets is not None:
            checks[f"{dtype}_vs_fp32"] = agreement(fp32_dets, dets, config)
        rate = matmul_rate(dev, extractor.dtype, matmul_size)
        for batch in batch_sizes:
            ips = throughput(extractor, images, batch, warmup, repeats)
            rows.append(
                {
                    "path": "fast",
                    "ops": extractor.ops,
                    "dtype": dtype,
                    "batch": batch,
                    "images_per_s": ips,
                    "floor_images_per_s": rate / per_image,
                    "matmul_tflops": rate / 1e12,
                }
            )
        del extractor
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    reference = Extractor(weights, dev, torch.float32, config, fast=False, chunk=chunk)
    batch = max(b for b in batch_sizes if b <= 8) if any(b <= 8 for b in batch_sizes) else batch_sizes[0]
    rows.append(
        {
            "path": "reference",
            "ops": reference.ops,
            "dtype": "fp32",
            "batch": batch,
            "images_per_s": throughput(reference, images, batch, warmup, repeats),
        }
    )
    meta = {
        "flops_per_image": flops,
        "image": [height, width],
        "num_images": num_images,
        "warmup": warmup,
        "repeats": repeats,
        "chunk": chunk,
        "seed": seed,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    return {"device": device_name(dev), "rows": rows, "agreement": checks, "meta": meta}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rois", type=int, default=8, help="CPU: RoIs timed through the RoI head (scaled to 300)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--full", action="store_true", help="CPU: also measure end to end on the bundled photos")
    add_output_arguments(ap)
    args = ap.parse_args()
    out = output_dir(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        result = gpu_check(args.device, seed=args.seed)
        print_table(result["rows"], ["path", "ops", "dtype", "batch", "images_per_s", "floor_images_per_s"])
        print(result["agreement"])
        meta = {**result["meta"], "agreement": result["agreement"]}
        write_json("extract_bench", device, result["rows"], meta, out)
        fast = [r for r in result["rows"] if r["path"] == "fast"]
        groups = [f"{r['dtype']} batch {r['batch']}" for r in fast]
        plot_grouped_bars(
            "extract_bench",
            device,
            groups,
            {"images/s": [r["images_per_s"] for r in fast], "floor": [r["floor_images_per_s"] for r in fast]},
            "images / s",
            "BUTD extractor",
            directory=out,
        )
        return
    weights = random_state_dict("milvlg", CONFIG, args.seed)
    image = sample_images(1, args.seed)[0]
    measured_end_to_end = end_to_end(weights, image, out)  # first: a fresh process, while this one is small
    height, width = image.shape[:2]
    scale = 600 / min(height, width)
    size = (round(height * scale), round(width * scale))
    flops = detector_flops(CONFIG, *size, CONFIG.rpn_post_nms_top_n)
    rate = matmul_rate(device, torch.float32, 2048)
    rows = cpu_rows(args, weights, image)
    totals = []
    for path in ("reference", "fast"):
        ms = sum(r["ms"] for r in rows if r["path"] == path)
        cpu_ms = sum(r["cpu_ms"] for r in rows if r["path"] == path)
        totals.append(
            {
                "path": path,
                "stage": "total",
                "ms": ms,
                "cpu_ms": cpu_ms,
                "images_per_s": 1e3 / ms,
                "images_per_cpu_s": 1e3 / cpu_ms,
            }
        )
    floor = (flops["trunk_rpn"] + flops["roi_head"]) / rate
    totals.append({"path": "floor", "stage": "total", "ms": 1e3 * floor, "images_per_s": 1 / floor})
    totals.append(measured_end_to_end)
    if args.full:
        photos = sample_images(6, args.seed)
        ips = throughput(Extractor(weights, device, torch.float32, CONFIG), photos, 2, 0, 1)
        totals.append({"path": "fast_6_photos_batch_2", "stage": "total", "ms": 1e3 / ips, "images_per_s": ips})
    rows += totals
    print_table(rows, ["path", "ops", "stage", "ms", "cpu_ms", "images_per_s", "images_per_cpu_s", "peak_rss_mb"])
    meta = {
        "image": [height, width],
        "resized": list(size),
        "flops_per_image": flops,
        "matmul_gflops": rate / 1e9,
        "rois_timed": args.rois,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print("wrote", write_json("extract_bench", device, rows, meta, out))
    stages = ["preprocess", "trunk_rpn", "roi_pool", "roi_head", "post", "total"]
    series = {p: [next((r["ms"] for r in rows if r["path"] == p and r["stage"] == s), 0.0) for s in stages]
              for p in ("reference", "fast")}  # fmt: skip
    series["floor"] = [0.0] * (len(stages) - 1) + [1e3 * floor]
    measured = next(r["ms"] for r in totals if r["path"] == "fast_end_to_end")
    series["fast end to end"] = [0.0] * (len(stages) - 1) + [measured]
    print(
        "wrote",
        plot_grouped_bars(
            "extract_bench",
            device,
            stages,
            series,
            "ms per image",
            "BUTD extractor, ResNet-101, 300 RoIs (res5 + heads scaled from a chunk)",
            directory=out,
        ),
    )


if __name__ == "__main__":
    main()
