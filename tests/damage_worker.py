"""A reader process for the damage tests (``tests/damage_helpers.ReaderProcess``): a database read past the end of a
truncated file is a signal, so the tests read damaged databases here, where a signal kills this process, not pytest.

One JSON request a line on stdin, ``{"txt": txt_db path, "img": img_db image dir}``; one JSON answer a line on
stdout: ``{"result": every record, as read_all gives it}`` or ``{"error": type name, "user_error": bool, "message"}``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import warnings
from typing import Any

import numpy as np

from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb, lmdb_env
from uniter_fast.errors import UserError

IMG_FIELDS = ("features", "norm_bb", "soft_labels")


def _array(a: np.ndarray) -> list:
    return [str(a.dtype), list(a.shape), hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()]


def read_all(txt: str, img: str) -> dict[str, Any]:
    """Every text (input_ids, img_fname) and every image (dtype, shape and digest of each array, both by ``views``
    and by ``get_dump``) of the two databases, through the public readers."""
    t, i = TxtTokLmdb(txt, -1), DetectFeatLmdb(img)
    texts = {}
    for id_ in t.id2len:
        record = t[id_]
        texts[id_] = [record["input_ids"], record["img_fname"]]
    images = {}
    for name in i.name2nbb:
        read = {"views": i.views(name, IMG_FIELDS), "dump": i.get_dump(name)}
        images[name] = {how: {k: _array(v) for k, v in arrays.items()} for how, arrays in read.items()}
    return {"token_ids": [t.cls_, t.sep, t.mask, list(t.v_range)], "texts": texts, "images": images}


def main() -> None:
    """Answer requests until stdin closes."""
    warnings.simplefilter("ignore")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer: dict[str, Any] = {"result": read_all(request["txt"], request["img"])}
        except Exception as exc:  # reported to the test, which decides whether this kind of error is allowed
            answer = {"error": type(exc).__name__, "user_error": isinstance(exc, UserError), "message": str(exc)}
        for path in list(lmdb_env._OPEN):  # each request reads its databases afresh
            lmdb_env.close_reader(path)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
