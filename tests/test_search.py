"""Gallery search (``python -m uniter_fast.search``) on the photos bundled with matplotlib and scikit-image, with a
small random detector and a tiny itm export whose first stage exists: the cross-encoder scores equal
``Pipeline('itm')``'s, the shortlist is the brute-force top of the first stage, ``--exact`` scores every image,
an interrupted index is completed as a one-shot one, and a checkpoint without a first stage or another checkpoint /
detector than the index's is refused."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from tests.cli_helpers import run_cli
from tests.extract_helpers import TINY, TINY_CLI, photo_paths, tiny_weights
from tests.tasks_helpers import export_task_model
from uniter_fast import Pipeline, UniterConfig
from uniter_fast.data.img_db import image_tensors
from uniter_fast.data.memory_db import memory_img_db
from uniter_fast.data.tokenizer import build_vocab
from uniter_fast.extract import Extractor
from uniter_fast.inference.gallery import GalleryIndex
from uniter_fast.inference.gallery_search import index_gallery, load_retrieval_model, made_with, search
from uniter_fast.inference.inputs import image_key, to_bgr
from uniter_fast.inference.pipeline import BOX_SETTINGS
from uniter_fast.search import main
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.spec import Query

TEXTS = ["A woman in a uniform .", "a cat on the table", "a red cup", "a rocket in the sky"]


def export_itm(root: Any, name: str, size: int, seed: int, first_stage_dim: int = 16, tower: bool = False) -> str:
    """A tiny itm export (random weights, ``first_stage_dim`` first stage, on its own tower with ``tower``) under
    ``root``."""
    config = UniterConfig.tiny(vocab_size=size)
    options = {"first_stage_dim": first_stage_dim, "first_stage_tower": tower}
    return export_task_model("itm", options, config, str(root / name), seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Any]:
    """A gallery folder of five photos, a detector, a vocabulary, an itm export and its index (made by the CLI)."""
    root = tmp_path_factory.mktemp("search")
    gallery = root / "gallery"
    (gallery / "more").mkdir(parents=True)
    photos = photo_paths()
    with Image.open(photos[0]) as im:  # crops of matplotlib's photo make up five (a sub-folder too)
        for i, box in enumerate([(0, 0, 300, 300), (100, 100, 400, 500), (200, 0, 512, 400), (50, 200, 450, 600)]):
            im.crop(box).save(gallery / ("more" if i % 2 else ".") / f"crop{i}.png")
    shutil.copy(photos[-1], gallery / os.path.basename(photos[-1]))
    weights = str(root / "tiny-milvlg.pth")
    torch.save(tiny_weights("milvlg"), weights)
    vocab = str(root / "vocab.txt")
    size = build_vocab(TEXTS, vocab)
    export = export_itm(root, "itm", size, 0, tower=True)  # embeddings from the tower, scores from the encoder
    index = str(root / "index")
    status, out, err = run_cli(main, ["index", "--images", str(gallery), "--checkpoint", export, "--detector", weights,
                                "--vocab", vocab, "--out", index, "--shard-size", "2", "--no-progress",
                                *TINY_CLI])  # fmt: skip
    assert status == 0, err
    assert json.loads(out) == {"index": index, "images": 5, "added": 5}
    extractor = Extractor(weights, config=TINY)
    return dict(root=root, gallery=str(gallery), weights=weights, vocab=vocab, size=size, export=export, index=index,
                extractor=extractor)  # fmt: skip


def query(world: dict, *argv: str) -> list[dict[str, Any]]:
    status, out, err = run_cli(main, ["query", "--index", world["index"], *argv])
    assert status == 0, err
    return json.loads(out)


def test_index_holds_every_image_with_the_build_regions_and_embeddings(world) -> None:
    """The index's regions are what the img_db writer stores for the extractor's output, its embeddings the
    first stage of each image alone (no padding); paths relative to the folder, in list_images order."""
    index = GalleryIndex.open(world["index"])
    top = sorted(["crop0.png", "crop2.png", os.path.basename(photo_paths()[-1])])
    assert index.images == [*top, "more/crop1.png", "more/crop3.png"]
    assert len(index.manifest["shards"]) == 3  # shards of 2 images
    model, _ = load_retrieval_model(world["export"], world["vocab"])
    assert hasattr(model, "first_stage_uniter")  # the export's tower, not its cross-encoder, embeds the gallery
    regions = index.regions(range(5))
    paths = [index.image_path(image) for image in index.images]
    records = [r for s in range(0, 5, 2) for r in world["extractor"].extract([to_bgr(p) for p in paths[s : s + 2]])]
    for i, record in enumerate(records):  # the detector batches of the index (a shard's images)
        stored = memory_img_db({"x": record}, BOX_SETTINGS).views("x", ("features", "norm_bb"))
        assert (
            all(np.array_equal(regions[i][k], stored[k]) for k in stored) and regions[i]["features"].dtype == np.float16
        )
        feat, pos = image_tensors(regions[i])
        with torch.no_grad():
            alone = model.image_embeddings(feat[None], pos[None], torch.tensor([len(feat)]))[0]
        torch.testing.assert_close(index.embeddings()[i], alone, atol=1e-5, rtol=1e-5)


def test_query_scores_equal_the_pipeline_and_the_shortlist_is_the_first_stage_top(world) -> None:
    index = GalleryIndex.open(world["index"])
    pipe = Pipeline.from_pretrained("itm", world["export"], world["extractor"], world["vocab"], batch_size=2)
    paths = [index.image_path(image) for image in index.images]  # in detector batches of 2, as the index's shards
    model, toker = load_retrieval_model(world["export"], world["vocab"])
    for text in TEXTS[:2]:
        exact = query(world, "--text", text, "--top-k", "5", "--exact")
        assert sorted(h["path"] for h in exact) == sorted(index.image_path(p) for p in index.images)
        assert [h["logit"] for h in exact] == sorted((h["logit"] for h in exact), reverse=True)
        expected_all = dict(zip(paths, pipe(paths, [text] * len(paths))))
        for hit in exact:  # the cross-encoder score of the database route
            expected = expected_all[hit["path"]]
            assert abs(hit["logit"] - expected["logit"]) <= 1e-5 and abs(hit["score"] - expected["score"]) <= 1e-5
        # the first stage: the text embedding of the ITM evaluation dataset, brute force over the gallery
        features = {image_key(0): world["extractor"].extract([to_bgr(paths[0])])[0]}
        dataset = get_task("itm").query_dataset([Query("0", [image_key(0)], text)], toker, features, BOX_SETTINGS, {})
        batch = dataset.texts_batch(np.arange(1))
        with torch.no_grad():
            text_emb = model.text_embeddings(batch["input_ids"], batch["txt_lens"])[0]
        first = index.embeddings() @ text_emb
        for hit in exact:
            i = index.images.index(os.path.relpath(hit["path"], world["gallery"]))
            assert abs(hit["first_stage_score"] - float(first[i])) <= 1e-5
            assert hit["first_stage_rank"] == 1 + int((first > first[i]).sum())
        brute = sorted(range(5), key=lambda i: -float(first[i]))[:2]
        result = search(model, toker, index, text, top_k=1, shortlist=2)
        assert result.shortlist == brute and len(result.hits) == 1
        by_path = {h["path"]: h["logit"] for h in exact}
        best = max(brute, key=lambda i: by_path[index.image_path(index.images[i])])
        assert result.hits[0]["path"] == index.image_path(index.images[best])
        assert abs(result.hits[0]["logit"] - by_path[result.hits[0]["path"]]) <= 1e-5
    short = query(world, "--text", TEXTS[0], "--top-k", "2")  # default shortlist: 5% of 5 images, at least top-k
    assert len(short) == 2 and all(h["first_stage_rank"] <= 2 for h in short)


def test_an_interrupted_index_is_completed_as_a_one_shot_one(world, tmp_path, monkeypatch) -> None:
    model, _ = load_retrieval_model(world["export"], world["vocab"])
    extractor = world["extractor"]
    identity = made_with(world["export"], world["weights"], extractor, model.first_stage_dim, world["vocab"])
    calls: list[int] = []
    real = extractor.extract

    def dies_on_the_second_shard(images: list) -> list:
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second shard was being made
        return real(images)

    out = str(tmp_path / "index")
    monkeypatch.setattr(extractor, "extract", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        index_gallery(GalleryIndex.create_or_resume(out, world["gallery"], identity), model, extractor, 2, 2, False)
    assert GalleryIndex.open(out).images == GalleryIndex.open(world["index"]).images[:2]  # the first shard only
    (tmp_path / "index" / "shard-00001.safetensors").write_bytes(b"a shard its manifest never listed")
    (tmp_path / "index" / ".tmp-0123-shard-00001.safetensors").write_bytes(b"half a shard")
    monkeypatch.setattr(extractor, "extract", lambda images: calls.append(len(images)) or real(images))
    calls.clear()
    resumed = GalleryIndex.create_or_resume(out, world["gallery"], identity)
    assert not (tmp_path / "index" / ".tmp-0123-shard-00001.safetensors").exists()
    assert index_gallery(resumed, model, extractor, 2, 2, False) == 3 and sum(calls) == 3  # the done ones skipped
    reference = GalleryIndex.open(world["index"])
    done = GalleryIndex.open(out)
    assert done.images == reference.images
    torch.testing.assert_close(done.embeddings(), reference.embeddings(), atol=1e-6, rtol=1e-6)
    for a, b in zip(done.regions(range(5)), reference.regions(range(5))):
        assert all(np.array_equal(a[k], b[k]) for k in ("features", "norm_bb"))
    calls.clear()
    assert index_gallery(GalleryIndex.create_or_resume(out, world["gallery"], identity), model, extractor) == 0
    assert calls == []


def test_a_checkpoint_without_a_first_stage_is_refused(world, tmp_path) -> None:
    no_stage = export_itm(tmp_path, "no-first-stage", world["size"], 0, first_stage_dim=0)
    model, _ = load_task_model(get_task("itm"), None, {}, UniterConfig.tiny(vocab_size=world["size"]))
    model.uniter.save_pretrained(str(tmp_path / "pretrained"))  # an encoder only, as a pretraining export
    for checkpoint in (no_stage, str(tmp_path / "pretrained")):
        status, out, err = run_cli(main, ["index", "--images", world["gallery"], "--checkpoint", checkpoint,
                                    "--detector", world["weights"], "--vocab", world["vocab"],
                                    "--out", str(tmp_path / "i")])  # fmt: skip
        assert status == 2 and out == "" and err.count("\n") == 1, err
        assert "--checkpoint: expected an itm model with a trained first stage" in err and checkpoint in err
        assert "finetune.py --task itm (first_stage_dim > 0" in err
    assert not (tmp_path / "i").exists()


def test_another_checkpoint_or_detector_than_the_index_is_refused(world, tmp_path) -> None:
    other = export_itm(tmp_path, "other", world["size"], 1)
    status, out, err = run_cli(main, ["query", "--index", world["index"], "--text", "a cat", "--checkpoint", other])
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"--checkpoint: the index {world['index']!r} was made with checkpoint {world['export']!r}" in err
    assert f"got {other!r}" in err
    detector = str(tmp_path / "other.pth")
    torch.save(tiny_weights("milvlg", seed=1), detector)
    argv = ["index", "--images", world["gallery"], "--checkpoint", world["export"], "--detector", detector,
            "--vocab", world["vocab"], "--out", world["index"], *TINY_CLI]  # fmt: skip
    status, _, err = run_cli(main, argv)
    assert status == 2 and f"--detector: the index {world['index']!r} was made with detector" in err
    assert world["weights"] in err and detector in err
    status, _, err = run_cli(main, ["query", "--index", world["index"], "--text", "a cat", "--detector", detector])
    assert status == 2 and "--detector: the index" in err
    for argv, message in [
        (["query", "--index", str(tmp_path / "none"), "--text", "x"], "index manifest (--index)"),
        (["query", "--index", world["index"], "--text", "x", "--top-k", "0"], "--top-k: expected an integer >= 1"),
        (["index", "--images", str(tmp_path / "none"), "--checkpoint", world["export"], "--detector", detector,
          "--out", str(tmp_path / "x")], "--images: expected a folder of images"),
    ]:  # fmt: skip
        status, out, err = run_cli(main, argv)
        assert status == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_another_vocab_an_empty_gallery_and_a_damaged_shard_are_refused(world, tmp_path) -> None:
    """The index records its vocab's digest: a query tokenising with another vocab is refused, as another checkpoint
    is; a folder without images makes no index; a missing or truncated shard is named, not a traceback."""
    other = tmp_path / "other-vocab.txt"
    other.write_text(open(world["vocab"], encoding="utf-8").read() + "extra\n", encoding="utf-8")
    status, out, err = run_cli(main, ["query", "--index", world["index"], "--text", "a cat", "--vocab", str(other)])
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"--vocab: the index {world['index']!r} was made with vocab {os.path.abspath(world['vocab'])!r}" in err
    (tmp_path / "empty").mkdir()
    argv = ["index", "--images", str(tmp_path / "empty"), "--checkpoint", world["export"], "--detector",
            world["weights"], "--out", str(tmp_path / "e.index")]  # fmt: skip
    status, _, err = run_cli(main, argv)
    assert status == 2 and "--images: expected a folder of images, found none" in err
    assert not (tmp_path / "e.index").exists()
    copy = tmp_path / "copy.index"
    shutil.copytree(world["index"], copy)
    shard = copy / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:20])
    status, out, err = run_cli(main, ["query", "--index", str(copy), "--text", "a cat", "--exact"])
    assert status == 2 and out == "" and err.count("\n") == 1, err
    assert f"--index: the shard {str(shard)!r} is damaged" in err
    shard.unlink()
    status, _, err = run_cli(main, ["query", "--index", str(copy), "--text", "a cat", "--exact"])
    assert status == 2 and "lists the shard 'shard-00000.safetensors', which is missing" in err
