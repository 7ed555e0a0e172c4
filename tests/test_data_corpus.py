"""The bundled synthetic corpus: determinism, detector-like contents, captions tied to the image, the cache, and
(slow) learnability of MLM, MRC-kl and ITM by a tiny model."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb, build_corpus, corpus
from uniter_fast.data.world import COLORS, World


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return build_corpus(str(tmp_path_factory.mktemp("a") / "c"), seed=21, n_train_images=25, n_val_images=5)


def _records(paths):
    txt, img = TxtTokLmdb(paths.txt_db, -1), DetectFeatLmdb(paths.img_db)
    return txt, img


def test_deterministic(small, tmp_path):
    again = build_corpus(str(tmp_path / "same"), seed=21, n_train_images=25, n_val_images=5)
    other = build_corpus(str(tmp_path / "other"), seed=22, n_train_images=25, n_val_images=5)
    (t1, i1), (t2, i2), (t3, i3) = _records(small), _records(again), _records(other)
    assert open(small.vocab).read() == open(again.vocab).read()
    assert t1.id2len == t2.id2len and i1.name2nbb == i2.name2nbb
    for id_ in t1.id2len:
        assert t1[id_] == t2[id_]
    for name in i1.name2nbb:
        d1, d2 = i1.get_dump(name), i2.get_dump(name)
        assert all(np.array_equal(d1[k], d2[k]) for k in d1)
    name = next(iter(i1.name2nbb))
    assert not np.array_equal(i1.get_dump(name)["features"][:1], i3.get_dump(name)["features"][:1])
    assert [t1[i]["sent"] for i in t1.id2len] != [t3[i]["sent"] for i in t3.id2len]


def test_contents_are_detector_like(small):
    txt, img = _records(small)
    assert len(txt.id2len) == 50 and len(TxtTokLmdb(small.txt_db_val, -1).id2len) == 10
    assert len(img.name2nbb) == 30
    world = World(21)
    label_of = {v: k for k, v in world.label.items()}
    vocab = open(small.vocab, encoding="utf-8").read().split("\n")
    assert small.vocab_size == len(vocab) - 1 and vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for id_ in txt.id2len:
        rec = txt[id_]
        dump = img.get_dump(rec["img_fname"])
        feat, bb, soft = dump["features"], dump["norm_bb"], dump["soft_labels"]
        assert 10 <= feat.shape[0] <= 36 and feat.shape[1] == 2048 and (feat >= 0).all()
        assert (bb >= 0).all() and (bb <= 1).all()
        np.testing.assert_allclose(bb[:, 4], bb[:, 2] - bb[:, 0], atol=2e-3)
        np.testing.assert_allclose(soft.sum(1), 1.0, atol=2e-2)
        # objects named by the caption are the top class of some box of the image
        present = {label_of.get(int(a)) for a in soft[:, 1:].argmax(1) + 1}
        words = rec["sent"].split()
        named = [w for w in words if w in world.objects]
        assert named and set(named) <= present
        assert any(c in words for c in COLORS)
        pieces = " ".join(vocab[i] for i in rec["input_ids"]).replace(" ##", "")
        assert pieces == rec["sent"]  # wordpieces join back to the caption, nothing is [UNK]


def test_default_corpus_cache_and_race(tmp_path, monkeypatch):
    calls = []

    def small_build(out_dir):
        calls.append(out_dir)
        return build_corpus(out_dir, seed=3, n_train_images=8, n_val_images=2)

    monkeypatch.setattr(corpus, "build_corpus", small_build)
    monkeypatch.setenv("UNITER_FAST_CACHE", str(tmp_path / "cache"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(corpus.default_corpus())) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    assert results[0].root == str(tmp_path / "cache" / corpus.CORPUS_VERSION)
    assert os.listdir(tmp_path / "cache") == [corpus.CORPUS_VERSION]  # no temp dirs left behind
    n_calls = len(calls)
    assert corpus.default_corpus() == results[0] and len(calls) == n_calls  # cached: no rebuild
    assert len(TxtTokLmdb(results[0].txt_db).id2len) == 16
