"""Extracting a folder (or list file) of images into a folder of npz files, resumably, on one or many ranks.

Images are decoded in DataLoader workers; the detector runs a batch of images at a time; npz files are compressed
and written by a small thread pool (zlib releases the GIL). Files that exist are skipped (writes are atomic), so an
interrupted run continues where it stopped. An unreadable image is reported with its path (warning, summary and
``failed[.rankN].txt``) and the run goes on; a rank that ends with no npz for any of its images (every one failed)
raises a :class:`~uniter_fast.errors.DataError` saying why, as does a source without images. Under
``torchrun``/``deepspeed`` (``RANK``/``WORLD_SIZE`` set) each rank takes every WORLD_SIZE-th image of the sorted list
and, on CUDA, the GPU ``LOCAL_RANK``.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Union

import numpy as np
import torch
from tqdm import tqdm

from uniter_fast.errors import ConfigError, DataError
from uniter_fast.extract.config import DetectorConfig
from uniter_fast.extract.extractor import Extractor
from uniter_fast.extract.given_boxes import boxes_for_images
from uniter_fast.extract.images import IMAGE_EXTENSIONS, ImageFiles, collate_images, list_images, output_names
from uniter_fast.extract.weights import WeightsSource
from uniter_fast.extract.writer import npz_path, remove_stale_temps, write_npz

WRITER_THREADS = 4
MAX_PENDING_WRITES = 64  # records (~0.7 MB each) queued for the writer threads before the loop waits


@dataclasses.dataclass
class RunSummary:
    """What one rank did: images in its shard, already done before (skipped), written, failed (path, reason)."""

    rank: int
    images: int
    skipped: int
    written: int
    failed: list
    seconds: float

    def as_dict(self) -> dict:
        """JSON-ready summary (failed as {path: reason})."""
        out = dataclasses.asdict(self)
        out["failed"] = dict(self.failed)
        out["images_per_s"] = self.written / self.seconds if self.seconds > 0 else None
        return out


def rank_and_world() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) from the launcher's environment; (0, 1, 0) for a plain run."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def default_device(local_rank: Optional[int] = None) -> str:
    """``cuda:<local_rank>`` (default: the LOCAL_RANK variable) when CUDA is available, else ``cpu``."""
    local_rank = rank_and_world()[2] if local_rank is None else local_rank
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def _failed_file(out: str, rank: int, world: int) -> str:
    return os.path.join(out, "failed.txt" if world == 1 else f"failed.rank{rank}.txt")


def extract_folder(
    images: str,
    weights: WeightsSource,
    out: str,
    device: Union[str, torch.device, None] = None,
    dtype: Union[torch.dtype, str] = torch.float32,
    config: Optional[DetectorConfig] = None,
    batch_size: Optional[int] = None,
    num_workers: int = 2,
    fast: bool = True,
    ops: str = "auto",
    chunk: Optional[int] = None,
    attributes: bool = False,
    prefix: str = "",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    boxes: Optional[str] = None,
) -> RunSummary:
    """Write ``out/<prefix><name>.npz`` for every image of ``images`` (folder or list file); see the module doc.

    ``boxes``: a ``boxes.json`` file (:mod:`~uniter_fast.extract.given_boxes`): features of the given boxes of the
    images it names instead of detections. ``batch_size`` None: 1 on the CPU (the progress bar moves per image; the
    RoI head batches RoIs anyway), 4 on a GPU.
    """
    start = time.perf_counter()
    device = torch.device(device or default_device())
    batch_size = batch_size if batch_size is not None else (1 if device.type == "cpu" else 4)
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(
            f"batch size (--batch-size) must be >= 1 and workers (--workers) >= 0, got {batch_size} and {num_workers}"
        )
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"out: {out!r} is a file; give a folder for the npz files (--out)")
    rank, world, _ = rank_and_world()
    paths = list_images(images)
    if not paths:
        kinds = ", ".join(IMAGE_EXTENSIONS)
        raise DataError(f"images: {images!r} names no image (extensions {kinds}); nothing written")
    names = [prefix + n for n in output_names(paths, images)]
    given: dict[int, np.ndarray] = {}
    if boxes is not None:
        given = dict(zip(*boxes_for_images(boxes, paths, images)))
    shard = sorted(given) if boxes is not None else range(len(paths))
    mine = list(shard[rank::world])
    todo = [i for i in mine if overwrite or not os.path.exists(npz_path(out, names[i]))]
    # the detector first: bad weights leave no --out folder behind
    extractor = Extractor(weights, device, dtype, config, fast, ops, chunk, allow_pickle) if todo else None
    os.makedirs(out, exist_ok=True)
    remove_stale_temps(out, rank)
    failed: list = []
    written = 0
    if extractor is not None:
        written = _run(
            extractor,
            [paths[i] for i in todo],
            [names[i] for i in todo],
            [given[i] for i in todo] if boxes is not None else None,
            out,
            rank,
            batch_size,
            num_workers,
            attributes,
            failed,
            progress,
        )
    if failed:
        with open(_failed_file(out, rank, world), "w", encoding="utf-8") as f:
            f.writelines(f"{path}\t{reason}\n" for path, reason in failed)
    if mine and written == 0 and len(todo) == len(mine):
        (path, reason), where = failed[0], _failed_file(out, rank, world)
        raise DataError(
            f"images: none of the {len(mine)} images of {images!r} could be extracted (the first, {path!r}: "
            f"{reason}; all {len(failed)} listed in {where!r}); nothing written"
        )
    return RunSummary(rank, len(mine), len(mine) - len(todo), written, failed, time.perf_counter() - start)


def _run(
    extractor: Extractor,
    paths: list,
    names: list,
    boxes: Optional[list],
    out: str,
    rank: int,
    batch_size: int,
    num_workers: int,
    attributes: bool,
    failed: list,
    progress: bool,
) -> int:
    """The loop: decode (workers) -> detect (device) -> write (threads); returns the number of files written.

    ``boxes``: per image its given boxes [n, 4] float64 (given-box mode), or None (detections)."""
    loader = torch.utils.data.DataLoader(
        ImageFiles(paths), batch_size=batch_size, num_workers=num_workers, collate_fn=collate_images
    )
    pending: deque[Future] = deque()
    written = 0
    with ThreadPoolExecutor(WRITER_THREADS) as pool, tqdm(total=len(paths), unit="img", disable=not progress) as bar:
        for batch in loader:
            good = []
            for index, image, error in batch:
                if error is None:
                    good.append((index, image))
                else:
                    _fail(failed, paths[index], error)
            for index, record in _extract_batch(extractor, paths, boxes, good, attributes, failed):
                if record["features"].shape[0] == 0:
                    _fail(failed, paths[index], "no region proposal survived the size filter (image too small?)")
                    continue
                pending.append(pool.submit(write_npz, out, names[index], record, rank))
            while len(pending) > MAX_PENDING_WRITES:  # back-pressure: records wait in memory until written
                pending.popleft().result()
                written += 1
            bar.update(len(batch))
        for future in pending:
            future.result()
            written += 1
    return written


def _extract_batch(
    extractor: Extractor, paths: list, boxes: Optional[list], good: list, attributes: bool, failed: list
) -> list:
    """Records for a batch; if the batch fails, image by image, so that the failing file is named."""
    if not good:
        return []

    def extract(batch: list) -> list:
        images = [image for _, image in batch]
        if boxes is None:
            return extractor.extract(images, attributes)
        return extractor.extract_boxes(images, [boxes[i] for i, _ in batch], attributes)

    try:
        return list(zip([i for i, _ in good], extract(good)))
    except Exception as exc:  # retried per image below to find and name the culprit
        if len(good) == 1:
            _fail(failed, paths[good[0][0]], f"{type(exc).__name__}: {exc}")
            return []
    results = []
    for index, image in good:
        try:
            results.append((index, extract([(index, image)])[0]))
        except Exception as exc:  # the run goes on without this image
            _fail(failed, paths[index], f"{type(exc).__name__}: {exc}")
    return results


def _fail(failed: list, path: str, reason: str) -> None:
    failed.append((path, reason))
    warnings.warn(f"image {path!r} skipped: {reason}", stacklevel=3)
