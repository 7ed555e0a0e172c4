"""The Python API: :class:`Extractor` turns BGR images into UNITER's npz records.

    from uniter_fast.extract import Extractor, load_bgr
    ex = Extractor("bua-caffe-frcn-r101-k10-100.pth", device="cuda", dtype=torch.bfloat16)
    records = ex.extract([load_bgr("a.jpg"), load_bgr("b.png")])   # dicts of fp16 arrays, UNITER's fields

``fast=True`` (default) folds the frozen BatchNorms into the convolutions, uses channels-last tensors on CUDA and
torchvision's RoI pooling and RPN NMS when they import; ``fast=False`` is the reference path (unfolded BN, plain
PyTorch ops, contiguous tensors). bf16 is a fast-path option for CUDA; box arithmetic, softmaxes and NMS stay fp32.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from uniter_fast.extract.config import DetectorConfig
from uniter_fast.extract.detector import RawDetections
from uniter_fast.extract.given_boxes import check_boxes, check_inside, project_boxes
from uniter_fast.extract.preprocess import image_blob, resize_scale
from uniter_fast.extract.roi_pool import torchvision_ops_available
from uniter_fast.extract.select import Detections, finalize, given_box_record, npz_record
from uniter_fast.extract.weights import WeightsSource, load_detector

OPS = ("auto", "torch", "torchvision")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHUNK_CPU, CHUNK_GPU = 64, 256  # default RoIs per res5 call: on a CPU a larger chunk is no faster, only bigger


def resolve_ops(ops: str, fast: bool) -> str:
    """ "torch" or "torchvision" for ``ops`` ("auto": torchvision on the fast path when its ops load)."""
    if ops not in OPS:
        raise ValueError(f"ops must be one of {OPS}, got {ops!r}")
    if ops == "torchvision" and not torchvision_ops_available():
        raise ValueError("ops='torchvision' but torchvision.ops does not load beside this torch; use 'torch'")
    if ops == "auto":
        return "torchvision" if fast and torchvision_ops_available() else "torch"
    return ops


class Extractor:
    """BUTD region features for UNITER from a checkpoint file (any supported layout) or a state dict.

    ``config``: test-time settings (Caffe's by default; depth and attribute head come from the weights);
    ``chunk``: RoIs per res5 call (memory vs speed; default 64 on a CPU, 256 on a GPU); ``allow_pickle``: accept
    pickled checkpoints (trusted files).
    """

    def __init__(
        self,
        weights: WeightsSource,
        device: Union[str, torch.device] = "cpu",
        dtype: Union[torch.dtype, str] = torch.float32,
        config: Optional[DetectorConfig] = None,
        fast: bool = True,
        ops: str = "auto",
        chunk: Optional[int] = None,
        allow_pickle: bool = False,
    ) -> None:
        self.device = torch.device(device)
        chunk = chunk if chunk is not None else (CHUNK_CPU if self.device.type == "cpu" else CHUNK_GPU)
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        if self.dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.fast, self.chunk = fast, chunk
        self.ops = resolve_ops(ops, fast)
        detector = load_detector(weights, config, allow_pickle=allow_pickle)
        if fast:
            detector.fold_batchnorm()
        self.memory_format = torch.channels_last if fast and self.device.type == "cuda" else torch.contiguous_format
        self.detector = detector.to(self.device, self.dtype).to(memory_format=self.memory_format).eval()
        self.config = detector.config

    def blobs(self, images: Sequence[np.ndarray]) -> tuple[list[torch.Tensor], list[float]]:
        """Preprocessed images [3, H', W'] on the device and their resize scales."""
        blobs, scales = [], []
        for image in images:
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                shape = getattr(image, "shape", None)
                raise ValueError(f"images must be [H, W, 3] uint8 BGR arrays, got {type(image).__name__} {shape}")
            scale = resize_scale(image.shape[0], image.shape[1], self.config.test_scale, self.config.max_size)
            tensor = torch.from_numpy(image).to(self.device, non_blocking=True)
            blobs.append(image_blob(tensor, scale, self.dtype))
            scales.append(scale)
        return blobs, scales

    def raw(self, images: Sequence[np.ndarray], attributes: bool = False) -> tuple[list[RawDetections], list[float]]:
        """The detector's outputs (resized-image RoIs) and the resize scales."""
        if attributes and not self.config.attributes:
            raise ValueError("attributes=True but the weights have no attribute head (violetteshev layout)")
        blobs, scales = self.blobs(images)
        raw = self.detector(blobs, scales, self.ops, self.chunk, attributes, self.memory_format)
        return raw, scales

    def detect(self, images: Sequence[np.ndarray], attributes: bool = False) -> list[Detections]:
        """All RoIs of each image with features, class probabilities and max-confidence (no box selection)."""
        raw, scales = self.raw(images, attributes)
        return finalize(raw, scales, [image.shape[:2] for image in images], self.config.nms_thresh)

    def extract(self, images: Sequence[np.ndarray], attributes: bool = False) -> list[dict[str, np.ndarray]]:
        """UNITER's npz fields per image (float16): features, norm_bb, conf, soft_labels (+ attr_prob if asked)."""
        return [npz_record(det, self.config, attributes) for det in self.detect(images, attributes)]

    def detect_boxes(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], attributes: bool = False
    ) -> list[Detections]:
        """Given-box mode: per image, its ``boxes`` [n_i, 4] (x1, y1, x2, y2 in original pixels, float64 or any
        numeric type; 0 <= x1 < x2 <= W, 0 <= y1 < y2 <= H) scaled to the resized image, RoI-pooled, through res5 and
        the class (and attribute) heads; no RPN, no NMS. ``conf`` [n_i] is each box's best object-class probability.
        """
        if attributes and not self.config.attributes:
            raise ValueError("attributes=True but the weights have no attribute head (violetteshev layout)")
        if len(boxes) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes)} box arrays")
        checked = [check_boxes(np.asarray(b, dtype=np.float64).tolist(), f"image {i}") for i, b in enumerate(boxes)]
        for i, (image, image_boxes) in enumerate(zip(images, checked)):
            check_inside(image_boxes, *np.shape(image)[:2], f"image {i}")
        blobs, scales = self.blobs(images)
        rois = [project_boxes(b, s, self.device) for b, s in zip(checked, scales)]
        raw = self.detector.forward_boxes(blobs, rois, self.ops, self.chunk, attributes, self.memory_format)
        return [
            Detections(torch.from_numpy(b).float().to(self.device), r.features, r.cls_prob,
                       r.cls_prob[:, 1:].max(dim=1).values, r.attr_prob, tuple(image.shape[:2]))
            for b, r, image in zip(checked, raw, images)
        ]  # fmt: skip

    def extract_boxes(
        self, images: Sequence[np.ndarray], boxes: Sequence[np.ndarray], attributes: bool = False
    ) -> list[dict[str, np.ndarray]]:
        """The npz fields of :meth:`extract` for the given ``boxes`` (see :meth:`detect_boxes`), every box kept in
        the given order, plus ``given_boxes`` = True (a 0-d bool array: ``build`` then keeps every row)."""
        return [given_box_record(det, attributes) for det in self.detect_boxes(images, boxes, attributes)]
