"""``Task``: everything ``finetune.py``, ``evaluate.py`` and ``python -m uniter_fast.build`` need to know about one
downstream task, the contract between a task module and the floors above it.

A task module (``vqa.py``, ``nlvr2.py``, ...) defines its model (original head names), datasets and collates, and a
``Task`` subclass that ties them to the recipes: how to build and prepare the model, which training streams to mix
and which datasets to evaluate on, what one evaluation batch adds to the metric, how predictions are written (in the
original's output format), and how its databases are built from annotations. ``uniter_fast.tasks.TASKS`` maps names
to instances (``register`` adds one from outside the package); adding a task is one new module, one entry and its
config, and no code outside ``tasks/`` tests a task's name (``docs/adding-a-task.md``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Optional, Union

import numpy as np
import torch

from uniter_fast.config import UniterConfig
from uniter_fast.data.task_db import GT_BOX_SETTINGS, Imported, read_jsonl, write_img_db
from uniter_fast.data.task_records import field, image_key
from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.data.txt_db import read_meta
from uniter_fast.errors import CheckpointError, ConfigError, DataError
from uniter_fast.files import atomic_directory
from uniter_fast.model.base import UniterPreTrainedModel
from uniter_fast.tasks.data import ConcatTaskDatasets, DbCache, TaskDataset, eval_batches
from uniter_fast.tasks.evaluation import evaluate
from uniter_fast.tasks.synthetic.text import texts_of

DATA_FACTS = "data_facts"
"""The key under which :meth:`Task.data_options` returns the :class:`DataFacts` of the databases; ``load_task_model``
takes it out of the options (it is never saved with them)."""
WORD_TABLE = "uniter.embeddings.word_embeddings.weight"
TYPE_TABLE = "uniter.embeddings.token_type_embeddings.weight"


@dataclasses.dataclass
class DataFacts:
    """What a task's databases fix that a checkpoint must fit, with the files that say it (for the messages).

    ``vocab_size``: the word ids the text dbs may hold (the largest ``meta.json`` ``v_range`` end; 0: none read) and
    ``vocab_file`` that ``meta.json``; ``files``: {option: the file it was read from} of the options that
    :meth:`Task.data_options` read off the databases (e.g. ``ans2label_table`` -> ``<txt_db>/ans2label.json``)."""

    vocab_size: int = 0
    vocab_file: str = ""
    files: dict[str, str] = dataclasses.field(default_factory=dict)


def data_file(data: Optional[DataFacts], option: str) -> str:
    """The file that option ``option`` was read from according to ``data``, or a phrase naming the option when none
    was recorded (the caller gave the option itself)."""
    return data.files.get(option, f"the {option!r} option") if data is not None else f"the {option!r} option"


@dataclasses.dataclass
class CheckpointView:
    """A checkpoint as :meth:`Task.check_data` sees it: its ``path``, ``state`` (original names), whether the task's
    head keys are in it (``finetuned``), and its ``task.json`` (``task_file``, None when it has none: an original
    ``train_<task>.py`` checkpoint or a pretrained one) with the options saved there (``saved_options``)."""

    path: str
    state: dict[str, torch.Tensor]
    finetuned: bool
    task_file: Optional[str] = None
    saved_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def rows(self, key: str) -> Optional[int]:
        """The first dimension of ``state[key]`` (e.g. :data:`WORD_TABLE`: the word table's rows); None if absent."""
        value = self.state.get(key)
        return int(value.shape[0]) if value is not None else None

    @property
    def options_file(self) -> str:
        """Where the checkpoint's options are read from, for messages: its task.json, else the checkpoint."""
        return self.task_file or self.path


QUERY_VOCAB_NAME = "query"
"""The tokenizer name in the ``meta.json`` of the in-memory txt_db of :meth:`Task.query_dataset` (read by nothing)."""


@dataclasses.dataclass
class Query:
    """One question about new images (``uniter_fast.inference``), for :meth:`Task.query_dataset`.

    ``id``: the text id; ``images``: img_db keys, :attr:`Task.query_images` of them (NLVR2: left, right); ``text``:
    the question (VQA, VCR), hypothesis (VE), statement (NLVR2), caption (ITM) or expression (RE); ``answers`` and
    ``rationales``: VCR's four choices each; ``sizes``: (height, width) in pixels of each image (RE's boxes)."""

    id: str
    images: list[str]
    text: str
    answers: list[str] = dataclasses.field(default_factory=list)
    rationales: list[str] = dataclasses.field(default_factory=list)
    sizes: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class Task:
    """Base of the task definitions; subclasses set the class attributes and implement the methods."""

    name = ""
    heads: tuple[str, ...] = ()
    """Head module names (the original's, e.g. ``vqa_output``): ``state_dict`` prefixes of the task model."""
    finetuned_heads: tuple[str, ...] = ()
    """Heads whose keys mark a fine-tuned checkpoint (default: any of :attr:`heads`; ITM: ``rank_output``, as a
    pretrained checkpoint holds ``itm_output`` too)."""
    checkpoint_options: Optional[tuple[str, ...]] = None
    """Options that an export's ``task.json`` fixes when it is loaded (None: all of them; ITM: only the first-stage
    size, so ``itm-hn`` can start from an ``itm`` export with its own negatives and evaluation settings)."""
    options: dict[str, Any] = {}
    """Task-specific config keys (the original's names) and their defaults."""
    head_lr_mul = False
    """True when the original script gives the head its own param groups with ``lr_mul`` (VQA, RE, VCR)."""
    by_examples = False
    """True when ``train_batch_size`` / ``val_batch_size`` count examples (RE) instead of tokens."""
    sums: tuple[str, ...] = ()
    """Names of the per-batch sums of :meth:`eval_batch`, reduced over ranks in this order."""
    headline = ""
    """The metric the final table leads with."""
    grows_loaded_heads = False
    """True when a checkpoint with the head keys may still have the pretrained table sizes and is grown after the
    strict load (the VCR second stage starts from pretraining exports, heads included); otherwise such a
    checkpoint must already hold the task's tables."""
    export_dir = "finetuned"
    """Where a finished run's weights go, under ``output_dir`` (the VCR second stage: ``pretrained``)."""
    build_options: dict[str, tuple[type, Any, str]] = {}
    """Options of ``python -m uniter_fast.build --task <name>`` beyond the common ones: name -> (type, default,
    help); they reach :meth:`write_txt_db` in ``options``."""
    gt_features = False
    """True when the task's databases include a GT-box img_db (``--gt_features``: RE, VCR)."""
    bundled_stream: Optional[int] = None
    """The seed stream of the task's bundled synthetic set (``uniter_fast.tasks.bundled``); None: no bundled set
    built with the others."""
    evaluates_pretrained = False
    """True when a pretrained checkpoint (no head of this task) can be evaluated as this task: its head comes from the
    pretraining heads (ITM's zero-shot scorer, VCR's second stage), not from a random init."""
    adversarial = False
    """True when the task model's forward takes ``with_logits`` (the logits of its loss, for the KL term of VILLA's
    adversarial fine-tuning, ``uniter_fast.training.adversarial``)."""

    # ------------------------------------------------------------------ options and model
    def check_options(self, options: dict[str, Any], where: str) -> dict[str, Any]:
        """``options`` completed with the defaults and checked; ``ValueError`` naming ``where`` and the key."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown} (neither fine-tuning keys nor options of task {self.name!r}, whose "
                f"options are {sorted(self.options)})"
            )
        return {**self.options, **options}

    def check_adversarial(self, options: dict[str, Any], where: str) -> None:
        """``ConfigError`` naming ``where`` unless adversarial fine-tuning applies to this task with ``options``."""
        if not self.adversarial:
            raise ConfigError(f"{where}: 'adversarial' is not available for task {self.name!r} (it has no task logits)")

    def kl_objectives(self, options: dict[str, Any]) -> list[str]:
        """The objectives a run with ``options`` trains with a KL in adversarial training, as the model's
        ``objective`` names them (what an adversarial block's ``adv_kl_weights`` may name); default the task."""
        return [self.name]

    def options_from_state(self, state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Options that a checkpoint's head keys and shapes fix (e.g. the NLVR2 variant); default none."""
        return {}

    def build_model(self, config: UniterConfig, options: dict[str, Any], fast: bool) -> UniterPreTrainedModel:
        """A freshly initialised task model."""
        raise NotImplementedError

    def prepare_model(self, model: UniterPreTrainedModel, options: dict[str, Any]) -> None:
        """Grow the embedding tables the task needs (after a pretrained checkpoint is loaded); default nothing."""

    def checkpoint_required(self, options: dict[str, Any]) -> Optional[str]:
        """Why a run with ``options`` cannot start without a checkpoint, for the error line (ITM's
        ``train_first_stage_only``: its teacher); None (the default) when it can start from a random init."""
        return None

    def complete_state(
        self, state: dict[str, torch.Tensor], options: dict[str, Any]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """A fine-tuned checkpoint's ``state`` with the keys that ``options`` add to the model and that the task
        derives from the checkpoint's other keys (ITM: a first-stage tower copied from the encoder), and {module:
        where its weights came from} for the load log. Default: ``state`` as it is."""
        return state, {}

    def init_from_pretrained(
        self, model: UniterPreTrainedModel, state: dict[str, torch.Tensor]
    ) -> Optional[dict[str, str]]:
        """Initialise the head from a pretrained checkpoint's ``state`` after the encoder is loaded (ITM: the
        pretrained ``itm_output`` and ``init_output``); returns {module: where its weights came from} for the load
        log (modules not named keep their fresh init and are logged so). Default nothing (None)."""
        return None

    def data_options(self, dbs: DbCache, txt_paths: list[str], options: dict[str, Any]) -> dict[str, Any]:
        """Options read off the task's databases ``txt_paths`` (e.g. the answer vocabulary). The base gives
        :data:`DATA_FACTS`, the :class:`DataFacts` that :meth:`check_data` checks a checkpoint against (the word
        vocabulary); overrides add theirs to ``super().data_options(...)`` and name their files in its ``files``."""
        vocab_size, vocab_file = 0, ""
        for path in txt_paths:
            end = int(read_meta(dbs.txt_dir(path))["v_range"][1])
            if end > vocab_size:
                vocab_size, vocab_file = end, os.path.join(dbs.txt_dir(path), "meta.json")
        return {DATA_FACTS: DataFacts(vocab_size, vocab_file)}

    def check_data(self, checkpoint: CheckpointView, options: dict[str, Any], data: Optional[DataFacts]) -> None:
        """``CheckpointError`` naming both files when ``checkpoint`` cannot serve the databases: ``options`` hold
        what :meth:`data_options` read off them (``data`` names the files; None when the caller read none). The base
        checks the word vocabulary: a fine-tuned checkpoint's word table (which does not grow) must cover the dbs'
        word ids. Overrides (answer maps, special tokens) call it too."""
        words = checkpoint.rows(WORD_TABLE)
        if data is None or not checkpoint.finetuned or self.grows_loaded_heads or words is None:
            return
        if words < data.vocab_size:
            raise CheckpointError(
                f"vocabulary mismatch: {checkpoint.path} has a word table of {words} rows, but the text db's "
                f"{data.vocab_file} (v_range end {data.vocab_size}) gives word ids up to {data.vocab_size - 1}; a "
                "fine-tuned model's word table does not grow: use databases built with the vocabulary it was "
                "trained with (python -m uniter_fast.build --vocab)"
            )

    # ------------------------------------------------------------------ data
    def train_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], seed: int
    ) -> TaskDataset | list[TaskDataset]:
        """The training dataset(s) of one (txt_db, img_db) pair (VCR gives a Q->A and a QA->R dataset)."""
        raise NotImplementedError

    def train_streams(
        self, dbs: DbCache, pairs: list[tuple[str, str]], options: dict[str, Any], seed: int
    ) -> dict[str, tuple[TaskDataset, int]]:
        """The training streams that the task mixer draws from, one per optimizer step: {stream name: (dataset, mix
        ratio)}. Default: one stream named after the task, the :meth:`train_dataset` of every (txt_db, img_db) pair
        concatenated (as the original's ``ConcatDatasetWithLens``)."""
        parts: list[TaskDataset] = []
        for txt_path, img_path in pairs:
            made = self.train_dataset(dbs, txt_path, img_path, options, seed)
            parts += made if isinstance(made, list) else [made]
        return {self.name: (parts[0] if len(parts) == 1 else ConcatTaskDatasets(parts), 1)}

    def eval_dataset(
        self, dbs: DbCache, txt_path: str, img_path: str, options: dict[str, Any], split: str, seed: int = 0
    ) -> Any:
        """The evaluation data of ``split`` (a name such as "val", "test"): a dataset of every example, in order, or
        whatever this task's :meth:`evaluate_split` takes; ``seed`` (the run's) seeds any draw an evaluation example
        makes (the VCR second stage's masks)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ evaluation
    def evaluate_split(
        self,
        model: Any,
        dataset: TaskDataset,
        batch_size: int,
        options: dict[str, Any],
        rank: int,
        world: int,
        to_device: Callable[[dict[str, Any]], dict[str, Any]],
        desc: str = "eval",
    ) -> tuple[dict[str, float], list[Any]]:
        """(metrics, every rank's predictions) of one split: this rank's batches through :meth:`eval_batch`, summed
        and gathered over ranks (``uniter_fast.tasks.evaluation.evaluate``). ITM overrides it (a score matrix), the
        VCR second stage too (the pretraining objectives' validation)."""
        batches = eval_batches(dataset, batch_size, rank, world, by_examples=self.by_examples)
        return evaluate(self, model, batches, options, to_device, desc=desc)

    def eval_batch(
        self, model: Any, batch: dict[str, Any], options: dict[str, Any]
    ) -> tuple[dict[str, float], list[Any]]:
        """(sums of :attr:`sums`, prediction records) of one batch; ``model`` is the task model or its engine."""
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], predictions: list[Any]) -> dict[str, float]:
        """Metrics from the summed quantities and every rank's predictions."""
        raise NotImplementedError

    def write_predictions(
        self, predictions: list[Any], directory: str, stem: str, meta: Optional[dict[str, Any]] = None
    ) -> list[str]:
        """Write ``predictions`` in the original's output format under ``directory`` as ``<stem>.*``; returns the
        files. ``meta`` says what made them (``task``, ``split``, and ``checkpoint``, or ``run`` and ``step`` for a
        validation in training); a task whose files have room for it records it (retrieval), the original's fixed
        formats do not."""
        raise NotImplementedError

    def example(
        self,
        config: UniterConfig,
        size: int,
        rng: np.random.Generator,
        txt_range: tuple[int, int] = (10, 60),
        img_range: tuple[int, int] = (10, 100),
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """(options, batch) for benchmarks: the options that :meth:`build_model` / :meth:`prepare_model` take for a
        model of ``config``, and a collated training batch of ``size`` random examples with UNITER's shapes
        (``txt_range`` tokens with [CLS]/[SEP], ``img_range`` regions; ``uniter_fast.tasks.data.random_rows``) and the
        task's targets. ``NotImplementedError`` where a task provides none (see :attr:`has_example`)."""
        raise NotImplementedError(f"task {self.name!r} provides no example batch")

    @property
    def has_example(self) -> bool:
        """Whether the task provides :meth:`example` batches."""
        return type(self).example is not Task.example

    # ------------------------------------------------------------------ databases
    @property
    def builds_dbs(self) -> bool:
        """Whether the task builds its databases from annotations (it implements :meth:`write_txt_db`)."""
        return type(self).write_txt_db is not Task.write_txt_db

    def read_annotations(self, path: str) -> Any:
        """The annotations at ``path`` in the form :meth:`write_txt_db` takes; default: a JSON-lines file as
        (where, record) pairs (``uniter_fast.data.task_db.read_jsonl``)."""
        return read_jsonl(path)

    def annotation_images(self, annotations: Any) -> tuple[dict[str, str], dict[str, str]]:
        """The features the annotations need: (detected-box ``.npz`` stem -> img_db key, GT-box stem -> key);
        default: each record's ``image`` (".npz" optional), no GT boxes."""
        keys = {image_key(field(raw, "image", str, where)) for where, raw in annotations}
        return {k: k for k in keys}, {}

    def write_txt_db(
        self,
        annotations: Any,
        toker: WordPiece,
        out: str,
        images: set[str],
        gt_rows: dict[str, int],
        meta_name: str,
        options: dict[str, Any],
    ) -> int:
        """Write the task's txt_db at ``out`` from ``annotations`` (every image key must be in ``images``, the
        detected-box img_db's keys, or ``gt_rows``, the GT-box img_db's keys -> boxes); returns the record count."""
        raise NotImplementedError

    def build_dbs(
        self,
        annotations: Union[str, Imported],
        features: str,
        out: str,
        toker: WordPiece,
        meta_name: str,
        box_settings: tuple[float, int, int, int],
        gt_features: Optional[str] = None,
        options: Optional[dict[str, Any]] = None,
    ) -> dict[str, int]:
        """``out/txt``, ``out/img`` (and ``out/img_gt``) from the annotation file ``annotations`` (or annotations
        already read, e.g. by an importer of ``uniter_fast.importers``) and the per-image ``.npz`` directories, written
        under a temporary name and renamed at the end (``out`` must not exist; nothing is left behind when the build
        fails); returns the counts. Annotations without a record are a DataError."""
        if self.gt_features and not gt_features:
            raise ValueError(f"task {self.name!r} needs --gt_features (the GT-box features)")
        if isinstance(annotations, Imported):
            options = {**(options or {}), **annotations.options}
            records, annotations = annotations.annotations, annotations.source
        else:
            records = self.read_annotations(annotations)
        det_files, gt_files = self.annotation_images(records)
        if not det_files and not gt_files:
            raise DataError(f"annotations {annotations!r}: no {self.name} record (an empty file?); nothing written")
        with atomic_directory(out) as tmp:
            rows = write_img_db(os.path.join(tmp, "img"), features, det_files, box_settings)
            gt_rows = (
                write_img_db(os.path.join(tmp, "img_gt"), gt_features, gt_files, GT_BOX_SETTINGS) if gt_features else {}
            )
            count = self.write_txt_db(
                records, toker, os.path.join(tmp, "txt"), set(rows), gt_rows, meta_name, options or {}
            )
            if count == 0:
                raise DataError(f"annotations {annotations!r}: no {self.name} text record to write; nothing written")
        return {"texts": count, "images": len(rows), "gt_images": len(gt_rows)}

    # ------------------------------------------------------------------ new images (uniter_fast.inference)
    query_images = 1
    """How many images one query is about (NLVR2: 2)."""

    @property
    def answers_queries(self) -> bool:
        """Whether the task answers queries on new images (it implements :meth:`query_dataset`)."""
        return type(self).query_dataset is not Task.query_dataset

    def query_dataset(
        self,
        queries: list[Query],
        toker: WordPiece,
        features: dict[str, dict[str, np.ndarray]],
        box_settings: tuple[float, int, int, int],
        options: dict[str, Any],
    ) -> TaskDataset:
        """The evaluation dataset of ``queries`` on new images, in memory: the records the task's database build
        writes for annotations of them (the same converters and writers, ``uniter_fast.data.memory_db``), over the
        img_db that ``features`` ({image key: the extractor's npz fields}) give with ``box_settings`` (conf_th,
        max_bb, min_bb, num_bb), read by the task's evaluation dataset. ``options``: the loaded model's."""
        raise NotImplementedError(f"task {self.name!r} does not answer queries on new images")

    def query_batch(self, dataset: TaskDataset) -> dict[str, Any]:
        """The one batch of every example of a :meth:`query_dataset` (or of the same examples read from the
        LMDB databases), in order; default: the dataset's collate."""
        return dataset.collate([dataset[i] for i in range(len(dataset))])

    def query_results(
        self, scores: torch.Tensor, batch: dict[str, Any], options: dict[str, Any], top_k: int
    ) -> list[dict[str, Any]]:
        """One JSON-ready result per example of ``batch`` from the model's ``compute_loss=False`` scores (fp32,
        CPU); ``top_k``: how many answers a result lists where there are many (VQA)."""
        raise NotImplementedError(f"task {self.name!r} does not answer queries on new images")

    # ------------------------------------------------------------------ bundled synthetic set
    def bundled_split(self, scenes: list[Any], rng: np.random.Generator, split: str) -> Optional[tuple[Any, dict]]:
        """(annotations as :meth:`read_annotations` gives them, build options) of the bundled set's ``split`` from
        the pool's ``scenes`` of that split; None when the task has no such split (default: no bundled set)."""
        return None

    def annotation_texts(self, annotations: Any) -> list[str]:
        """Every text of ``annotations`` (for the bundled sets' vocabulary); default: the text fields of JSON-lines
        records (``uniter_fast.tasks.synthetic.text.texts_of``)."""
        return texts_of([raw for _, raw in annotations])


def scores_of(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The model's ``compute_loss=False`` scores, in fp32."""
    return model(batch, None, compute_loss=False)["scores"].float()


def write_json_results(directory: str, stem: str, results: Any) -> str:
    """Write ``results`` (a JSON value) as ``<directory>/<stem>.json``, a task's results file in the original's
    format; returns its path."""
    path = os.path.join(directory, f"{stem}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return path


def ratio(num: float, den: float) -> float:
    """num / den, NaN when nothing was counted."""
    return num / den if den > 0 else float("nan")


def require(batch: dict[str, Any], keys: tuple[str, ...], task: str, where: Optional[str] = None) -> None:
    """``ValueError`` naming the missing batch keys."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch for task {task!r} lacks the keys {missing}" + (f" ({where})" if where else ""))
