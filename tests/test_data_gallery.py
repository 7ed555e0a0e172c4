"""The device-resident gallery: its packed pair batches equal the task collate's packed layout tensor for tensor,
the packed encoder scores them bit for bit as the collate's batches, and retrieval scoring uses it on the packed
path only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from itm_helpers import small_itm_db
from tasks_helpers import perturb, tiny_config

from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.data.assemble import Examples, assemble
from uniter_fast.data.gallery import ImageGallery
from uniter_fast.tasks import get_task
from uniter_fast.tasks.data import collate_rows, row
from uniter_fast.tasks.itm import ItmEvalDataset
from uniter_fast.tasks.itm_eval import score_pairs, token_batches


def random_images(gen: torch.Generator, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``count`` images of 1-12 regions: random features [n, 2048] and boxes [n, 7], float32."""
    sizes = torch.randint(1, 13, (count,), generator=gen).tolist()
    return [(torch.randn(n, 2048, generator=gen), torch.rand(n, 7, generator=gen)) for n in sizes]


def random_texts(gen: torch.Generator, count: int) -> list[torch.Tensor]:
    """``count`` texts of 3-20 ids (int64)."""
    return [torch.randint(5, 1000, (int(n),), generator=gen) for n in torch.randint(3, 21, (count,), generator=gen)]


def test_gallery_batches_equal_the_collates_packed_layout() -> None:
    gen = torch.Generator().manual_seed(0)
    images, texts = random_images(gen, 9), random_texts(gen, 23)
    gallery = ImageGallery(images, torch.device("cpu"))
    img_index = torch.randint(0, 9, (23,), generator=gen).numpy()  # repeats and gaps, as candidate lists have
    batch = gallery.pairs_batch(texts, img_index)
    want = collate_rows([row(t, *images[i]) for t, i in zip(texts, img_index.tolist())], "itm")
    assert set(batch) == {"packed", "txt_lens", "num_bbs", "task"} and batch["task"] == "itm"
    assert set(batch["packed"]) == set(want["packed"])
    for key, value in want["packed"].items():
        got = batch["packed"][key]
        assert torch.equal(got, value) if torch.is_tensor(value) else got == value, key
    assert torch.equal(batch["txt_lens"], want["txt_lens"]) and torch.equal(batch["num_bbs"], want["num_bbs"])


def test_the_packed_encoder_scores_gallery_batches_as_the_collates() -> None:
    task = get_task("itm")
    torch.manual_seed(1)
    model = perturb(task.build_model(tiny_config(vocab_size=1100), task.check_options({}, "test"), True)).eval()
    gen = torch.Generator().manual_seed(2)
    images, texts = random_images(gen, 6), random_texts(gen, 14)
    img_index = torch.randint(0, 6, (14,), generator=gen).numpy()
    batch = ImageGallery(images, torch.device("cpu")).pairs_batch(texts, img_index)
    want = collate_rows([row(t, *images[i]) for t, i in zip(texts, img_index.tolist())], "itm")
    with torch.no_grad():
        got, expected = model(batch, compute_loss=False)["scores"], model(want, compute_loss=False)["scores"]
    assert torch.equal(got, expected)


class RecordingDataset(ItmEvalDataset):
    """An ``ItmEvalDataset`` that counts the batches built by the task collate."""

    collated = 0

    def pairs_batch(self, txt_index: np.ndarray, img_index: np.ndarray):
        RecordingDataset.collated += 1
        return super().pairs_batch(txt_index, img_index)


@pytest.mark.parametrize("fast", [True, False])
def test_score_pairs_gathers_from_the_gallery_on_the_packed_path_only(tmp_path, fast: bool) -> None:
    """The packed path scores every pair from gallery batches, bit for bit the scores of the collate's batches of
    the same pairs; the reference path (padded encoder) keeps the task collate."""
    txt, img = small_itm_db(str(tmp_path / "txt"), 5, "test")
    dataset = RecordingDataset(TxtTokLmdb(txt, -1), DetectFeatLmdb(img))
    task = get_task("itm")
    torch.manual_seed(3)
    model = perturb(task.build_model(tiny_config(vocab_size=1100), task.check_options({}, "test"), fast)).eval()
    pairs = len(dataset.ids) * len(dataset.all_img_ids)
    txt_index, img_index = np.arange(pairs) // len(dataset.all_img_ids), np.arange(pairs) % len(dataset.all_img_ids)
    RecordingDataset.collated = 0
    scores = score_pairs(model, dataset, txt_index, img_index, 300, lambda b: b)
    chunks = list(token_batches(dataset.txt_lens[txt_index] + dataset.num_bbs[img_index], 300))
    assert len(chunks) > 3 and RecordingDataset.collated == (0 if fast else len(chunks))
    with torch.no_grad():
        for chunk in chunks:
            want = model(dataset.pairs_batch(txt_index[chunk], img_index[chunk]), compute_loss=False)["scores"]
            assert torch.equal(scores[chunk], want)


def test_bad_input_is_refused() -> None:
    gen = torch.Generator().manual_seed(4)
    images, texts = random_images(gen, 3), random_texts(gen, 2)
    with pytest.raises(ValueError, match="at least one image"):
        ImageGallery([], torch.device("cpu"))
    with pytest.raises(ValueError, match="2 texts for 3 images"):
        ImageGallery(images, torch.device("cpu")).pairs_batch(texts, np.array([0, 1, 2]))
    examples = Examples(
        txt_lens=np.array([5]), input_ids=np.arange(5), num_bbs=np.array([2]), features=None, boxes=None
    )  # fmt: skip
    with pytest.raises(ValueError, match="packed layout alone"):
        assemble(examples, ("packed", "padded"))
    with pytest.raises(ValueError, match="both given or both None"):
        assemble(examples._replace(boxes=torch.rand(2, 7)), ("packed",))
    packed = assemble(examples, ("packed",))["packed"]
    assert "img_feat" not in packed and "img_pos_feat" not in packed and packed["img_index"].tolist() == [5, 6]
