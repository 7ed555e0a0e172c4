"""VQA v2 (https://visualqa.org/download.html): ``v2_OpenEnded_mscoco_<subtype>_questions.json`` (``{"data_subtype",
"questions": [{"question_id", "image_id", "question"}]}``) and ``v2_mscoco_<subtype>_annotations.json``
(``{"data_subtype", "annotations": [{"question_id", "image_id", "multiple_choice_answer", "answers": [{"answer",
"answer_confidence", "answer_id"}], ...}]}``; the test subtypes have questions only) -> VQA annotations.

The answer vocabulary (when ``--ans2label`` is not given): the normalised ``multiple_choice_answer`` of at least
``--min_answer_count`` questions (9) over every annotations file given, in ``data_subtype`` order (train2014 before
val2014, as bottom-up-attention-vqa concatenates them), labelled in order of first occurrence
(``uniter_fast.data.vqa_answers``; over train2014 + val2014 the original's 3,129 answers). The soft targets: each
annotator answer normalised the same way, counted, scored 0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ annotators
(``task_records.vqa_soft_scores``), answers outside the vocabulary dropped. Image keys: the ``--image_key`` pattern
over the COCO fields of ``common.coco_image`` (``subset``: the subtype's COCO image folder, test-dev2015's images
being test2015's; ``id``: ``image_id``; ``stem``), by default ``coco_<subset>_<id, 12 digits>.npz``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from uniter_fast.data.task_db import Imported
from uniter_fast.data.task_records import field
from uniter_fast.data.vqa_answers import answer_vocabulary, normalize_answer
from uniter_fast.errors import ConfigError, DataError
from uniter_fast.importers import Importer
from uniter_fast.importers.common import COCO_KEY, coco_image, image_key, load_json

IMAGE_FOLDERS = {"test-dev2015": "test2015"}  # other subtypes name their own COCO folder

logger = logging.getLogger(__name__)

Files = dict[str, tuple[str, list]]  # data_subtype -> (path, its questions or annotations)


def _read_files(paths: list[str]) -> tuple[Files, Files]:
    """(questions files, annotations files) by data_subtype; each file told by its content."""
    found: dict[str, Files] = {"questions": {}, "annotations": {}}
    for path in paths:
        data = load_json(path, "VQA v2 file")
        kind = next((k for k in found if isinstance(data, dict) and isinstance(data.get(k), list)), None)
        if kind is None:
            raise DataError(
                f"{path}: not a VQA v2 questions or annotations file (expected a 'questions' or 'annotations' list)"
            )
        subtype = field(data, "data_subtype", str, path)
        if subtype in found[kind]:
            raise DataError(f"{path}: a second {kind} file of {subtype!r} (the first: {found[kind][subtype][0]})")
        found[kind][subtype] = (path, data[kind])
    return found["questions"], found["annotations"]


def _vocabulary(annotations: Files, min_count: int) -> dict[str, int]:
    """The answer vocabulary of the annotations files (module docstring)."""
    if not annotations:
        raise ConfigError(
            "--from vqa2: no annotations file to build the answer vocabulary from; give --ans2label (the training "
            "db's txt/ans2label.json) to build databases of questions alone"
        )
    pairs = []
    for subtype in sorted(annotations):
        path, rows = annotations[subtype]
        for i, raw in enumerate(rows):
            where = f"{path} annotations[{i}]"
            pairs.append((field(raw, "question_id", int, where), field(raw, "multiple_choice_answer", str, where)))
    table = answer_vocabulary(pairs, min_count)
    if not table:
        raise DataError(
            f"--min_answer_count {min_count}: no answer is the answer of that many questions in "
            f"{', '.join(annotations[s][0] for s in sorted(annotations))}"
        )
    return table


def _answers(raw: dict[str, Any], where: str) -> list[str]:
    """The normalised answers of an annotation's annotators."""
    answers = field(raw, "answers", list, where)
    return [normalize_answer(field(a, "answer", str, f"{where} answers[{j}]")) for j, a in enumerate(answers)]


def _records(
    subtype: str, questions: tuple[str, list], annotations: Optional[tuple[str, list]], pattern: str
) -> list[tuple[str, dict]]:
    """The VQA annotations of one subtype's questions (with the annotators' answers when ``annotations``, the
    subtype's (path, annotations), is given)."""
    path, rows = questions
    by_id: dict[int, tuple[str, dict]] = {}
    if annotations is not None:
        for i, raw in enumerate(annotations[1]):
            where = f"{annotations[0]} annotations[{i}]"
            qid = field(raw, "question_id", int, where)
            if qid in by_id:
                raise DataError(f"{where}: question_id {qid} is annotated twice (first: {by_id[qid][0]})")
            by_id[qid] = (where, raw)
    folder = IMAGE_FOLDERS.get(subtype, subtype)
    out = []
    for i, raw in enumerate(rows):
        where = f"{path} questions[{i}]"
        qid = field(raw, "question_id", int, where)
        image_id = field(raw, "image_id", int, where)
        record = {
            "question_id": qid,
            "image": image_key(pattern, coco_image(image_id, folder), where),
            "question": field(raw, "question", str, where),
            "answers": {},
        }
        if annotations is not None:
            if qid not in by_id:
                raise DataError(f"{where}: question_id {qid} has no annotation in {annotations[0]}")
            ann_where, ann = by_id.pop(qid)
            if field(ann, "image_id", int, ann_where) != image_id:
                raise DataError(f"{ann_where}: image_id {ann['image_id']} differs from the question's ({image_id})")
            record["answers"] = _answers(ann, ann_where)
        out.append((f"{where} (question_id {qid})", record))
    if by_id:
        ann_where, ann = next(iter(by_id.values()))
        raise DataError(f"{ann_where}: question_id {ann['question_id']} is not among the questions of {path}")
    return out


def read(paths: list[str], options: dict[str, Any]) -> Imported:
    """VQA annotations ``{"question_id", "image", "question", "answers"}`` of the questions of ``--split`` (default:
    of every questions file), and the answer vocabulary as the ``ans2label`` build option unless one is given."""
    questions, annotations = _read_files(paths)
    split = options.get("split")
    if split is not None and split not in questions:
        raise ConfigError(
            f"--split {split!r}: expected the data_subtype of a questions file given, one of {sorted(questions)}"
        )
    if not questions:
        raise DataError(f"--annotations {' '.join(paths)}: no questions file (v2_OpenEnded_mscoco_*_questions.json)")
    records = []
    for subtype in [split] if split else sorted(questions):
        if subtype not in annotations and not subtype.startswith("test"):
            raise DataError(
                f"{questions[subtype][0]}: questions of {subtype!r} without their annotations file "
                f"(v2_mscoco_{subtype}_annotations.json) among --annotations"
            )
        records += _records(subtype, questions[subtype], annotations.get(subtype), options["image_key"])
    fixed = {} if options.get("ans2label") else {"ans2label": _vocabulary(annotations, options["min_answer_count"])}
    if fixed and not any(s.startswith("train") for s in annotations):
        logger.warning(
            "vqa2: answer vocabulary built from %s alone; a val / test db should take the training db's map "
            "(--ans2label <train db>/txt/ans2label.json)",
            ", ".join(sorted(annotations)),
        )
    return Imported(" ".join(paths), records, fixed)


IMPORTER = Importer(
    name="vqa2",
    task="vqa",
    description="VQA v2 questions + annotations JSON (official answer normalisation, the original's vocabulary rule)",
    files="v2_OpenEnded_mscoco_<subtype>_questions.json [v2_mscoco_<subtype>_annotations.json ...]",
    options={
        "split": (str, None, "data_subtype whose questions become the db (e.g. train2014; default: every one given)"),
        "min_answer_count": (
            int,
            9,
            "answer vocabulary: answers of at least this many questions (ignored with --ans2label)",
        ),
        "image_key": (
            str,
            COCO_KEY,
            "img_db key pattern; fields id (image_id), subset (the COCO image folder: train2014 / val2014 / "
            "test2015), stem (COCO_<subset>_<id, 12 digits>, the image file's name)",
        ),
    },
    read=read,
)
