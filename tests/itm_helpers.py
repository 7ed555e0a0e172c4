"""Small itm databases for the retrieval tests: the first images of a bundled itm split, copied into a new txt_db."""

from __future__ import annotations

from uniter_fast.data import TxtTokLmdb
from uniter_fast.data.txt_db import TxtDbWriter
from uniter_fast.tasks.bundled import resolve_bundled


def small_itm_db(out: str, images: int, split: str = "train") -> tuple[str, str]:
    """(txt_db, img_db) paths: the captions of the first ``images`` images of bundled ``itm/txt_<split>``."""
    source = TxtTokLmdb(resolve_bundled(f"bundled:itm/txt_{split}"), -1)
    chosen = list(source.img2txts)[:images]
    with TxtDbWriter(out, source.meta) as writer:
        for image in chosen:
            for id_ in source.img2txts[image]:
                writer.add(id_, source[id_]["input_ids"], image)
    return out, resolve_bundled("bundled:pool/img_det")
