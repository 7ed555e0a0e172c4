"""Retrieval evaluation: the score matrix (every text x every image, or the first stage's candidates re-ranked)
and recall R@1/5/10 in both directions, as the original ``utils/itm_eval.py``.

* ``itm_recall``: text->image ("img_r*", image retrieval) is the share of texts whose image ranks in the top K of
  its row; image->text ("txt_r*") the share of images with at least one of their texts in the top K of the column;
  ``*_r_mean`` and ``r_mean`` as the original. Ties rank the lower index first (a stable sort). The original
  counts ``(rank < K)`` over both columns of ``nonzero()`` (row and position), adding a spurious hit for each of
  the first K texts whose image is in its top 10 (at most 10 / #texts: 0.04 points on COCO 5k); we count ranks
  only (``tests/test_tasks_itm_eval.py`` checks the difference is exactly that).
* ``exact``: every pair through the cross-encoder (packed encoder, pairs sharded over ranks, token-budget batches,
  bf16 autocast on GPU). Passes: #texts x #images.
* ``fast``: first-stage embeddings of every text and every image (single-modality passes + projections), cosine
  similarities, the ``top_k`` images of each text and the ``top_k`` texts of each image; only the union of those
  pairs goes through the cross-encoder. Pairs outside it rank below every candidate, in first-stage order. Reports
  the first stage's recall at k: ``first_stage_img_r{k}`` (texts whose image is among their candidates) and
  ``first_stage_txt_r{k}`` (images with one of their texts among theirs). With k = #images it equals ``exact``.
* ``first_stage_recall_of_exact`` (exact mode, when the model has a trained first stage): the share of the exact
  cross-encoder's top 10 of each query that the first stage's top k holds, at k = 2 %, 5 % and 10 % of the gallery
  (``first_stage_img_top10_k{p}pct``: images per text; ``first_stage_txt_top10_k{p}pct``: texts per image; the k
  used in ``first_stage_{img,txt}_k{p}pct``). At k < 10 it is at most k / 10.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from uniter_fast.data.gallery import ImageGallery
from uniter_fast.errors import CheckpointError
from uniter_fast.files import atomic_write, write_json_atomic
from uniter_fast.model.base import eval_mode
from uniter_fast.training.distributed import is_distributed, lockstep, rank_and_world

RECALL_AT = (1, 5, 10)
EXACT_TOP = 10  # the exact ranking's head that the first stage should keep
GALLERY_PERCENTS = (2, 5, 10)  # first-stage k as a share of the gallery


# ---------------------------------------------------------------------- recall
def ground_truth(txt_ids: list[str], img_ids: list[str], txt2img: dict[str, str]) -> np.ndarray:
    """int64 [T]: the column of each text's image; ``ValueError`` naming a text whose image is not a column."""
    column = {img: j for j, img in enumerate(img_ids)}
    missing = [t for t in txt_ids if txt2img.get(t) not in column]
    if missing:
        raise ValueError(f"text {missing[0]!r} has image {txt2img.get(missing[0])!r}, which is not in img_ids")
    return np.array([column[txt2img[t]] for t in txt_ids], dtype=np.int64)


@torch.no_grad()
def itm_recall(
    score_matrix: torch.Tensor, txt_ids: list[str], img_ids: list[str], txt2img: dict[str, str]
) -> dict[str, float]:
    """Recall table of ``score_matrix`` [T, I] (any float dtype; row t = text ``txt_ids[t]``, column j = image
    ``img_ids[j]``): txt_r1/5/10, txt_r_mean, img_r1/5/10, img_r_mean, r_mean (fractions, as the original)."""
    if score_matrix.dim() != 2 or tuple(score_matrix.shape) != (len(txt_ids), len(img_ids)):
        raise ValueError(f"score_matrix must be [{len(txt_ids)}, {len(img_ids)}], got {tuple(score_matrix.shape)}")
    if not txt_ids or not img_ids:
        raise ValueError("itm_recall needs at least one text and one image")
    scores = score_matrix.float()
    gt = torch.from_numpy(ground_truth(txt_ids, img_ids, txt2img)).to(scores.device)
    rows = torch.arange(len(txt_ids), device=scores.device)
    cols = torch.arange(len(img_ids), device=scores.device)
    # text -> image: rank of the text's image in its row (higher scores, then equal scores at lower columns)
    gt_score = scores[rows, gt]
    img_rank = (scores > gt_score[:, None]).sum(1) + ((scores == gt_score[:, None]) & (cols[None] < gt[:, None])).sum(1)
    # image -> text: rank of the image's best text (highest score, lowest row among equals) in its column
    is_gt = cols[None, :] == gt[:, None]
    masked = scores.masked_fill(~is_gt, float("-inf"))
    best_score, best_row = masked.max(0)
    best_row = torch.where(masked == best_score[None], rows[:, None], len(txt_ids)).min(0).values
    txt_rank = (scores > best_score[None]).sum(0) + ((scores == best_score[None]) & (rows[:, None] < best_row)).sum(0)
    out = {}
    for side, ranks in (("txt", txt_rank), ("img", img_rank)):
        for k in RECALL_AT:
            out[f"{side}_r{k}"] = float((ranks < k).float().mean())
        out[f"{side}_r_mean"] = sum(out[f"{side}_r{k}"] for k in RECALL_AT) / len(RECALL_AT)
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return {k: out[k] for k in sorted(out)}


def gallery_k(gallery: int, percent: int) -> int:
    """``percent`` % of ``gallery`` rounded up (integer arithmetic), at least 1."""
    return max(1, -(-gallery * percent // 100))


@torch.no_grad()
def first_stage_recall_of_exact(
    exact: torch.Tensor, similarity: torch.Tensor, top: int = EXACT_TOP, percents: tuple[int, ...] = GALLERY_PERCENTS
) -> dict[str, float]:
    """How much of the exact ranking's head the first stage keeps: for each text (row of ``exact`` / ``similarity``
    [T, I], any float dtype) the share of its ``top`` best images by ``exact`` that are among its k best by
    ``similarity``, averaged over texts (``first_stage_img_top{top}_k{p}pct``), and the same per image over texts
    (``first_stage_txt_top{top}_k{p}pct``), at k = ``gallery_k(gallery, p)`` (recorded as ``first_stage_{img,txt}
    _k{p}pct``); ``top`` is capped at the gallery. Ties rank the lower index first, as ``itm_recall``."""
    if exact.shape != similarity.shape or exact.dim() != 2:
        raise ValueError(
            f"exact and similarity must be equal 2-d shapes, got {tuple(exact.shape)} and {tuple(similarity.shape)}"
        )
    out = {}
    for side, dim in (("img", 1), ("txt", 0)):
        gallery = exact.size(dim)
        head = torch.sort(exact.float(), dim=dim, descending=True, stable=True).indices.narrow(
            dim, 0, min(top, gallery)
        )
        order = torch.sort(similarity.float(), dim=dim, descending=True, stable=True).indices
        position = order.argsort(dim=dim)  # the first-stage rank of every item (inverse permutation)
        head_position = position.gather(dim, head)
        for percent in percents:
            k = gallery_k(gallery, percent)
            out[f"first_stage_{side}_top{top}_k{percent}pct"] = float((head_position < k).float().mean())
            out[f"first_stage_{side}_k{percent}pct"] = float(k)
    return out


# ---------------------------------------------------------------------- scoring
def token_batches(lengths: np.ndarray, budget: int) -> Iterator[np.ndarray]:
    """Consecutive index ranges of ``lengths`` whose token sum stays within ``budget`` (at least one each)."""
    start, total = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if total + n > budget and i > start:
            yield np.arange(start, i)
            start, total = i, 0
        total += n
    if start < len(lengths):
        yield np.arange(start, len(lengths))


def scoring_autocast(device: torch.device) -> Any:
    """The autocast evaluation scores under: bf16 on CUDA, none elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def score_pairs(
    model: Any,
    dataset: Any,
    txt_index: np.ndarray,
    img_index: np.ndarray,
    batch_size: int,
    to_device: Callable[[dict[str, Any]], dict[str, Any]],
    desc: str = "cross-encoder",
) -> torch.Tensor:
    """Cross-encoder scores float32 [P] (CPU) of this rank's pairs (``txt_index[p]``, ``img_index[p]``), in
    batches of ``batch_size`` tokens (text + regions). Every rank runs the same number of forwards (lockstep).

    On the packed path (``fast`` models) every image's regions go to the device once (``ImageGallery``: ``dataset``
    gives ``gallery_images()`` and ``pair_text(t)``) and each batch gathers its rows there; the reference path
    takes ``dataset.pairs_batch`` (the task collate, both layouts)."""
    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    lengths = dataset.txt_lens[txt_index] + dataset.num_bbs[img_index]
    chunks = list(token_batches(lengths, batch_size))
    gallery = ImageGallery(dataset.gallery_images(), device) if getattr(module, "fast", False) else None

    def pairs_batch(texts: np.ndarray, images: np.ndarray) -> dict[str, Any]:
        if gallery is None:
            return dataset.pairs_batch(texts, images)
        return gallery.pairs_batch([dataset.pair_text(t) for t in texts.tolist()], images)

    batches = ((c, pairs_batch(txt_index[c], img_index[c])) for c in chunks)
    out = torch.empty(len(txt_index), dtype=torch.float32, device=device)  # read back once: no sync per batch
    quiet = rank_and_world()[0] != 0
    with tqdm(total=len(txt_index), desc=desc, disable=quiet, leave=False, unit="pair") as bar:
        for (chunk, batch), counts in lockstep(batches, device):
            with scoring_autocast(device):
                scores = model(to_device(batch), None, compute_loss=False)["scores"]
            if counts:
                out[torch.from_numpy(chunk).to(device)] = scores.float()
                bar.update(len(chunk))
    return out.cpu()


@torch.no_grad()
def embed_batched(
    module: Any,
    side: str,
    lengths: np.ndarray,
    batch_of: Callable[[np.ndarray], dict[str, torch.Tensor]],
    batch_size: int,
    to_device: Callable[[dict[str, Any]], dict[str, Any]],
    autocast: bool = True,
) -> torch.Tensor:
    """First-stage embeddings float32 [N, D] (L2-normalised, on the model's device) of N items, ``side`` "text"
    (``module.text_embeddings``) or "image" (``module.image_embeddings``), ``module`` an itm model (not an engine).
    ``lengths`` int64 [N]: each item's tokens (text tokens or regions), cut into consecutive batches of at most
    ``batch_size`` (``token_batches``). ``batch_of(positions int64 [B])`` gives the padded CPU batch of those items:
    text ``input_ids`` int64 [B, Lt] and ``txt_lens`` int64 [B]; image ``img_feat`` [B, Nb, 2048], ``img_pos_feat``
    [B, Nb, 7] (float, zero-padded; ``tasks.itm.images_batch``) and ``num_bbs`` int64 [B]; ``to_device`` moves it.
    ``autocast``: the forwards run under bf16 autocast on GPU (evaluation); False: in the model's dtype (float32
    for search, as its index is built). The embeddings are float32 either way (the projections' output, cast)."""
    if side not in ("text", "image"):
        raise ValueError(f"side must be 'text' or 'image', got {side!r}")
    device = next(module.parameters()).device
    out = torch.empty(len(lengths), module.first_stage_dim, device=device)
    with scoring_autocast(device) if autocast else contextlib.nullcontext():
        for chunk in token_batches(lengths, batch_size):
            b = to_device(batch_of(chunk))
            if side == "text":
                emb = module.text_embeddings(b["input_ids"], b["txt_lens"])
            else:
                emb = module.image_embeddings(b["img_feat"], b["img_pos_feat"], b["num_bbs"])
            out[torch.from_numpy(chunk).to(device)] = emb.float()
    return out


@torch.no_grad()
def first_stage_embeddings(
    model: Any, dataset: Any, batch_size: int, to_device: Callable[[dict[str, Any]], dict[str, Any]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(text embeddings [T, D], image embeddings [I, D]) float32, L2-normalised, on every rank (each rank embeds
    a shard, then they are summed over ranks)."""
    module = getattr(model, "module", model)
    if not getattr(module, "first_stage_dim", 0):
        raise CheckpointError(
            "fast evaluation needs the first stage (txt_proj / img_proj), which this model lacks (an original "
            "checkpoint?); fine-tune with first_stage_dim > 0 or use --eval-mode exact"
        )
    if module.first_stage_untrained:
        raise CheckpointError(
            "fast evaluation needs a trained first stage, but this model's txt_proj / img_proj were initialised "
            "freshly from a pretrained checkpoint (it has none) and never trained, so its candidates would be "
            f"random: train one (finetune.py --task itm --checkpoint <it>, first_stage_dim {module.first_stage_dim}, "
            "first_stage_weight > 0) and evaluate its export, or use --eval-mode exact"
        )
    device = next(module.parameters()).device
    rank, world = rank_and_world()
    txt = torch.zeros(len(dataset.ids), module.first_stage_dim, device=device)
    img = torch.zeros(len(dataset.all_img_ids), module.first_stage_dim, device=device)
    mine_t = np.arange(len(dataset.ids))[rank::world]
    mine_i = np.arange(len(dataset.all_img_ids))[rank::world]
    txt[torch.from_numpy(mine_t).to(device)] = embed_batched(
        module, "text", dataset.txt_lens[mine_t], lambda c: dataset.texts_batch(mine_t[c]), batch_size, to_device
    )
    img[torch.from_numpy(mine_i).to(device)] = embed_batched(
        module, "image", dataset.num_bbs[mine_i], lambda c: dataset.images_batch(mine_i[c]), batch_size, to_device
    )
    if is_distributed():
        dist.all_reduce(txt)
        dist.all_reduce(img)
    return txt.float(), img.float()


def candidate_pairs(similarity: torch.Tensor, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Union of each row's ``top_k`` columns and each column's min(top_k, rows) rows of ``similarity`` [T, I], as
    (row index, column index) int64 arrays sorted row-major."""
    num_txt, num_img = similarity.shape
    if not 1 <= top_k <= num_img:
        raise ValueError(f"top_k must lie in [1, {num_img}] (the image gallery's size), got {top_k}")
    by_text = similarity.topk(top_k, dim=1).indices  # [T, k]
    by_image = similarity.topk(min(top_k, num_txt), dim=0).indices  # [k', I]
    flat = torch.cat(
        [
            (torch.arange(num_txt, device=similarity.device)[:, None] * num_img + by_text).flatten(),
            (by_image * num_img + torch.arange(num_img, device=similarity.device)[None, :]).flatten(),
        ]
    )
    flat = torch.unique(flat).cpu().numpy()
    return flat // num_img, flat % num_img


def trained_first_stage(model: Any) -> bool:
    """Whether ``model`` (or the module of its engine) has a trained first stage that can be called directly: not
    under ZeRO-3, whose partitioned weights only the engine's forward gathers."""
    module = getattr(model, "module", model)
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    if partitioned is not None and partitioned():
        return False
    return bool(getattr(module, "first_stage_dim", 0)) and not module.first_stage_untrained


@dataclasses.dataclass
class RetrievalResult:
    """A split's score matrix [T, I] (float32, CPU), its ids, the metrics and the cost, and the evaluation that made
    them: ``mode`` ("exact" or "fast") and, for fast, ``top_k``."""

    score_matrix: torch.Tensor
    txt_ids: list[str]
    img_ids: list[str]
    metrics: dict[str, float]
    mode: str
    top_k: Optional[int] = None

    def mode_name(self) -> str:
        """``exact``, or ``fast_k<top_k>``: the part of the result files' names that tells the evaluations apart."""
        return self.mode if self.top_k is None else f"{self.mode}_k{self.top_k}"

    def save(self, stem: str, meta: Optional[dict[str, Any]] = None) -> list[str]:
        """``{stem}_{mode_name}.pt`` (``score_matrix``, ``txt_ids``, ``img_ids``) and ``{stem}_{mode_name}.json``
        (``metrics``), each with what made it: ``meta`` (task, split, checkpoint; see ``Task.write_predictions``),
        ``mode`` and ``top_k`` (None for exact). Returns the paths."""
        made_by = {**(meta or {}), "mode": self.mode, "top_k": self.top_k}
        stem = f"{stem}_{self.mode_name()}"
        record = {**made_by, "score_matrix": self.score_matrix, "txt_ids": self.txt_ids, "img_ids": self.img_ids}
        atomic_write(f"{stem}.pt", lambda tmp: torch.save(record, tmp))
        write_json_atomic(f"{stem}.json", {**made_by, "metrics": self.metrics}, indent=2)
        return [f"{stem}.pt", f"{stem}.json"]


@torch.no_grad()
def evaluate_retrieval(
    model: Any,
    dataset: Any,
    batch_size: int,
    mode: str = "exact",
    top_k: int = 16,
    to_device: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b,
    desc: str = "itm",
) -> RetrievalResult:
    """Score ``dataset`` (an ``ItmEvalDataset``) in ``mode`` "exact" or "fast" and compute the recall table, plus
    ``cross_pairs`` (pairs through the cross-encoder), ``pairs`` (#texts x #images) and ``seconds``; identical on
    every rank. ``model`` is the retrieval model or its DeepSpeed engine (put in eval mode and back)."""
    if mode not in ("exact", "fast"):
        raise ValueError(f"mode must be 'exact' or 'fast', got {mode!r}")
    with eval_mode(model) as module:
        start = time.perf_counter()
        device = next(module.parameters()).device
        rank, world = rank_and_world()
        num_txt, num_img = len(dataset.ids), len(dataset.all_img_ids)
        extra: dict[str, float] = {}
        similarity: Optional[torch.Tensor] = None
        first_stage: Optional[torch.Tensor] = None
        if mode == "exact":
            flat = np.arange(num_txt * num_img, dtype=np.int64)
            txt_index, img_index = flat // num_img, flat % num_img
            if trained_first_stage(model):  # for the first stage's recall of the exact top 10
                txt_emb, img_emb = first_stage_embeddings(model, dataset, batch_size, to_device)
                first_stage = (txt_emb @ img_emb.t()).cpu()
        else:
            txt_emb, img_emb = first_stage_embeddings(model, dataset, batch_size, to_device)
            similarity = (txt_emb @ img_emb.t()).cpu()
            txt_index, img_index = candidate_pairs(similarity, top_k)
            gt = ground_truth(dataset.ids, dataset.all_img_ids, dataset.txt2img)
            is_candidate = torch.zeros(num_txt, num_img, dtype=torch.bool)
            is_candidate[torch.from_numpy(txt_index), torch.from_numpy(img_index)] = True
            by_text = torch.zeros_like(is_candidate)
            by_text.scatter_(1, similarity.topk(top_k, dim=1).indices, True)
            by_image = torch.zeros_like(is_candidate)
            by_image.scatter_(0, similarity.topk(min(top_k, num_txt), dim=0).indices, True)
            gt_mask = torch.zeros_like(is_candidate)
            gt_mask[torch.arange(num_txt), torch.from_numpy(gt)] = True
            extra[f"first_stage_img_r{top_k}"] = float((by_text & gt_mask).any(1).float().mean())
            extra[f"first_stage_txt_r{top_k}"] = float((by_image & gt_mask).any(0).float().mean())
        # contiguous shards of the (row-major) pairs, so each rank's batches hold few distinct texts
        bounds = np.linspace(0, len(txt_index), world + 1).astype(np.int64)
        mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
        scores = score_pairs(model, dataset, txt_index[mine], img_index[mine], batch_size, to_device, f"{desc} {mode}")
        matrix = torch.full((num_txt, num_img), float("-inf"), device=device)
        matrix[torch.from_numpy(txt_index[mine]).to(device), torch.from_numpy(img_index[mine]).to(device)] = scores.to(
            device
        )
        if is_distributed():
            dist.all_reduce(matrix, op=dist.ReduceOp.MAX)
        matrix = matrix.cpu()
        if similarity is not None:  # non-candidates below every candidate, in first-stage order
            floor = float(matrix[torch.isfinite(matrix)].min()) - 3.0
            matrix = torch.where(torch.isfinite(matrix), matrix, floor + similarity)
        elif first_stage is not None:
            extra.update(first_stage_recall_of_exact(matrix, first_stage))
        metrics = itm_recall(matrix, dataset.ids, dataset.all_img_ids, dataset.txt2img)
        metrics.update(extra)
        metrics.update(cross_pairs=float(len(txt_index)), pairs=float(num_txt * num_img))
        metrics["seconds"] = time.perf_counter() - start
    if math.isnan(metrics["r_mean"]):
        raise FloatingPointError("the recall table has NaN entries")
    k = top_k if mode == "fast" else None
    return RetrievalResult(matrix, list(dataset.ids), list(dataset.all_img_ids), metrics, mode, k)
