"""The bundled task sets: deterministic, the corpus vocabulary kept, and labels that the text alone cannot give."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import numpy as np

from uniter_fast.data import TxtTokLmdb, default_corpus
from uniter_fast.data.corpus import DEFAULT_SEED
from uniter_fast.data.world import World
from uniter_fast.tasks.bundled import bundled_annotations, bundled_vocab, resolve_bundled, task_sets
from uniter_fast.tasks.synthetic.pool import draw_scene, relation
from uniter_fast.tasks.synthetic.re import expressions


def scenes(count: int = 40, split: str = "val") -> list:
    world = World(DEFAULT_SEED)
    return [draw_scene(world, DEFAULT_SEED, split, i)[0] for i in range(count)]


def records(scene_list: list, seed: int, task: str, split: str) -> list[dict]:
    """The bundled annotation records of ``task``'s ``split`` drawn from ``scene_list``."""
    annotations, _ = bundled_annotations(scene_list, seed)[task][split]
    return [raw for _, raw in annotations]


def test_generation_is_deterministic_and_objects_match_their_rows() -> None:
    world = World(DEFAULT_SEED)
    facts, image, rows = draw_scene(world, DEFAULT_SEED, "train", 3)
    again, image2, rows2 = draw_scene(world, DEFAULT_SEED, "train", 3)
    assert facts == again and np.array_equal(image.features, image2.features) and list(rows) == list(rows2)
    boxes = image.norm_bb[rows, :4] * np.array([facts.width, facts.height] * 2)
    assert np.allclose(boxes, [o.box for o in facts.objects], rtol=1e-3)  # GT rows are the objects' boxes
    assert [o.center[0] for o in facts.objects] == sorted(o.center[0] for o in facts.objects)
    part = scenes(12)
    first, again = bundled_annotations(part, 7), bundled_annotations(part, 7)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)


def test_vocab_extends_the_corpus_vocab() -> None:
    corpus = open(default_corpus().vocab, encoding="utf-8").read().split("\n")
    tasks = open(os.path.join(task_sets(), "vocab.txt"), encoding="utf-8").read().split("\n")
    assert tasks[: len(corpus) - 1] == corpus[:-1] and "what" in tasks and "dogs" not in tasks


def test_labels_need_the_image() -> None:
    part = scenes(150)
    nlvr2 = records(part, 11, "nlvr2", "val")
    by_sentence = defaultdict(set)
    for record in nlvr2:
        by_sentence[record["identifier"].rsplit("-", 2)[0]].add(record["label"])
    assert 0.4 < np.mean([r["label"] for r in nlvr2]) < 0.6
    assert sum(len(labels) == 2 for labels in by_sentence.values()) > 0.3 * len(by_sentence)  # same text, both labels
    ve = records(part, 11, "ve", "val")
    labels = Counter(r["label"] for r in ve)
    assert all(0.25 < labels[k] / len(ve) < 0.42 for k in ("entailment", "neutral", "contradiction"))
    clause = [r for r in ve if r["hypothesis"].split()[-2] in ("new", "old", "wet", "clean", "broken", "expensive")]
    assert Counter(r["label"] for r in clause)["contradiction"] > 0.2 * len(clause)  # the clause is not the label
    vqa = records(part, 11, "vqa", "val")
    assert (
        0.35
        < np.mean(
            [a.get("yes", 0) for a in (r["answers"] for r in vqa if "yes" in r["answers"] or "no" in r["answers"])]
        )
        < 0.65
    )


def test_expressions_fit_one_object_and_vcr_rationales_agree_with_the_image() -> None:
    part = scenes(60)
    for scene in part:
        for index in range(len(scene.objects)):
            for phrase in expressions(scene, index):
                others = [j for j in range(len(scene.objects)) if j != index and phrase in expressions(scene, j)]
                assert not others, (phrase, scene)
    for record in records(part, 5, "vcr", "val"):
        scene = next(s for s in part if s.det_name == record["image"])
        k = record["question"][-2][0]
        answer = record["answer_choices"][record["answer_label"]][-1]
        assert answer in (scene.objects[k].color, scene.objects[k].cls)
        rationale = record["rationale_choices"][record["rationale_label"]]
        j = rationale[-1][0]
        assert rationale[1] == answer and " ".join(rationale[5:-1]) == relation(scene.objects[k], scene.objects[j])


def test_bundled_dbs_have_every_split() -> None:
    root = task_sets()
    for task, splits in {"vqa": 3, "ve": 3, "nlvr2": 3, "re": 3, "vcr": 2}.items():
        found = [s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, task, f"txt_{s}"))]
        assert len(found) == splits, task
        assert len(TxtTokLmdb(os.path.join(root, task, "txt_val"), -1).id2len) >= 290


def test_bundled_vocab_is_named_only_for_databases_inside_the_bundled_sets(tmp_path) -> None:
    """A fine-tuning export carries the bundled vocab when every training txt_db lies in the bundled sets."""
    root = task_sets()
    vocab = os.path.join(root, "vocab.txt")
    assert bundled_vocab([resolve_bundled("bundled:vqa/txt_train"), resolve_bundled("bundled:ve/txt_train")]) == vocab
    own = tmp_path / "txt_own"
    own.mkdir()
    assert bundled_vocab([resolve_bundled("bundled:vqa/txt_train"), str(own)]) is None
    assert bundled_vocab([str(own)]) is None and bundled_vocab([]) is None
    assert bundled_vocab([root + "_elsewhere/txt"]) is None  # a sibling folder with the same prefix is outside
