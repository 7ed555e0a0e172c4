"""Settings of the BUTD detector and of UNITER's box selection, with the Caffe values as defaults.

Every default is the value of the Caffe test pipeline UNITER's docker runs (``lib/fast_rcnn/config.py`` with
``experiments/cfgs/faster_rcnn_end2end_resnet.yml``, ``test.prototxt`` as in peteanderson80/bottom-up-attention;
``tools/generate_npz.py`` of ChenRocks/BUTD-UNITER-NLVR2). ``blocks`` is read off the weights file by the loader
(ResNet-101 has (3, 4, 23, 3)).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Tuple

from uniter_fast.errors import ConfigError

# float32 BGR means subtracted from the 0-255 pixels (cfg.PIXEL_MEANS); no std scaling.
PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
IMG_FEAT_DIM = 2048
NUM_CLASSES = 1601  # Visual Genome 1600 objects + background in column 0
NUM_ATTRIBUTES = 401  # 400 attributes + "no attribute" in column 0
ANCHOR_SCALES = (4, 8, 16, 32)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
FEAT_STRIDE = 16
BOX_SELECTIONS = ("uniter", "anderson")


@dataclasses.dataclass
class DetectorConfig:
    """The detector's test-time settings (Caffe defaults) and the box selection of the npz writer.

    ``box_selection``: ``"uniter"`` keeps the top 100 RoIs by confidence (UNITER's ``generate_npz.py`` sets
    MIN_BOXES = MAX_BOXES = 100); ``"anderson"`` keeps those with confidence >= ``conf_thresh``, clamped to 10-100
    (``generate_tsv.py``). ``min_boxes``/``max_boxes`` override the pair the selection implies when set.
    """

    blocks: Tuple[int, int, int, int] = (3, 4, 23, 3)  # bottlenecks in res2, res3, res4 (trunk) and res5 (head)
    attributes: bool = True  # the attribute head (weights present in the MILVLG and airsplay files)
    test_scale: int = 600  # shorter side after resizing (cfg.TEST.SCALES)
    max_size: int = 1000  # cap on the longer side (cfg.TEST.MAX_SIZE)
    rpn_pre_nms_top_n: int = 6000
    rpn_post_nms_top_n: int = 300
    rpn_nms_thresh: float = 0.7
    rpn_min_size: int = 16  # in original-image pixels, times the scale
    roi_pool_size: int = 14
    nms_thresh: float = 0.3  # per-class NMS of the max-confidence loop (cfg.TEST.NMS)
    conf_thresh: float = 0.2
    box_selection: str = "uniter"
    min_boxes: int = -1  # -1: from box_selection
    max_boxes: int = -1

    def __post_init__(self) -> None:
        self.blocks = tuple(int(b) for b in self.blocks)
        if len(self.blocks) != 4 or min(self.blocks) < 1:
            raise ValueError(f"blocks must be 4 positive block counts (res2..res5), got {self.blocks}")
        if self.box_selection not in BOX_SELECTIONS:
            raise ValueError(f"box_selection must be one of {BOX_SELECTIONS}, got {self.box_selection!r}")
        for name in ("test_scale", "max_size", "rpn_pre_nms_top_n", "rpn_post_nms_top_n", "roi_pool_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rpn_nms_thresh", "nms_thresh", "conf_thresh"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        lo, hi = self.box_range
        if not 1 <= lo <= hi:
            raise ValueError(f"need 1 <= min_boxes <= max_boxes, got min_boxes={lo}, max_boxes={hi}")

    @property
    def box_range(self) -> Tuple[int, int]:
        """(MIN_BOXES, MAX_BOXES) of the selection: (100, 100) for UNITER, (10, 100) for Anderson."""
        lo, hi = (100, 100) if self.box_selection == "uniter" else (10, 100)
        return (lo if self.min_boxes < 0 else self.min_boxes, hi if self.max_boxes < 0 else self.max_boxes)


#: A small detector for smoke runs and tests: one bottleneck per stage (full widths, so features stay 2048-d and
#: every weight has its real shape), a 128-pixel shorter side and 16 RoIs; about a second per image on a CPU.
TINY = DetectorConfig(blocks=(1, 1, 1, 1), test_scale=128, max_size=214, rpn_pre_nms_top_n=600, rpn_post_nms_top_n=16)


def add_detector_arguments(parser: Any, help_prefix: str = "detector: ") -> None:
    """The detector's test-time settings as command-line options (``--test-scale``, ``--max-size``, ``--pre-nms``,
    ``--proposals``; Caffe's values as defaults) on ``parser`` (an ``argparse`` parser or sub-parser)."""
    parser.add_argument("--test-scale", type=int, default=600, help=f"{help_prefix}shorter image side (Caffe: 600)")
    parser.add_argument("--max-size", type=int, default=1000, help=f"{help_prefix}cap on the longer side (Caffe: 1000)")
    parser.add_argument(
        "--pre-nms", type=int, default=6000, help=f"{help_prefix}RPN proposals before NMS (Caffe: 6000)"
    )
    parser.add_argument("--proposals", type=int, default=300, help=f"{help_prefix}RoIs per image (Caffe: 300)")


def detector_config(args: argparse.Namespace, **selection: Any) -> DetectorConfig:
    """The :class:`DetectorConfig` of the options :func:`add_detector_arguments` added, with ``selection`` (the box
    selection fields) set as given; a ``ConfigError`` naming the option for a count below 1."""
    for flag, value in (
        ("--test-scale", args.test_scale),
        ("--max-size", args.max_size),
        ("--pre-nms", args.pre_nms),
        ("--proposals", args.proposals),
    ):
        if value < 1:
            raise ConfigError(f"{flag}: expected an integer >= 1, got {value}")
    return DetectorConfig(
        test_scale=args.test_scale,
        max_size=args.max_size,
        rpn_pre_nms_top_n=args.pre_nms,
        rpn_post_nms_top_n=args.proposals,
        **selection,
    )
