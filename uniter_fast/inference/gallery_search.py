"""Search a gallery of photos with a text, LightningDOT-style: the retrieval model's first stage (``txt_proj`` /
``img_proj``, :meth:`UniterForImageTextRetrieval.text_embeddings` / ``image_embeddings``) shortlists images by dot
product, and its cross-encoder (``rank_output``, batched by ``uniter_fast.tasks.itm_eval.score_pairs`` as exact
evaluation) re-ranks the shortlist. ``index_gallery`` fills a :class:`~uniter_fast.inference.gallery.GalleryIndex`
(regions through the extractor and the img_db writer, as ``Pipeline`` and ``python -m uniter_fast.build``);
``search`` answers a text. ``python -m uniter_fast.search`` is the command line; docs/own-images.md."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from uniter_fast.checkpoint import read_checkpoint
from uniter_fast.data.collate import collate_rows
from uniter_fast.data.img_db import NPZ_FIELDS, image_tensors, stored_image
from uniter_fast.data.loader import move_to_device
from uniter_fast.data.memory_db import memory_txt_writer
from uniter_fast.data.task_records import caption_record
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import TxtTokLmdb
from uniter_fast.errors import CheckpointError, ConfigError
from uniter_fast.extract.extractor import Extractor
from uniter_fast.extract.images import list_images
from uniter_fast.inference.gallery import GalleryIndex, file_digest
from uniter_fast.inference.inputs import to_bgr
from uniter_fast.inference.pipeline import BOX_SETTINGS, load_query_model
from uniter_fast.tasks import get_task
from uniter_fast.tasks.data import row
from uniter_fast.tasks.itm import UniterForImageTextRetrieval, images_batch
from uniter_fast.tasks.itm_eval import embed_batched, score_pairs
from uniter_fast.tasks.spec import QUERY_VOCAB_NAME

HOW_TO_TRAIN = (
    "fine-tune one with its first stage: python uniter_fast/finetune.py --task itm (first_stage_dim > 0, "
    "first_stage_weight > 0; docs/retrieval.md) and give its export"
)
TOKENS_PER_BATCH = 8192
"""Default token budget (text + regions) of a forward, as retrieval evaluation batches pairs."""


def load_retrieval_model(
    checkpoint: str, vocab: Optional[str] = None, device: str = "cpu", fast: bool = True
) -> tuple[UniterForImageTextRetrieval, WordPiece]:
    """(the fine-tuned itm model of ``checkpoint`` on ``device``, in eval mode; its WordPiece): a CheckpointError
    saying how to get one when the checkpoint has no trained first stage (an original or ``first_stage_dim`` 0
    model, a pretrained checkpoint: its ``txt_proj`` / ``img_proj`` would be fresh, ``first_stage_untrained``)."""
    if not os.path.exists(checkpoint):
        raise FileNotFoundError(f"--checkpoint: expected an itm export or a model_step_N.pt, got {checkpoint!r}")
    ckpt = read_checkpoint(checkpoint)
    if "txt_proj.weight" not in ckpt.state or "rank_output.weight" not in ckpt.state:
        raise CheckpointError(
            f"--checkpoint: expected an itm model with a trained first stage (txt_proj / img_proj and rank_output), "
            f"got {checkpoint!r}, which has no first stage; {HOW_TO_TRAIN}"
        )
    task = get_task("itm")
    model, _, toker = load_query_model(task, ckpt, vocab, task.options_from_state(ckpt.state), fast)
    return model.to(device).eval(), toker


def query_text(toker: WordPiece, text: str) -> torch.Tensor:
    """int64 [L]: [CLS] ``text`` [SEP] as a caption record through the in-memory txt_db (as ``Pipeline('itm')``)."""
    id_, ids, image, fields = caption_record({"id": "0", "image": "gallery", "caption": text}, toker, "--text")
    writer, store = memory_txt_writer(toker.meta(QUERY_VOCAB_NAME), [("--text", id_, ids, image, fields)])
    txt_db = TxtTokLmdb.from_writer(writer, store)
    return txt_db.combine_inputs(txt_db[id_]["input_ids"])


@torch.no_grad()
def embed_text(model: UniterForImageTextRetrieval, text_ids: torch.Tensor) -> torch.Tensor:
    """float32 [D] (CPU, L2-normalised): the first-stage embedding of one text ``text_ids`` int64 [L]."""
    device = next(model.parameters()).device
    lens = torch.tensor([len(text_ids)], device=device)
    return model.text_embeddings(text_ids[None].to(device), lens)[0].float().cpu()


@torch.no_grad()
def embed_images(
    model: UniterForImageTextRetrieval,
    images: Sequence[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = TOKENS_PER_BATCH,
) -> torch.Tensor:
    """float32 [k, D] (CPU, L2-normalised): the first-stage embeddings of ``images`` [(img_feat [n, 2048],
    img_pos_feat [n, 7])], padded and batched as fast evaluation (``itm_eval.embed_batched``), ``batch_size``
    regions a forward, in the model's dtype (float32; no bf16 autocast, unlike evaluation on GPU)."""
    device = next(model.parameters()).device
    num_bbs = np.array([f.size(0) for f, _ in images], dtype=np.int64)
    batch_of = lambda chunk: images_batch([images[i] for i in chunk.tolist()])  # noqa: E731
    to_device = lambda b: move_to_device(b, device)  # noqa: E731
    return embed_batched(model, "image", num_bbs, batch_of, batch_size, to_device, autocast=False).cpu()


class GalleryPairs:
    """One text against gallery images, in the form ``itm_eval.score_pairs`` batches (``txt_lens`` [1],
    ``num_bbs`` [I], ``pairs_batch``: joint rows through the task collate; ``pair_text`` / ``gallery_images`` for
    the packed path's device-resident gallery; as ``ItmEvalDataset``)."""

    def __init__(self, text_ids: torch.Tensor, images: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.text_ids, self.images = text_ids, list(images)
        self.txt_lens = np.array([len(text_ids)], dtype=np.int64)
        self.num_bbs = np.array([f.size(0) for f, _ in self.images], dtype=np.int64)

    def pairs_batch(self, txt_index: np.ndarray, img_index: np.ndarray) -> dict[str, Any]:
        """Joint batch of the text with the images ``img_index`` (``txt_index``: all 0), both layouts."""
        return collate_rows([row(self.text_ids, *self.images[i]) for i in img_index.tolist()], "itm")

    def pair_text(self, txt_index: int) -> torch.Tensor:
        """The text's ids int64 [t] (every pair's)."""
        return self.text_ids

    def gallery_images(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The images (img_feat [n, 2048], img_pos_feat [n, 7])."""
        return self.images


def cross_scores(
    model: UniterForImageTextRetrieval,
    text_ids: torch.Tensor,
    images: Sequence[tuple[torch.Tensor, torch.Tensor]],
    batch_size: int = TOKENS_PER_BATCH,
) -> torch.Tensor:
    """float32 [I] (CPU): the cross-encoder logits of the text ``text_ids`` with each of ``images``."""
    device = next(model.parameters()).device
    pairs = GalleryPairs(text_ids, images)
    index = np.arange(len(pairs.images), dtype=np.int64)
    to_device = lambda b: move_to_device(b, device)  # noqa: E731
    return score_pairs(model, pairs, np.zeros_like(index), index, batch_size, to_device, "re-rank")


@dataclasses.dataclass
class SearchResult:
    """The ``hits`` of one text (best first: {"rank", "path", "score" (sigmoid of the logit), "logit",
    "first_stage_score", "first_stage_rank"}), the ``shortlist`` indices (index order positions, first-stage order)
    the cross-encoder scored, and the ``seconds`` of each step (first_stage, read, cross_encoder)."""

    hits: list[dict[str, Any]]
    shortlist: list[int]
    seconds: dict[str, float]


def shortlist_size(gallery: int, top_k: int, shortlist: Optional[int], share: float = 0.05) -> int:
    """How many images the cross-encoder re-ranks: ``shortlist``, by default ``share`` of the ``gallery``
    (rounded up), at least ``top_k``; never more than the gallery."""
    size = shortlist if shortlist is not None else max(top_k, int(np.ceil(share * gallery)))
    return min(max(size, top_k), gallery)


@torch.no_grad()
def search(
    model: UniterForImageTextRetrieval,
    toker: WordPiece,
    index: GalleryIndex,
    text: str,
    top_k: int = 5,
    shortlist: Optional[int] = None,
    exact: bool = False,
    batch_size: int = TOKENS_PER_BATCH,
) -> SearchResult:
    """The ``top_k`` images of ``index`` for ``text``: the first stage's ``shortlist`` (default 5% of the gallery,
    at least ``top_k``) re-ranked by the cross-encoder; ``exact``: every image through the cross-encoder."""
    images = index.images
    if not images:
        raise ConfigError(f"--index: the index {index.path!r} holds no image yet (run search index to fill it)")
    clock = time.perf_counter()
    text_ids = query_text(toker, text)
    first = index.embeddings() @ embed_text(model, text_ids)  # [N]
    order = torch.argsort(first, descending=True, stable=True)
    first_rank = torch.empty_like(order)
    first_rank[order] = torch.arange(len(order))
    count = len(images) if exact else shortlist_size(len(images), top_k, shortlist)
    chosen = order[:count].tolist()
    seconds = {"first_stage": time.perf_counter() - clock}
    clock = time.perf_counter()
    regions = [image_tensors(r) for r in index.regions(chosen)]
    seconds["read"] = time.perf_counter() - clock
    clock = time.perf_counter()
    logits = cross_scores(model, text_ids, regions, batch_size)
    seconds["cross_encoder"] = time.perf_counter() - clock
    best = torch.argsort(logits, descending=True, stable=True)[:top_k].tolist()
    hits = []
    for rank, k in enumerate(best, 1):
        i = chosen[k]
        hits.append(
            {
                "rank": rank,
                "path": index.image_path(images[i]),
                "score": float(torch.sigmoid(logits[k])),
                "logit": float(logits[k]),
                "first_stage_score": float(first[i]),
                "first_stage_rank": int(first_rank[i]) + 1,
            }
        )
    return SearchResult(hits, chosen, seconds)


def made_with(
    checkpoint: str, detector: str, extractor: Extractor, first_stage_dim: int, vocab: Optional[str]
) -> dict[str, Any]:
    """What an index records it was made with (``GalleryIndex`` manifest ``made_with``); ``vocab``: the vocab file
    the texts are tokenised with (its digest recorded), None when unknown."""
    return {
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_sha256": file_digest(checkpoint),
        "detector": os.path.abspath(detector),
        "detector_sha256": file_digest(detector),
        "detector_config": json.loads(json.dumps(dataclasses.asdict(extractor.config))),  # as the manifest holds it
        "box_settings": list(BOX_SETTINGS),
        "first_stage_dim": first_stage_dim,
        "vocab": os.path.abspath(vocab) if vocab else None,
        "vocab_sha256": file_digest(vocab) if vocab else None,
    }


@torch.no_grad()
def index_gallery(
    index: GalleryIndex,
    model: UniterForImageTextRetrieval,
    extractor: Extractor,
    shard_size: int = 64,
    batch_size: int = 8,
    progress: bool = True,
) -> int:
    """Add every image of the index's ``images_dir`` that it does not hold yet (``list_images`` order): per image
    the extractor's regions as the img_db writer stores them (``BOX_SETTINGS``) and its first-stage embedding, a
    shard every ``shard_size`` images (``batch_size`` images a detector call). Returns how many were added."""
    folder = index.manifest["images_dir"]
    done = set(index.images)
    paths = [p for p in list_images(folder) if os.path.relpath(p, folder) not in done]
    with tqdm(total=len(done) + len(paths), initial=len(done), desc="index", unit="image", disable=not progress) as bar:
        for start in range(0, len(paths), shard_size):
            names, regions = [], []
            shard = paths[start : start + shard_size]
            for first in range(0, len(shard), batch_size):
                chunk = shard[first : first + batch_size]
                records = extractor.extract([to_bgr(p) for p in chunk])
                for path, record in zip(chunk, records):
                    name = os.path.relpath(path, folder)
                    stored = stored_image(name, *(record[k] for k in NPZ_FIELDS), BOX_SETTINGS)  # the build's rows
                    regions.append({k: stored[k] for k in ("features", "norm_bb")})
                    names.append(name)
                    bar.update(1)
            embeddings = embed_images(model, [image_tensors(r) for r in regions])
            index.add_shard(names, regions, embeddings.numpy())
    return len(paths)
