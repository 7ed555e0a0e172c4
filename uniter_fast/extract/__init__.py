"""BUTD region features for UNITER: the Caffe bottom-up-attention Faster R-CNN in plain PyTorch.

``python -m uniter_fast.extract --images DIR --weights FILE --out DIR`` writes one npz per image in the format of
UNITER's own extractor (``tools/generate_npz.py``), which ``python -m uniter_fast.build --features DIR`` reads.
Needs the ``extract`` extra (Pillow; torchvision is optional). See docs/extract.md.

Module map: config (settings), preprocess (image blob), layers/backbone (Caffe ResNet), boxes (anchors, +1 box
arithmetic), rpn (proposals), roi_pool, roi_heads (res5, class and attribute heads), nms (batched greedy NMS and
the max-confidence loop), select (box selection, npz fields), detector (the module), layouts/weights (checkpoints),
random_weights (test weights), images (decoding), extractor (API), writer/run/cli (folders of images),
check (device timings and agreement).
"""

from uniter_fast.extract.config import DetectorConfig
from uniter_fast.extract.detector import Detector, RawDetections
from uniter_fast.extract.extractor import Extractor
from uniter_fast.extract.images import list_images, load_bgr
from uniter_fast.extract.random_weights import random_state_dict, write_random_weights
from uniter_fast.extract.select import Detections
from uniter_fast.extract.weights import load_detector

__all__ = [
    "Detections",
    "Detector",
    "DetectorConfig",
    "Extractor",
    "RawDetections",
    "list_images",
    "load_bgr",
    "load_detector",
    "random_state_dict",
    "write_random_weights",
]
