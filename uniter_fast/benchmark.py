"""The UNITER paper's table (Chen et al., ECCV 2020, arXiv 1909.11740, Table 3) and the benchmark folder that
``python -m uniter_fast.evaluate --benchmark DIR`` evaluates against it.

A benchmark folder holds, per benchmark of the paper, the fine-tuned checkpoint and the databases of its splits as
``python -m uniter_fast.build`` writes them (``txt/``, ``img/``, and ``img_gt/`` for RE and VCR)::

    DIR/pretrained                     the pretrained checkpoint (zero-shot Flickr30K retrieval)
    DIR/vqa/checkpoint                 + DIR/vqa/test/        (test2015: test-dev and test-std, scored by the server)
    DIR/vcr/checkpoint                 + DIR/vcr/test/        (scored by the leaderboard)
    DIR/nlvr2/checkpoint               + DIR/nlvr2/dev/, DIR/nlvr2/test1/          (test1 = test-P)
    DIR/snli-ve/checkpoint             + DIR/snli-ve/dev/, DIR/snli-ve/test/
    DIR/flickr30k/checkpoint           + DIR/flickr30k/test/  (Karpathy test, 1k images)
    DIR/coco/checkpoint                + DIR/coco/test/       (Karpathy test, 5k images)
    DIR/refcoco/checkpoint             + DIR/refcoco/val/, testA/, testB/    (GT boxes: img_gt/; detected: img/)
    DIR/refcoco+/checkpoint            + the same splits
    DIR/refcocog/checkpoint            + DIR/refcocog/val/, test/

A checkpoint is anything ``evaluate --checkpoint`` takes (a ``finetune.py`` export folder, an original
``model_step_N.pt``). A row whose checkpoint or split is absent is shown as "-". The paper scores VQA test-dev /
test-std and VCR test on evaluation servers: for those rows the predictions are written in the servers' formats
(VQA ``results.json``, the VCR leaderboard CSV) and the table names the file instead of a figure.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

PRETRAINED = "pretrained"
CHECKPOINT = "checkpoint"


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 3: the figures of UNITER-base and -large (percent) for ``metrics`` (this project's
    metric names, fractions) of ``task`` on split folder ``DIR/<benchmark>/<split>``, evaluated with the checkpoint
    at ``DIR/<checkpoint>``; ``boxes`` "gt" or "det" picks RE's img_db; ``server``: the labels are not public."""

    label: str
    benchmark: str
    task: str
    split: str
    metrics: tuple[str, ...]
    base: tuple[float, ...]
    large: tuple[float, ...]
    checkpoint: str = ""
    boxes: str = "det"
    server: bool = False

    @property
    def checkpoint_path(self) -> str:
        """The checkpoint's path relative to the benchmark folder."""
        return self.checkpoint or os.path.join(self.benchmark, CHECKPOINT)

    def img_db(self, split_dir: str) -> str:
        """The img_db argument of this row's split folder (VCR: "gt;det")."""
        if self.task == "vcr":
            return f"{os.path.join(split_dir, 'img_gt')};{os.path.join(split_dir, 'img')}"
        return os.path.join(split_dir, "img_gt" if self.boxes == "gt" else "img")


IR = ("img_r1", "img_r5", "img_r10")  # image retrieval: texts as queries (our "img_r*")
TR = ("txt_r1", "txt_r5", "txt_r10")  # text retrieval: images as queries


def _refcoco(name: str, splits: tuple[str, ...], gt: tuple, det: tuple) -> list[PaperRow]:
    """The GT-box and detected-box rows of one RefCOCO dataset (``gt`` / ``det``: {split: (base, large)})."""
    rows = []
    for boxes, figures, mark in (("gt", gt, ""), ("det", det, "^d")):
        for split, (base, large) in zip(splits, figures):
            rows.append(
                PaperRow(f"{name} {split}{mark}", name.lower(), "re", split, ("acc",), (base,), (large,), boxes=boxes)
            )
    return rows


PAPER_TABLE: tuple[PaperRow, ...] = (
    PaperRow("VQA test-dev", "vqa", "vqa", "test", ("acc",), (72.70,), (73.82,), server=True),
    PaperRow("VQA test-std", "vqa", "vqa", "test", ("acc",), (72.91,), (74.02,), server=True),
    PaperRow(
        "VCR test Q->A / QA->R / Q->AR",
        "vcr",
        "vcr",
        "test",
        ("acc_qa", "acc_qar", "acc_q_ar"),
        (75.00, 77.20, 58.20),
        (77.30, 80.80, 62.80),
        server=True,
    ),
    PaperRow("NLVR2 dev", "nlvr2", "nlvr2", "dev", ("acc",), (77.18,), (79.12,)),
    PaperRow("NLVR2 test-P", "nlvr2", "nlvr2", "test1", ("acc",), (77.85,), (79.98,)),
    PaperRow("SNLI-VE val", "snli-ve", "ve", "dev", ("acc",), (78.59,), (79.39,)),
    PaperRow("SNLI-VE test", "snli-ve", "ve", "test", ("acc",), (78.28,), (79.38,)),
    PaperRow("Flickr30K IR R@1/5/10", "flickr30k", "itm", "test", IR, (72.52, 92.36, 96.08), (75.56, 94.08, 96.76)),
    PaperRow("Flickr30K TR R@1/5/10", "flickr30k", "itm", "test", TR, (85.90, 97.10, 98.80), (87.30, 98.00, 99.20)),
    PaperRow(
        "Flickr30K zero-shot IR R@1/5/10",
        "flickr30k",
        "itm",
        "test",
        IR,
        (66.16, 88.40, 92.94),
        (68.74, 89.20, 93.86),
        checkpoint=PRETRAINED,
    ),
    PaperRow(
        "Flickr30K zero-shot TR R@1/5/10",
        "flickr30k",
        "itm",
        "test",
        TR,
        (80.70, 95.70, 98.00),
        (83.60, 95.70, 97.70),
        checkpoint=PRETRAINED,
    ),
    PaperRow("COCO IR R@1/5/10", "coco", "itm", "test", IR, (50.33, 78.52, 87.16), (52.93, 79.93, 87.95)),
    PaperRow("COCO TR R@1/5/10", "coco", "itm", "test", TR, (64.40, 87.40, 93.08), (65.68, 88.56, 93.76)),
    *_refcoco(
        "RefCOCO",
        ("val", "testA", "testB"),
        ((91.64, 91.84), (92.26, 92.65), (90.46, 91.19)),
        ((81.24, 81.41), (86.48, 87.04), (73.94, 74.17)),
    ),
    *_refcoco(
        "RefCOCO+",
        ("val", "testA", "testB"),
        ((83.66, 84.25), (86.19, 86.34), (78.89, 79.75)),
        ((75.31, 75.90), (81.30, 81.45), (65.58, 66.70)),
    ),
    *_refcoco("RefCOCOg", ("val", "test"), ((86.52, 87.85), (86.52, 87.73)), ((74.31, 74.86), (74.51, 75.77))),
)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation a benchmark folder holds: ``task`` with the checkpoint at ``checkpoint`` on the split whose
    databases are ``txt_db`` / ``img_db``; ``name`` (benchmark, boxes, fine-tuned or zero-shot) and the split name its
    prediction files."""

    name: str
    task: str
    checkpoint: str
    split: str
    txt_db: str
    img_db: str


def row_evaluation(root: str, row: PaperRow) -> Optional[Evaluation]:
    """The evaluation that measures ``row`` in benchmark folder ``root``; None when its checkpoint or its split's
    databases are absent."""
    checkpoint = os.path.join(root, row.checkpoint_path)
    split_dir = os.path.join(root, row.benchmark, row.split)
    img_db = row.img_db(split_dir)
    needed = [checkpoint, os.path.join(split_dir, "txt"), *img_db.split(";")]
    if not all(os.path.exists(path) for path in needed):
        return None
    source = "zeroshot" if row.checkpoint == PRETRAINED else "finetuned"
    name = f"{row.benchmark}_{row.boxes}_{source}"
    return Evaluation(name, row.task, checkpoint, row.split, os.path.join(split_dir, "txt"), img_db)


def measured_cell(row: PaperRow, metrics: Optional[dict[str, float]], files: Optional[list[str]]) -> str:
    """The "measured" cell of ``row``: its figures in percent ("a / b / c"), the server file for a server row, or "-"
    when the folder does not hold it."""
    if metrics is None:
        return "-"
    if row.server:  # the file the server takes: VCR's leaderboard CSV, VQA's results JSON
        server_files = sorted(files or [], key=lambda f: not f.endswith(".csv"))
        return f"server: {server_files[0]}" if server_files else "-"
    return " / ".join(f"{100 * metrics[m]:.2f}" for m in row.metrics)


def paper_cell(figures: tuple[float, ...]) -> str:
    """The paper's figures of a row as "a / b / c"."""
    return " / ".join(f"{f:.2f}" for f in figures)
