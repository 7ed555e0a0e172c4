"""Greedy NMS with ``cpu_nms`` semantics, batched: the RPN's NMS over images and the per-class max-confidence loop.

``cpu_nms.pyx``: visit boxes by descending score; keep a box unless an already kept box overlaps it with
``ovr >= thresh`` (legacy ``+1`` areas, float32). Ties in score are visited lowest index first (numpy's argsort
leaves their order unspecified). Both loops below are that greedy pass written over a batch of independent
groups (images, or image x class pairs), so that the number of steps does not grow with the number of groups
(UNITER's loop makes 1,600 NMS calls per image): the RPN's visits the kept boxes (at most 300 of up to 6000), the
class loop visits ranks over a bit-packed suppression matrix shared by all classes.
"""

from __future__ import annotations

import torch

from uniter_fast.extract.boxes import float32_at_least, legacy_areas, legacy_iou

SYNC_EVERY = 8  # steps between checks that some image still has candidates (each check synchronises a GPU)
WORD_BITS = 32  # bits used per int64 word of a bitset (no sign bit involved)


def rpn_nms(boxes: torch.Tensor, num_valid: torch.Tensor, thresh: float, max_keep: int) -> torch.Tensor:
    """NMS of the proposal layer, batched over images.

    boxes [B, N, 4] float32 sorted by descending score per image; the first ``num_valid[b]`` are candidates.
    Returns keep [B, N] bool (rank order), at most ``max_keep`` True per image: the post-NMS top-N. Each step keeps,
    in every image, the best candidate not yet suppressed and suppresses what it overlaps (one [B, N] IoU row).
    """
    n = boxes.shape[1]
    alive = torch.arange(n, device=boxes.device)[None, :] < num_valid[:, None]
    keep = torch.zeros_like(alive)
    areas = legacy_areas(boxes)
    thr = float32_at_least(thresh)
    images = torch.arange(boxes.shape[0], device=boxes.device)
    for step in range(min(max_keep, n)):
        if step % SYNC_EVERY == 0 and not bool(alive.any()):
            break
        first = alive.to(torch.uint8).argmax(dim=1)  # best alive rank (0 when none is alive)
        has = alive[images, first]
        keep[images, first] |= has
        overlap = legacy_iou(boxes[images, first][:, None, :], boxes, areas[images, first][:, None], areas) >= thr
        alive &= ~(overlap & has[:, None])
        alive[images, first] = False
    return keep


def suppression_matrix(boxes: torch.Tensor, thresh: float) -> torch.Tensor:
    """[..., R, R] bool: box i suppresses box j (legacy IoU >= thresh) for boxes [..., R, 4] float32."""
    areas = legacy_areas(boxes)
    iou = legacy_iou(boxes[..., :, None, :], boxes[..., None, :, :], areas[..., :, None], areas[..., None, :])
    return iou >= float32_at_least(thresh)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [..., N] -> int64 [..., ceil(N / 32)], bit j of word w = mask[..., 32 w + j]."""
    n = mask.shape[-1]
    words = (n + WORD_BITS - 1) // WORD_BITS
    bits = torch.nn.functional.pad(mask.to(torch.int64), (0, words * WORD_BITS - n))
    shifts = torch.arange(WORD_BITS, device=mask.device, dtype=torch.int64)
    return (bits.view(*mask.shape[:-1], words, WORD_BITS) << shifts).sum(-1)


def max_confidence(boxes: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor, thresh: float) -> torch.Tensor:
    """UNITER's max-confidence loop, vectorised: one IoU matrix per image shared by all classes.

    boxes [B, R, 4] float32 (original-image RoIs), scores [B, R, K] (class probabilities, background excluded),
    valid [B, R] bool. For each class, greedy NMS at ``thresh``; conf[r] = max over the classes whose NMS keeps r of
    scores[r, class], 0 if none (``max_conf`` of ``generate_npz.py``). Returns conf [B, R] in scores' dtype.

    Greedy NMS by rank: step t visits, in every (image, class) group at once, the box of rank t; it is kept if no
    kept box suppressed it. The "not yet suppressed" sets are bitsets in box order ([B, K, R / 32] int64), so a step
    is a few ops on [B, K] and [B, K, R / 32] elements plus a row gather from the bit-packed matrix [B, R, R / 32].
    """
    b, r, k = scores.shape
    conf = scores.new_zeros(b, r)
    if r == 0:
        return conf
    suppress = pack_bits(suppression_matrix(boxes, thresh) & valid[:, None, :])  # [B, R, W]
    by_class = scores.transpose(1, 2).masked_fill(~valid[:, None, :], float("-inf"))  # [B, K, R]
    ranked, order = torch.sort(by_class, dim=-1, descending=True, stable=True)
    alive = pack_bits(valid)[:, None, :].expand(b, k, -1).contiguous()  # [B, K, W]
    rows = suppress.view(b * r, -1)
    row_of = order + (torch.arange(b, device=boxes.device) * r)[:, None, None]  # index into ``rows``
    word_of, bit_of = order // WORD_BITS, order % WORD_BITS
    zero = torch.zeros((), dtype=scores.dtype, device=scores.device)
    for step in range(int(valid.sum(1).max())):
        word = alive.gather(2, word_of[:, :, step, None]).squeeze(-1)
        has = ((word >> bit_of[:, :, step]) & 1).bool()
        suppressed = rows.index_select(0, row_of[:, :, step].reshape(-1)).view(b, k, -1)
        alive &= ~(suppressed * has[..., None])
        conf.scatter_reduce_(1, order[:, :, step], torch.where(has, ranked[:, :, step], zero), reduce="amax")
    return conf
