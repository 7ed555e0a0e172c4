"""Gallery images held once on a device, and the packed joint batches of (text, gallery image) pairs.

Retrieval scores every text with many images (exact evaluation: every text x every image; re-ranking: a shortlist),
so the same image's region features recur in thousands of pairs. The task collate copies each pair's features on the
host into both layouts (about 140 KB per pair of 17 regions, twice, into fresh memory), which is what bounds exact
evaluation, not the encoder. :class:`ImageGallery` copies every image's regions to the device once; a pair batch
then carries only its texts and the layout's index arithmetic from the host, and gathers its region rows from the
gallery on the device (:func:`packed_pairs`, :func:`with_regions`; ITM's distillation builds its teacher grid the
same way from the batch's own images). The gathered tensors are the collate's (the same float32 values in the same
order), so the packed encoder's scores are bit-identical to the collate's batch (``tests/test_data_gallery.py``).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from uniter_fast.data.assemble import Examples, assemble, ranks


def region_rows(first_row: np.ndarray, num_bbs: np.ndarray, index: np.ndarray) -> np.ndarray:
    """The rows (int64 [Σ num_bbs[index]]) of images ``index`` (int64 [B]) in a flat region store where image i
    holds rows ``first_row[i]`` .. ``first_row[i] + num_bbs[i] - 1``, image by image in ``index`` order."""
    counts = num_bbs[index]
    return np.repeat(first_row[index], counts) + ranks(counts)


def with_regions(
    packed: dict[str, Any], rows: torch.Tensor, img_feat: torch.Tensor, img_pos_feat: torch.Tensor
) -> dict[str, Any]:
    """``packed``, a packed layout built without region features (``assemble`` with ``features`` None), with its
    ``img_feat`` [R, 2048] / ``img_pos_feat`` [R, 7] gathered on the store's device: rows ``rows`` (int64 [R], on
    that device) of ``img_feat`` [N, 2048] / ``img_pos_feat`` [N, 7]."""
    return {**packed, "img_feat": img_feat.index_select(0, rows), "img_pos_feat": img_pos_feat.index_select(0, rows)}


def packed_pairs(texts: Sequence[torch.Tensor], num_bbs: np.ndarray, task: str) -> dict[str, Any]:
    """The packed joint layout of pairs (``texts[p]`` int64 [t_p] ([CLS] .. [SEP]), ``num_bbs[p]`` regions) without
    region features (:func:`with_regions` adds them), plus ``txt_lens`` / ``num_bbs`` [B] int64 and ``task``."""
    examples = Examples(
        txt_lens=np.array([text.numel() for text in texts], dtype=np.int64),
        input_ids=torch.cat(list(texts)).numpy(),
        num_bbs=np.asarray(num_bbs, dtype=np.int64),
        features=None,
        boxes=None,
    )
    batch = assemble(examples, ("packed",))
    batch["task"] = task
    return batch


class ImageGallery:
    """The regions of ``images`` [(img_feat float32 [n_i, 2048], img_pos_feat float32 [n_i, 7])] in one tensor on
    ``device``: ``img_feat`` [Σn, 2048], ``img_pos_feat`` [Σn, 7], image i at rows ``first_row[i]`` ..
    ``first_row[i] + num_bbs[i] - 1``."""

    def __init__(self, images: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> None:
        if not images:
            raise ValueError("ImageGallery needs at least one image")
        self.num_bbs = np.array([feat.size(0) for feat, _ in images], dtype=np.int64)
        self.first_row = np.cumsum(self.num_bbs) - self.num_bbs
        self.img_feat = torch.cat([feat for feat, _ in images]).to(device)
        self.img_pos_feat = torch.cat([pos for _, pos in images]).to(device)

    def pairs_batch(self, texts: Sequence[torch.Tensor], img_index: np.ndarray, task: str = "itm") -> dict[str, Any]:
        """The packed joint batch (contract 2 alone, ``batch["packed"]``, plus ``txt_lens`` / ``num_bbs`` [B] int64
        and ``task``) of the pairs (``texts[p]`` int64 [t_p] ([CLS] .. [SEP]), image ``img_index[p]``): region
        features and boxes gathered on the gallery's device, the rest built on the host."""
        img_index = np.asarray(img_index, dtype=np.int64)
        if len(texts) != img_index.size:
            raise ValueError(f"pairs_batch: {len(texts)} texts for {img_index.size} images")
        batch = packed_pairs(texts, self.num_bbs[img_index], task)
        rows = torch.from_numpy(region_rows(self.first_row, self.num_bbs, img_index)).to(self.img_feat.device)
        batch["packed"] = with_regions(batch["packed"], rows, self.img_feat, self.img_pos_feat)
        return batch
