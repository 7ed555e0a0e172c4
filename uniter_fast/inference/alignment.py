"""The word-region alignment (WRA) of one photo and one text as a picture: the IPOT transport plan of the task
model's encoder (``uniter_fast.pretraining.plots.wra_plan``, the computation of the pretraining run's
``alignment.png``) drawn over the photo (each region's box in the colour of the word that sends it the most mass,
its opacity the region's share) beside the words x regions heatmap (``plots.draw_plan``)."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from uniter_fast.data.collate import collate_rows
from uniter_fast.data.memory_db import memory_img_db, memory_txt_writer
from uniter_fast.data.task_records import caption_record
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtTokLmdb
from uniter_fast.files import atomic_write
from uniter_fast.pretraining.model import OT_DEFAULTS
from uniter_fast.pretraining.plots import draw_plan, wra_plan
from uniter_fast.tasks.data import row
from uniter_fast.tasks.spec import QUERY_VOCAB_NAME

KEY = "image.npz"


def pair_batch(
    toker: WordPiece, text: str, record: dict[str, np.ndarray], box_settings: tuple[float, int, int, int]
) -> tuple[dict[str, Any], np.ndarray]:
    """(the joint batch of ``text`` with one image's npz fields ``record``, as a caption record through the
    in-memory dbs; the image's norm_bb [n, 6] of the regions the batch holds)."""
    img_db = memory_img_db({KEY: record}, box_settings)
    id_, ids, image, fields = caption_record({"id": "0", "image": KEY, "caption": text}, toker, "alignment text")
    txt_db = TxtTokLmdb.from_writer(
        *memory_txt_writer(toker.meta(QUERY_VOCAB_NAME), [("text", id_, ids, image, fields)])
    )
    batch = collate_rows([row(txt_db.combine_inputs(txt_db[id_]["input_ids"]), *img_db[KEY])], "alignment")
    return batch, record["norm_bb"][: img_db.name2nbb[KEY]].astype(np.float32)


@torch.no_grad()
def plot_wra(
    encoder: Any,
    toker: WordPiece,
    text: str,
    rgb: np.ndarray,
    record: dict[str, np.ndarray],
    box_settings: tuple[float, int, int, int],
    path: str,
    ot_settings: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    """Draw the WRA of ``text`` and the photo ``rgb`` [H, W, 3] uint8 (its extractor fields ``record``) with the
    UNITER ``encoder`` to the PNG ``path``; returns {"path", "words" [t], "plan" [t][n] (float, rows = words with
    [CLS]/[SEP]), "ot_distance"}."""
    batch, norm_bb = pair_batch(toker, text, record, box_settings)
    device = next(encoder.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    plan, dist, _ = wra_plan(encoder, batch, {**OT_DEFAULTS, **(ot_settings or {})})
    plan = plan.cpu().numpy()
    tokens = {i: t for t, i in toker.vocab.items()}
    words = [tokens.get(i, f"#{i}") for i in batch["input_ids"][0, : plan.shape[0]].tolist()]
    height, width = rgb.shape[:2]
    inner = plan[1:-1] if plan.shape[0] > 2 else plan  # the words, without [CLS] / [SEP]
    owner = inner.argmax(0)
    share = inner.sum(0) / max(float(inner.sum(0).max()), 1e-12)
    colours = colormaps["tab10"]
    fig = Figure(figsize=(12, 5), layout="constrained")
    photo = fig.add_subplot(1, 2, 1)
    photo.imshow(rgb)
    for k, (box, word, alpha) in enumerate(zip(norm_bb, owner, share)):
        x1, y1, x2, y2 = box[:4] * [width, height, width, height]
        colour = colours(int(word) % 10)
        photo.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=2, ec=colour, alpha=float(alpha)))
        if alpha > 0.5:
            label = words[int(word) + (1 if plan.shape[0] > 2 else 0)]
            photo.text(x1, y1, f"{k}:{label}", color="white", fontsize=7, bbox={"fc": colour, "alpha": float(alpha)})
    photo.set_axis_off()
    photo.set_title(f"regions coloured by the word sending them most mass (opacity: share)\n{text}", fontsize=9)
    heat = fig.add_subplot(1, 2, 2)
    image = draw_plan(heat, plan, words, [str(k) for k in range(plan.shape[1])], f"WRA plan, OT distance {dist:.3f}")
    fig.colorbar(image, ax=heat, label="transport plan / max", shrink=0.8)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return {"path": path, "words": words, "plan": plan.tolist(), "ot_distance": dist}
