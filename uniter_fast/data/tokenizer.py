"""WordPiece tokenisation through the ``tokenizers`` package, as the original ``prepro.py`` ``bert_tokenize``.

Text is split on whitespace (and punctuation, as BERT's basic tokenizer) and each word is wordpiece-tokenized; no
lower-casing (bert-base-cased). ``meta.json`` fields (CLS/SEP/MASK/UNK ids and ``v_range``) come from the vocab.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, Iterable

from tokenizers import BertWordPieceTokenizer
from tokenizers.pre_tokenizers import BertPreTokenizer

from uniter_fast.errors import DataError
from uniter_fast.files import write_text_atomic

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class WordPiece:
    """A cased WordPiece tokenizer over the vocab file ``vocab_path`` (one token a line, id = line number)."""

    def __init__(self, vocab_path: str) -> None:
        if not os.path.exists(vocab_path):
            raise FileNotFoundError(f"vocab file {vocab_path!r} does not exist")
        self.vocab_path = vocab_path
        try:
            self._tok = BertWordPieceTokenizer(vocab_path, lowercase=False, strip_accents=False, clean_text=True)
        except Exception as exc:  # tokenizers raises a bare Exception for a binary or empty file
            raise DataError(
                f"vocab {vocab_path!r} is not a WordPiece vocab.txt (UTF-8, one token a line, with {SPECIAL_TOKENS}): "
                f"{exc}"
            ) from None
        self.vocab = self._tok.get_vocab()
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"vocab {vocab_path!r} lacks the special tokens {missing}")

    def encode(self, text: str) -> list[int]:
        """Wordpiece ids of ``text`` without [CLS]/[SEP] (empty for empty text)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """:meth:`encode` over many texts (parallel inside ``tokenizers``)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def meta(self, name: str) -> dict[str, Any]:
        """The ``meta.json`` of a txt_db built with this vocab.

        ``v_range`` = [id('!'), len(vocab)) as the original (the random-token range of MLM), or from the first id after
        the special tokens when '!' is absent.
        """
        first = self.vocab.get("!", max(self.vocab[t] for t in SPECIAL_TOKENS) + 1)
        return {
            "bert": name,
            "toker": name,
            "UNK": self.vocab["[UNK]"],
            "CLS": self.vocab["[CLS]"],
            "SEP": self.vocab["[SEP]"],
            "MASK": self.vocab["[MASK]"],
            "v_range": [first, len(self.vocab)],
        }


def build_vocab(texts: Iterable[str], out_path: str) -> int:
    """Write a deterministic cased WordPiece vocab for ``texts`` to ``out_path``; returns its size.

    Words come from the BERT pre-tokenizer of ``tokenizers``. The vocab holds the special tokens ([PAD]=0, [UNK]=1,
    [CLS]=2, [SEP]=3, [MASK]=4), '!', every character and its '##' continuation (so no word is [UNK]) and every
    whole word, except plurals whose singular is a word: those become 'stem ##s', as BERT's own vocab does.
    (``tokenizers``' WordPiece trainer breaks ties differently from run to run, so it is not used here.)
    """
    pre = BertPreTokenizer()
    counts: Counter[str] = Counter(w for text in texts for w, _ in pre.pre_tokenize_str(text))
    words = {w for w in counts if not (w.endswith("s") and w[:-1] in counts)}
    chars = sorted({c for w in counts for c in w} | {"s"})
    ordered = sorted(words - set(chars), key=lambda w: (-counts[w], w))
    vocab = [*SPECIAL_TOKENS, "!", *[c for c in chars if c != "!"], *[f"##{c}" for c in chars], *ordered]
    write_text_atomic(out_path, "".join(token + "\n" for token in vocab))
    return len(vocab)
