"""VQA answer normalisation and the answer vocabulary, by the rules the original's VQA databases were built with.

The rules are those of bottom-up-attention-vqa's ``tools/compute_softscore.py`` (hengyuan-hu/bottom-up-attention-vqa,
reused by ban-vqa, whose answer map the original UNITER's ``utils/ans2label.json`` is): its copy of the official VQA
evaluation's ``processPunctuation`` / ``processDigitArticle`` (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``) followed by dropping commas, with these differences from the
evaluation's: the punctuation list adds ``{ } - !`` and leaves out ``:`` and ``'``, and the contractions are written
with straight apostrophes. Quirks kept: the period rule's ``(?!<=\\d)`` is a look-ahead (so every period not followed
by a digit goes), and ``re.UNICODE`` is passed where ``re.sub`` takes its count (at most 32 periods are removed).
"""

from __future__ import annotations

import functools
import re
from typing import Iterable

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
"""Contractions written without their apostrophe -> with it (applied word by word after the article removal)."""

NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_MAX_PERIODS = int(re.UNICODE)  # the original passes re.UNICODE (32) as re.sub's count


def strip_punctuation(text: str) -> str:
    """Each mark of :data:`PUNCTUATION` removed where the text has it beside a space (or has a digit-comma-digit),
    else replaced by a space; then periods not followed by a digit removed (``process_punctuation``)."""
    out = text
    glued = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        remove = glued or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if remove else " ")
    return _PERIOD.sub("", out, count=_MAX_PERIODS)


def digits_and_articles(text: str) -> str:
    """Lower-cased words, number words as digits, articles dropped, contractions restored
    (``process_digit_article``)."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


@functools.cache
def normalize_answer(answer: str) -> str:
    """An answer as the answer vocabulary and the soft targets compare it (``preprocess_answer``); cached, as answers
    repeat (VQA v2 has 10 answers to each of its 658,111 train + val questions)."""
    return digits_and_articles(strip_punctuation(answer)).replace(",", "")


def answer_vocabulary(answers: Iterable[tuple[object, str]], min_count: int) -> dict[str, int]:
    """{answer: label} of the normalised answers that are the answer of at least ``min_count`` distinct questions
    among ``answers`` ((question id, multiple-choice answer) pairs), labelled in the order each first occurs
    (``filter_answers`` + ``create_ans2label`` under Python 3's ordered dicts: the original's ``ans2label.json``
    begins with the first answers of VQA v2's train annotations)."""
    questions: dict[str, set] = {}
    for question_id, answer in answers:
        questions.setdefault(normalize_answer(answer), set()).add(question_id)
    kept = [answer for answer, ids in questions.items() if len(ids) >= min_count]
    return {answer: label for label, answer in enumerate(kept)}
