"""``Pipeline``: a fine-tuned task model, the BUTD detector and the WordPiece vocabulary, from photos and text to
the task's answer in memory, through the code the training data goes through: ``Extractor.extract`` (the npz
fields and box selection of ``python -m uniter_fast.extract``), the img_db / txt_db writers and readers of
``python -m uniter_fast.build`` (in memory, ``uniter_fast.data.memory_db``), the task's converters, evaluation
dataset and collate (``Task.query_dataset``), and the model ``load_task_model`` loads (as ``evaluate``)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from tqdm import tqdm

from uniter_fast.checkpoint import Checkpoint, read_checkpoint
from uniter_fast.data.loader import move_to_device
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.errors import CheckpointError, ConfigError
from uniter_fast.extract.config import DetectorConfig
from uniter_fast.extract.extractor import Extractor
from uniter_fast.extract.given_boxes import check_inside
from uniter_fast.inference.inputs import image_key, make_queries, to_bgr
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks import answering_tasks, get_task
from uniter_fast.tasks.checkpoint import TASK_FILE, VOCAB_FILE, head_keys, load_task_model
from uniter_fast.tasks.spec import DATA_FACTS, DataFacts, Task, scores_of
from uniter_fast.training.config import RunConfig

BOX_SETTINGS = tuple(RunConfig.__dataclass_fields__[k].default for k in ("conf_th", "max_bb", "min_bb", "num_bb"))
"""(conf_th, max_bb, min_bb, num_bb): the img_db box settings of ``python -m uniter_fast.build`` and fine-tuning."""


def checkpoint_vocab(checkpoint: str, vocab: Optional[str]) -> str:
    """The WordPiece vocab file: ``vocab`` when given, else the checkpoint folder's ``vocab.txt``; a ConfigError
    naming both when there is neither."""
    if vocab is not None:
        if not os.path.isfile(vocab):
            raise FileNotFoundError(f"vocab (--vocab): expected a WordPiece vocab.txt file, got {vocab!r}")
        return vocab
    beside = os.path.join(checkpoint, VOCAB_FILE) if os.path.isdir(checkpoint) else ""
    if beside and os.path.isfile(beside):
        return beside
    raise ConfigError(
        f"vocab (--vocab): the checkpoint {checkpoint!r} carries no {VOCAB_FILE}; give the WordPiece vocab.txt it was "
        "trained with (bert-base-cased's vocab.txt for the released UNITER checkpoints)"
    )


def load_query_model(
    task_spec: Task,
    checkpoint: Union[str, Checkpoint],
    vocab: Optional[str],
    options: Optional[dict[str, Any]],
    fast: bool = True,
) -> tuple[UniterPreTrainedModel, dict[str, Any], WordPiece]:
    """(the fine-tuned ``task_spec`` model of ``checkpoint`` (a path, or a checkpoint already read) on the CPU, its
    options, the WordPiece of ``vocab``, default the checkpoint folder's): the checks of
    :meth:`Pipeline.from_pretrained` (a checkpoint of this task, holding the task's heads, whose word table covers
    the vocabulary)."""
    if isinstance(checkpoint, str) and not os.path.exists(checkpoint):
        raise FileNotFoundError(f"checkpoint: {checkpoint!r} does not exist")
    ckpt = read_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
    checkpoint = ckpt.path
    vocab_path = checkpoint_vocab(checkpoint, vocab)
    toker = WordPiece(vocab_path)
    given = task_spec.check_options(dict(options or {}), "options")
    words = DataFacts(len(toker.vocab), vocab_path)  # the model's word table must cover the vocabulary
    saved = ckpt.side_file(TASK_FILE) or {}
    if saved.get("task", task_spec.name) != task_spec.name:
        raise ConfigError(
            f"task: the checkpoint {checkpoint!r} is a {saved['task']!r} model, got task {task_spec.name!r}"
        )
    if not head_keys(task_spec, ckpt.state):
        heads = ", ".join(task_spec.finetuned_heads or task_spec.heads)
        raise CheckpointError(
            f"checkpoint: expected a fine-tuned {task_spec.name} model (with its {heads} weights), got "
            f"{checkpoint!r}, which has none (a pretrained checkpoint?)"
        )
    model, options = load_task_model(task_spec, ckpt, {**given, DATA_FACTS: words}, fast=fast)
    return model, options, toker


class Pipeline:
    """A task model answering questions about images: ``Pipeline.from_pretrained(task, checkpoint, detector=...,
    vocab=...)`` then ``pipe(image, text)``.

    Images are paths, PIL images or RGB uint8 arrays; ``text`` a string (one result, a dict) or a list of strings (a
    list of results; one image for all, or one per text). NLVR2 takes a (left, right) pair per text; VCR also
    ``answers`` and ``rationales`` (four strings each). ``boxes=[[x1, y1, x2, y2], ...]`` (original pixels; one list,
    or one per text) are the image's regions instead of the detector's (RE: the candidates, ``index`` and ``box`` of
    the result refer to them). What each task returns: docs/own-images.md.
    """

    def __init__(
        self,
        task: Task,
        model: UniterPreTrainedModel,
        options: dict[str, Any],
        extractor: Extractor,
        toker: WordPiece,
        device: Union[str, torch.device] = "cpu",
        box_settings: Sequence[float] = BOX_SETTINGS,
        top_k: int = 5,
        batch_size: int = 16,
    ) -> None:
        if not task.answers_queries:
            raise ConfigError(
                f"task: {task.name!r} does not answer queries on new images; expected one of {answering_tasks()}"
            )
        if top_k < 1 or batch_size < 1:
            raise ConfigError(f"top_k and batch_size must be >= 1, got top_k={top_k}, batch_size={batch_size}")
        self.task, self.options, self.extractor, self.toker = task, options, extractor, toker
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.box_settings = tuple(box_settings)
        self.top_k, self.batch_size = top_k, batch_size

    @classmethod
    def from_pretrained(
        cls,
        task: str,
        checkpoint: str,
        detector: Union[str, Extractor],
        vocab: Optional[str] = None,
        device: Union[str, torch.device] = "cpu",
        options: Optional[dict[str, Any]] = None,
        detector_config: Optional[DetectorConfig] = None,
        fast: bool = True,
        **settings: Any,
    ) -> Pipeline:
        """A pipeline of the fine-tuned ``checkpoint`` (a ``finetune.py`` export folder, or an original
        ``model_step_N.pt`` with ``options``) for ``task``; ``detector``: BUTD weights (a file of a layout
        docs/extract.md lists) or an :class:`Extractor`; ``vocab``: WordPiece vocab.txt (default: the checkpoint
        folder's); ``device``: where the model (and a detector made here) run; ``detector_config``: the detector's
        test-time settings (Caffe's by default); ``settings``: ``box_settings``, ``top_k``, ``batch_size``."""
        task_spec = get_task(task)
        model, options, toker = load_query_model(task_spec, checkpoint, vocab, options, fast)
        if isinstance(detector, Extractor):
            extractor = detector
        else:
            if not os.path.isfile(detector):
                raise FileNotFoundError(f"detector: {detector!r} is not a file (expected BUTD Faster R-CNN weights)")
            extractor = Extractor(detector, device=device, config=detector_config)
        return cls(task_spec, model, options, extractor, toker, device, **settings)

    def features(
        self, images: Sequence[Any], progress: bool = False, boxes: Optional[Sequence[Optional[np.ndarray]]] = None
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, tuple[int, int]]]:
        """({image key: the extractor's npz fields}, {image key: (height, width)}) of ``images`` (decoded by
        ``to_bgr``), ``batch_size`` at a time; an image with ``boxes[i]`` ([n, 4] pixels, not None) gets the
        features of those boxes (``Extractor.extract_boxes``, as ``python -m uniter_fast.extract --boxes``)."""
        given = list(boxes) if boxes is not None else [None] * len(images)
        records: dict[str, dict[str, np.ndarray]] = {}
        sizes: dict[str, tuple[int, int]] = {}
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc="images", unit="batch", disable=not progress):
            index = range(start, min(start + self.batch_size, len(images)))
            bgr = {i: to_bgr(images[i]) for i in index}
            detect = [i for i in index if given[i] is None]
            chosen = [i for i in index if given[i] is not None]
            for i in chosen:
                check_inside(given[i], *bgr[i].shape[:2], "boxes")
            found = self.extractor.extract([bgr[i] for i in detect]) if detect else []
            if chosen:
                found += self.extractor.extract_boxes([bgr[i] for i in chosen], [given[i] for i in chosen])
            for i, record in zip(detect + chosen, found):
                records[image_key(i)] = record
                sizes[image_key(i)] = (int(bgr[i].shape[0]), int(bgr[i].shape[1]))
        return records, sizes

    @torch.no_grad()
    def __call__(
        self,
        image: Any,
        text: Union[str, Sequence[str]],
        answers: Optional[Sequence[Any]] = None,
        rationales: Optional[Sequence[Any]] = None,
        top_k: Optional[int] = None,
        progress: bool = False,
        boxes: Optional[Any] = None,
    ) -> Union[dict[str, Any], list[dict[str, Any]]]:
        """The task's result for ``text`` about ``image`` (a dict), or one per text when ``text`` is a list;
        ``boxes``: the regions [[x1, y1, x2, y2], ...] (pixels) instead of the detected ones (see the class)."""
        batch = make_queries(self.task, image, text, answers, rationales, boxes)
        features, sizes = self.features(batch.images, progress, batch.boxes)
        for query in batch.queries:
            query.sizes = [sizes[key] for key in query.images]
        results: list[dict[str, Any]] = []
        starts = range(0, len(batch.queries), self.batch_size)
        for start in tqdm(starts, desc="queries", unit="batch", disable=not progress):
            queries = batch.queries[start : start + self.batch_size]
            needed = {key: features[key] for q in queries for key in q.images}
            dataset = self.task.query_dataset(queries, self.toker, needed, self.box_settings, self.options)
            inputs = self.task.query_batch(dataset)
            scores = scores_of(self.model, move_to_device(inputs, self.device)).cpu()
            results += self.task.query_results(scores, inputs, self.options, top_k or self.top_k)
        given_boxes = {image_key(i): b for i, b in enumerate(batch.boxes)}
        for query, result in zip(batch.queries, results):
            given = given_boxes.get(query.images[0])
            if given is not None and "box" in result:  # RE: the user's box itself, not its fp16 copy in norm_bb
                x1, y1, x2, y2 = given[result["index"]].tolist()
                result["box"] = [x1, y1, x2 - x1, y2 - y1]
        return results[0] if batch.single else results

    def alignment(self, image: Any, text: str, path: str) -> dict[str, Any]:
        """The word-region alignment of ``text`` and one ``image`` as a picture (PNG at ``path``): the IPOT plan of
        the model's encoder drawn over the photo beside the words x regions heatmap; returns {"path", "words",
        "plan", "ot_distance"} (``uniter_fast.inference.alignment.plot_wra``)."""
        from uniter_fast.inference.alignment import plot_wra  # matplotlib: only for pictures

        if not isinstance(text, str):
            raise TypeError(f"text: expected one string, got {type(text).__name__}")
        bgr = to_bgr(image)
        record = self.extractor.extract([bgr])[0]
        encoder = self.model.uniter
        return plot_wra(
            encoder, self.toker, text, np.ascontiguousarray(bgr[:, :, ::-1]), record, self.box_settings, path
        )
