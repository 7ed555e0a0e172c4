"""The bundled task sets' vocabulary: the pretraining corpus's WordPiece vocab with the task words appended.

Every corpus token keeps its id (so a model pretrained on the corpus reads the task texts with the embeddings it
learned), and the words of questions, hypotheses and expressions that the captions never use get new ids after
them (still below the tiny model's ``vocab_size`` of 1000).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from tokenizers.pre_tokenizers import BertPreTokenizer

from uniter_fast.files import write_text_atomic


def extend_vocab(base_vocab: str, texts: Iterable[str], out_path: str) -> int:
    """Write ``base_vocab``'s tokens, then every new whole word of ``texts`` (most frequent first; plurals of known
    words excepted) and any new character with its ``##`` continuation, to ``out_path``; returns the vocabulary
    size."""
    with open(base_vocab, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f if line.rstrip("\n")]
    known = set(tokens)
    pre = BertPreTokenizer()
    counts: Counter[str] = Counter(w for text in texts for w, _ in pre.pre_tokenize_str(text))
    # a plural of a known word stays "stem ##s", as in the corpus vocab (build_vocab's rule)
    new = [w for w in counts if w not in known and not (w.endswith("s") and w[:-1] in known and "##s" in known)]
    words = sorted(new, key=lambda w: (-counts[w], w))
    chars = sorted({c for w in counts for c in w} - known)
    tokens += words + [c for c in chars if c not in words] + [f"##{c}" for c in chars if f"##{c}" not in known]
    write_text_atomic(out_path, "".join(token + "\n" for token in tokens))
    return len(tokens)


def texts_of(annotations: list[dict]) -> list[str]:
    """Every text field (strings, and the words of VCR token lists) of builder-format annotations."""
    out: list[str] = []

    def walk(value: object) -> None:
        if isinstance(value, str):
            out.append(value)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    for raw in annotations:
        for key in ("question", "hypothesis", "sentence", "answer_choices", "rationale_choices"):
            if key in raw:
                walk(raw[key])
        for ref_sentence in raw.get("sentences", []):
            out.append(ref_sentence["sent"])
    return out
