"""Bad data met by a pretraining run: a corrupted LMDB record stops the run with an error naming the db and the key."""

from __future__ import annotations

import os
import re

import lmdb
import pytest

from uniter_fast.data import DataError, build_corpus
from uniter_fast.data.img_db import db_name
from uniter_fast.pretraining.config import parse_training_config
from uniter_fast.pretraining.data import DataBuilder


@pytest.fixture
def corpus(tmp_path):
    return build_corpus(str(tmp_path / "c"), seed=5, n_train_images=12, n_val_images=2)


def _stream(corpus, task: str):
    raw = {
        "output_dir": "unused",
        "train_datasets": [
            {"name": "c", "db": [corpus.txt_db], "img": [corpus.img_db], "tasks": [task], "mix_ratio": [1]}
        ],
        "val_datasets": [{"name": "c", "db": [corpus.txt_db_val], "img": [corpus.img_db], "tasks": [task]}],
        "train_batch_size": 512,
    }
    return iter(DataBuilder(parse_training_config(raw), rank=0, world=1, num_workers=0).train_stream(1))


def _corrupt(db_dir: str, key: str) -> None:
    env = lmdb.open(db_dir, map_size=1 << 30)
    with env.begin(write=True) as txn:
        assert txn.get(key.encode()) is not None
        txn.put(key.encode(), b"\x00 not a record")
    env.close()


@pytest.mark.parametrize("which", ["txt_db", "img_db"])
def test_corrupted_record_is_an_error_naming_db_and_key(corpus, which) -> None:
    from uniter_fast.data import lmdb_env

    if which == "txt_db":
        db, lmdb_dir, key = corpus.txt_db, corpus.txt_db, "train_000003_1"
    else:
        db, key = corpus.img_db, "synth_train_000005.npz"
        lmdb_dir = os.path.join(db, db_name(0.2, 100, 10, 36, False))
    _corrupt(lmdb_dir, key)
    lmdb_env.close_reader(lmdb_dir)
    stream = _stream(corpus, "mlm")
    with pytest.raises(DataError, match=f"{which} {re.escape(repr(db))}.*{re.escape(repr(key))}.*corrupted"):
        for _ in range(50):  # one epoch is a few batches: the corrupted record is met in the first
            next(stream)
