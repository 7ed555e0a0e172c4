"""Pictures of a pretraining run: ``curves.png`` (training and validation curves per task) and ``alignment.png``
(word-region alignment: the WRA transport plan of a few validation pairs, matched next to mismatched).

Matplotlib draws through its Agg canvas (``matplotlib.figure.Figure``, no pyplot), so no display is needed.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from uniter_fast.checkpoint import load_checkpoint
from uniter_fast.config import UniterConfig
from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.data.collate import collate
from uniter_fast.data.corpus import CLASS_NAMES_FILE
from uniter_fast.data.datasets import DetectFeatTxtTokDataset
from uniter_fast.data.records import Draws
from uniter_fast.files import atomic_write
from uniter_fast.ot import cost_matrix_cosine, ipot
from uniter_fast.pretraining.config import ALIGNMENT_NAME, CURVES_NAME, TrainingConfig
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.training.logs import PRETRAINED_SUBDIR, STEP_LOG, VAL_LOG, read_jsonl

SMOOTH = 20
VOCAB_NAME = "vocab.txt"


def _moving_mean(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values, float64 [len(values)]."""
    cumsum = np.cumsum(np.insert(np.asarray(values, dtype=np.float64), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def plot_curves(
    train_records: list[dict[str, Any]],
    val_records: list[dict[str, Any]],
    path: str,
    phase_starts: Sequence[int] = (),
) -> str:
    """One panel per task: training loss per step (raw and a 20-step mean), validation loss, and validation accuracy
    on a second axis; ITM with WRA gets a second panel with the mean OT distance of matched and mismatched pairs.

    ``train_records``: the ``train_steps.jsonl`` lines (step, task, loss, ...); ``val_records``: the
    ``validation.jsonl`` lines (step, task, loss, acc, ot_pos, ot_neg, ...); ``phase_starts``: the steps where a
    curriculum phase begins (a dotted line in every panel). Writes a PNG to ``path``; returns it.
    """
    tasks = sorted({r["task"] for r in train_records} | {r["task"] for r in val_records})
    panels = [(t, "loss") for t in tasks]
    panels += [(t, "ot") for t in tasks if any("ot_pos" in r for r in val_records if r["task"] == t)]
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.6 * nrows), layout="constrained")
    train_by_task: dict[str, list[dict]] = defaultdict(list)
    val_by_task: dict[str, list[dict]] = defaultdict(list)
    for r in train_records:
        train_by_task[r["task"]].append(r)
    for r in val_records:
        val_by_task[r["task"]].append(r)
    for i, (task, kind) in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        train, val = train_by_task[task], val_by_task[task]
        if kind == "ot":
            ax.set_title(f"{task}: WRA (validation OT distance)")
            ax.plot([r["step"] for r in val], [r["ot_pos"] for r in val], "o-", label="matched pairs")
            ax.plot([r["step"] for r in val], [r["ot_neg"] for r in val], "s-", label="mismatched pairs")
            ax.set_ylabel("mean OT distance")
        else:
            ax.set_title(task)
            if train:
                steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
                ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8)
                ax.plot(steps, _moving_mean(losses, SMOOTH), color="tab:blue", label=f"train loss ({SMOOTH}-step mean)")
            if val:
                ax.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", color="tab:orange", label="val loss")
            ax.set_ylabel("loss")
            ax.set_yscale("log")
            if any("acc" in r for r in val):
                acc_ax = ax.twinx()
                steps = [r["step"] for r in val]
                acc_ax.plot(steps, [r["acc"] for r in val], "^--", color="tab:green", label="val acc")
                acc_ax.set_ylim(0, 1)
                acc_ax.set_ylabel("accuracy")
                acc_ax.legend(loc="upper right", fontsize=8)
        for k, start in enumerate(phase_starts):
            ax.axvline(start, color="gray", linestyle=":", label="curriculum phase starts" if k == 0 else None)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left" if kind == "ot" else "lower left", fontsize=8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return path


def region_names(img_db_path: str) -> dict[int, str]:
    """Class names by soft-label column from ``<img_db>/class_names.json`` ({} if the db has none)."""
    path = os.path.join(img_db_path, CLASS_NAMES_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return {int(k): v for k, v in json.load(f).items()}


def _region_labels(soft_labels: torch.Tensor, names: dict[int, str]) -> list[str]:
    """One label per region: the name of its soft label's argmax column ("bg" for the background column 0)."""
    labels = []
    for col in soft_labels.argmax(-1).tolist():
        labels.append("bg" if col == 0 else names.get(col, f"class {col}"))
    return labels


def _image_classes(dataset: DetectFeatTxtTokDataset, img_fname: str) -> set[int]:
    """The soft-label argmax columns of an image's regions, background excluded."""
    return set(dataset.img_db.get_dump(img_fname)["soft_labels"].argmax(-1).tolist()) - {0}


def pick_pairs(dataset: DetectFeatTxtTokDataset, n_pairs: int, candidates: int = 30) -> list[tuple[int, str, str]]:
    """(text index, its own image, a mismatched image) for the first ``n_pairs`` texts of distinct images; the
    mismatched image is, among ``candidates`` other images, the one sharing the fewest region classes."""
    chosen: list[tuple[int, str, str]] = []
    seen: set[str] = set()
    images = sorted(set(dataset.img_fnames))
    for index, own in enumerate(dataset.img_fnames):
        if len(chosen) == n_pairs:
            break
        if own in seen:
            continue
        seen.add(own)
        own_classes = _image_classes(dataset, own)
        start = images.index(own) + 1
        others = [images[(start + k) % len(images)] for k in range(min(candidates, len(images) - 1))]
        overlap = [len(own_classes & _image_classes(dataset, other)) for other in others]
        chosen.append((index, own, others[int(np.argmin(overlap))]))
    return chosen


@torch.no_grad()
def alignment(
    model: UniterForPretraining, dataset: DetectFeatTxtTokDataset, index: int, img_fname: str
) -> dict[str, Any]:
    """The WRA picture data of text ``index`` paired with image ``img_fname``: ``plan`` float32 [words, regions]
    (IPOT plan over the text tokens, [CLS]/[SEP] included, and the regions), ``dist`` (Σ cost ⊙ plan, the OT
    distance), ``p_match`` (ITM probability of a match), ``input_ids`` [words] and ``soft_labels`` [regions, 1601]."""
    arrays = dataset.img_db.views(img_fname, ("features", "norm_bb", "soft_labels"))
    record = dataset[index]._replace(
        img_fname=img_fname, features=arrays["features"], norm_bb=arrays["norm_bb"], target=1
    )
    batch = collate("itm", [record], Draws(), dataset.token_ids, layout="padded")
    model.eval()
    plan, dist, sequence_output = wra_plan(model.uniter, batch, model.ot_settings)
    scores = model.itm_output(model.uniter.pooler(sequence_output))
    return {
        "plan": plan,
        "dist": dist,
        "p_match": float(scores.softmax(-1)[0, 1]),
        "input_ids": batch["input_ids"][0],
        "soft_labels": torch.from_numpy(arrays["soft_labels"].astype(np.float32)),
    }


@torch.no_grad()
def wra_plan(encoder: Any, batch: dict[str, Any], ot_settings: dict[str, Any]) -> tuple[torch.Tensor, float, Any]:
    """(IPOT plan float32 [words, regions] of the first pair of the padded joint ``batch``, over its text tokens
    ([CLS]/[SEP] included) and regions; the OT distance Σ cost ⊙ plan; the encoder's sequence output
    [1, L, H] float32) with the UNITER ``encoder`` and the IPOT ``ot_settings`` (beta, iteration, k)."""
    sequence_output = encoder.forward_batch(batch).float()
    n_words, n_regions = int(batch["txt_lens"][0]), int(batch["num_bbs"][0])
    txt = sequence_output[:1, :n_words]
    img = sequence_output[:1, n_words : n_words + n_regions]
    cost = cost_matrix_cosine(txt, img)
    no_pad_txt = torch.zeros(1, n_words, dtype=torch.bool)
    no_pad_img = torch.zeros(1, n_regions, dtype=torch.bool)
    plan = ipot(cost, no_pad_txt, no_pad_img, **ot_settings, backend="reference")
    return plan[0], float((cost * plan).sum()), sequence_output[:1]


def draw_plan(ax: Any, plan: np.ndarray, words: list[str], regions: list[str], title: str) -> Any:
    """The transport plan [words, regions] as a heatmap on the matplotlib axes ``ax`` (normalised by its maximum),
    words as rows and ``regions`` labels as columns, with ``title``; returns the image (for a colour bar)."""
    image = ax.imshow(plan / plan.max(), cmap="viridis", aspect="auto", vmin=0, vmax=1)
    ax.set_yticks(range(len(words)), words, fontsize=7)
    ax.set_xticks(range(plan.shape[1]), regions, rotation=90, fontsize=6)
    ax.set_title(title, fontsize=9)
    return image


def plot_alignment(
    model: UniterForPretraining,
    dataset: DetectFeatTxtTokDataset,
    path: str,
    token: Callable[[int], str],
    class_names: Optional[dict[int, str]] = None,
    n_pairs: int = 3,
) -> str:
    """``n_pairs`` rows of two heatmaps each, the matched pair (left) and a mismatched pair (right) of one caption:
    the IPOT plan as words (rows) x regions (columns, labelled with their class), with the OT distance and the ITM
    match probability in the titles. ``token(id)`` gives a word piece's text. Writes a PNG to ``path``; returns it."""
    pairs = pick_pairs(dataset, n_pairs)
    names = class_names or {}
    panels = [[alignment(model, dataset, i, own), alignment(model, dataset, i, other)] for i, own, other in pairs]
    width = max(len(p["soft_labels"]) for row in panels for p in row)
    height = max(len(p["input_ids"]) for row in panels for p in row)
    fig = Figure(figsize=(2 * (2.0 + 0.24 * width), len(pairs) * (1.6 + 0.2 * height)), layout="constrained")
    for r, row in enumerate(panels):
        for c, panel in enumerate(row):
            ax = fig.add_subplot(len(pairs), 2, 2 * r + c + 1)
            words = [token(t) for t in panel["input_ids"].tolist()]
            kind = "matched" if c == 0 else "mismatched"
            title = f"{kind}: OT distance {panel['dist']:.3f}, P(match) {panel['p_match']:.2f}"
            regions = _region_labels(panel["soft_labels"], names)
            image = draw_plan(ax, panel["plan"].numpy(), words, regions, title)
            if c == 1:
                fig.colorbar(image, ax=ax, label="transport plan / max", shrink=0.8)
    fig.suptitle("Word-region alignment (WRA): IPOT plan of validation captions with their image and another image")
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    return path


def vocab_lookup(txt_db_path: str) -> Callable[[int], str]:
    """Word piece id -> text, from a ``vocab.txt`` in the txt_db directory or its parent (the bundled corpus keeps it
    there); without one, ids show as ``#<id>``."""
    for directory in (txt_db_path, os.path.dirname(os.path.abspath(txt_db_path))):
        path = os.path.join(directory, VOCAB_NAME)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                tokens = f.read().splitlines()
            return lambda i: tokens[i] if 0 <= i < len(tokens) else f"#{i}"
    return lambda i: f"#{i}"


def write_pictures(cfg: TrainingConfig, model_config: UniterConfig, output_dir: str) -> list[str]:
    """``curves.png`` from the run's logs and ``alignment.png`` from its exported weights (``pretrained/``) on the
    first validation dataset; returns the paths written."""
    curves = plot_curves(
        read_jsonl(os.path.join(output_dir, STEP_LOG)),
        read_jsonl(os.path.join(output_dir, VAL_LOG)),
        os.path.join(output_dir, CURVES_NAME),
        [first for first, _ in cfg.phase_starts() or []][1:],
    )
    model = UniterForPretraining(model_config, itm_ot_lambda=cfg.itm_ot_lambda, ot_settings=vars(cfg.ot))
    load_checkpoint(model, os.path.join(output_dir, PRETRAINED_SUBDIR), strict=False)
    spec = cfg.val_datasets[0]
    dataset = DetectFeatTxtTokDataset(
        TxtTokLmdb(spec.db[0], cfg.max_txt_len), DetectFeatLmdb(spec.img[0], cfg.conf_th, cfg.max_bb, cfg.min_bb)
    )
    alignment_path = plot_alignment(
        model,
        dataset,
        os.path.join(output_dir, ALIGNMENT_NAME),
        vocab_lookup(spec.db[0]),
        region_names(spec.img[0]),
    )
    return [curves, alignment_path]
