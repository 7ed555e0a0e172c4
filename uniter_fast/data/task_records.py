"""Task annotations -> txt_db records in the original formats (VQA, VE, NLVR2, VCR; RE is in ``re_db`` + ``build``).

Each converter takes one annotation (a dict from a JSONL line) and returns ``(id, input_ids, img_fname, fields)``
for ``TxtDbWriter.add``; a missing or malformed field is a :class:`DataError` naming ``where`` (file and line) and
the field. Annotation formats (one JSON object a line):

* vqa: ``{"question_id", "image", "question", "answers"}`` with ``answers`` either ``{answer: score}`` or the list of
  the annotators' answers (scored as the VQA soft score, min(1, 0.3 * count)).
* ve: ``{"id", "image", "hypothesis", "label"}``, label "contradiction" / "entailment" / "neutral".
* nlvr2: ``{"identifier", "images": [left, right], "sentence", "label"}``, label true / false (or "True"/"False").
* vcr: ``{"annot_id", "image", "question", "answer_choices", "rationale_choices", "answer_label",
  "rationale_label"}`` with VCR's token lists (a string per word, a list of object indices per object reference;
  object k becomes the tag id ``special_token_base + k``); labels -1 on the test split; optional ``gt_image`` when
  the GT-box db keys the image differently (default: ``image``).

``image`` names are img_db keys (".npz" added when missing).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

from uniter_fast.data.tokenizer import WordPiece
from uniter_fast.errors import DataError

VE_ENT2IDX = {"contradiction": 0, "entailment": 1, "neutral": 2}
NUM_CHOICES = 4

Record = tuple[str, list[int], Any, dict[str, Any]]


def field(raw: dict[str, Any], name: str, kind: Any, where: str) -> Any:
    """``raw[name]``, checked to be an instance of ``kind``; else DataError naming ``where`` and the field."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    if name not in raw:
        raise DataError(f"{where}: missing field {name!r}")
    value = raw[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: field {name!r} must be {names}, got {value!r}")
    return value


def image_key(name: str) -> str:
    """An img_db key: ``name`` with ".npz" appended when missing."""
    return name if name.endswith(".npz") else name + ".npz"


def encode(toker: WordPiece, text: str, name: str, where: str) -> list[int]:
    """Wordpieces of ``text``; DataError when nothing is left."""
    ids = toker.encode(text)
    if not ids:
        raise DataError(f"{where}: field {name!r} is empty after tokenisation")
    return ids


def caption_record(raw: dict[str, Any], toker: WordPiece, where: str) -> Record:
    """A caption record (pretraining and ITM txt_dbs): ``{"id", "image", "caption"}`` -> ``sent`` = the caption."""
    id_ = str(field(raw, "id", (str, int), where))
    caption = field(raw, "caption", str, where)
    return id_, encode(toker, caption, "caption", where), image_key(field(raw, "image", str, where)), {"sent": caption}


def vqa_soft_scores(answers: list[str]) -> dict[str, float]:
    """The VQA soft score of each answer given by annotators: min(1, 0.3 * count) (0.3 / 0.6 / 0.9 / 1)."""
    return {a: min(1.0, round(0.3 * n, 1)) for a, n in Counter(answers).items()}


def vqa_answer_scores(raw: dict[str, Any], where: str) -> dict[str, float]:
    """{answer: score} of a VQA annotation (explicit scores or annotator answers)."""
    answers = field(raw, "answers", (dict, list), where)
    if isinstance(answers, list):
        if not all(isinstance(a, str) for a in answers):
            raise DataError(f"{where}: field 'answers' must be a list of strings or an {{answer: score}} object")
        return vqa_soft_scores(answers)
    for answer, score in answers.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not 0.0 <= score <= 1.0:
            raise DataError(f"{where}: field 'answers' score of {answer!r} must be a number in [0, 1], got {score!r}")
    return {a: float(s) for a, s in answers.items()}


def vqa_record(raw: dict[str, Any], toker: WordPiece, ans2label: dict[str, int], where: str) -> Record:
    """A VQA record: ``target`` = {labels, scores} over ``ans2label`` (answers outside it are dropped, as the
    original's preprocessing)."""
    qid = str(field(raw, "question_id", (str, int), where))
    question = field(raw, "question", str, where)
    scores = vqa_answer_scores(raw, where)
    kept = [(ans2label[a], s) for a, s in scores.items() if a in ans2label]
    target = {"labels": [lab for lab, _ in kept], "scores": [s for _, s in kept]}
    fields = {"question_id": qid, "question": question, "answers": scores, "target": target, "sent": question}
    return qid, encode(toker, question, "question", where), image_key(field(raw, "image", str, where)), fields


def build_ans2label(records: Iterable[dict[str, Any]], where: str) -> dict[str, int]:
    """An answer vocabulary from annotations: every answer with a positive score, most frequent first."""
    counts: Counter[str] = Counter()
    for i, raw in enumerate(records):
        counts.update(a for a, s in vqa_answer_scores(raw, f"{where} record {i}").items() if s > 0)
    return {a: i for i, (a, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))}


def ve_record(raw: dict[str, Any], toker: WordPiece, where: str) -> Record:
    """A VE record: ``target`` = {labels: [class], scores: [1.0]} with the original's class ids."""
    id_ = str(field(raw, "id", (str, int), where))
    hypothesis = field(raw, "hypothesis", str, where)
    label = field(raw, "label", str, where)
    if label not in VE_ENT2IDX:
        raise DataError(f"{where}: field 'label' must be one of {sorted(VE_ENT2IDX)}, got {label!r}")
    fields = {"sent": hypothesis, "label": label, "target": {"labels": [VE_ENT2IDX[label]], "scores": [1.0]}}
    return id_, encode(toker, hypothesis, "hypothesis", where), image_key(field(raw, "image", str, where)), fields


def nlvr2_label(value: Any, where: str) -> int:
    """NLVR2 label -> 1 (true) / 0 (false)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return int(value.lower() == "true")
    if value in (0, 1):
        return int(value)
    raise DataError(f"{where}: field 'label' must be true/false, got {value!r}")


def nlvr2_record(raw: dict[str, Any], toker: WordPiece, where: str) -> Record:
    """An NLVR2 record: ``img_fname`` = [left, right], ``target`` 1 (true) / 0 (false)."""
    identifier = field(raw, "identifier", str, where)
    images = field(raw, "images", list, where)
    if len(images) != 2 or not all(isinstance(x, str) for x in images):
        raise DataError(f"{where}: field 'images' must hold exactly two image names (left, right), got {images!r}")
    sentence = field(raw, "sentence", str, where)
    if "label" not in raw:
        raise DataError(f"{where}: missing field 'label'")
    fields = {"identifier": identifier, "sentence": sentence, "target": nlvr2_label(raw["label"], where)}
    return identifier, encode(toker, sentence, "sentence", where), [image_key(x) for x in images], fields


def vcr_tokens(tokens: Any, toker: WordPiece, base: int, num_special: int, name: str, where: str) -> list[int]:
    """VCR token list -> ids: words are wordpiece-tokenised, each object index k in a reference becomes
    ``base + k``."""
    if not isinstance(tokens, list) or not tokens:
        raise DataError(f"{where}: field {name!r} must be a non-empty token list, got {tokens!r}")
    ids: list[int] = []
    for tok in tokens:
        if isinstance(tok, str):
            ids += toker.encode(tok)
        elif isinstance(tok, list) and all(isinstance(k, int) and 0 <= k < num_special for k in tok):
            ids += [base + k for k in tok]
        else:
            raise DataError(
                f"{where}: field {name!r}: token {tok!r} is neither a word nor a list of object indices "
                f"in [0, {num_special})"
            )
    if not ids:
        raise DataError(f"{where}: field {name!r} is empty after tokenisation")
    return ids


def vcr_record(raw: dict[str, Any], toker: WordPiece, base: int, num_special: int, where: str) -> Record:
    """A VCR record: question, 4 answers, 4 rationales, targets, ``img_fname`` [GT-box image, detected-box image]."""
    annot_id = str(field(raw, "annot_id", (str, int), where))
    fields: dict[str, Any] = {"annot_id": annot_id}
    question = vcr_tokens(field(raw, "question", list, where), toker, base, num_special, "question", where)
    for name, out in (("answer_choices", "input_ids_as"), ("rationale_choices", "input_ids_rs")):
        choices = field(raw, name, list, where)
        if len(choices) != NUM_CHOICES:
            raise DataError(f"{where}: field {name!r} must hold {NUM_CHOICES} choices, got {len(choices)}")
        fields[out] = [vcr_tokens(c, toker, base, num_special, name, where) for c in choices]
    for name, out in (("answer_label", "qa_target"), ("rationale_label", "qar_target")):
        label = field(raw, name, int, where)
        if not -1 <= label < NUM_CHOICES:
            raise DataError(f"{where}: field {name!r} must be in [-1, {NUM_CHOICES}), got {label}")
        fields[out] = label
    image = image_key(field(raw, "image", str, where))
    gt_image = image_key(field(raw, "gt_image", str, where)) if "gt_image" in raw else image
    return annot_id, question, [gt_image, image], fields


def vcr_lengths(question: list[int], fields: dict[str, Any]) -> tuple[int, int]:
    """(qa, qar) lengths of a VCR record for ``id2len_qa.json`` / ``id2len_qar.json``: the question plus the
    longest answer (and the longest rationale)."""
    qa = len(question) + max(len(a) for a in fields["input_ids_as"])
    return qa, qa + max(len(r) for r in fields["input_ids_rs"])
