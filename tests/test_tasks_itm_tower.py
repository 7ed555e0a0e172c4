"""ITM's first stage on its own tower (``first_stage_tower``, LightningDOT-style), and the tower distilled alone
from a frozen cross-encoder (``train_first_stage_only``): which weights each pass reads, which gradients each loss
gives, the loads that start a tower, and a short distillation that leaves the cross-encoder bit-identical while its
first stage learns to keep the cross-encoder's top ranks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from itm_helpers import small_itm_db
from tasks_helpers import compare_fast_reference, learn_subset, perturb, random_batch, tiny_config

from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.errors import ConfigError
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model, save_task_model
from uniter_fast.tasks.data import DbCache
from uniter_fast.tasks.itm import (
    TOWER_PREFIX,
    ItmEvalDataset,
    ItmRankDataset,
    UniterForImageTextRetrieval,
    add_first_stage,
    distill_loss,
    select_rows,
)
from uniter_fast.tasks.itm_eval import evaluate_retrieval

CROSS_ENCODER = ("uniter.", "itm_output.", "rank_output.")


def _model(seed: int = 0, **options) -> UniterForImageTextRetrieval:
    torch.manual_seed(seed)
    model = UniterForImageTextRetrieval(tiny_config(vocab_size=1100), first_stage_dim=16, **options)
    return perturb(model)


def _grouped_batch(groups: int, size: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    lengths = [(int(rng.integers(3, 14)), int(rng.integers(1, 10))) for _ in range(groups * size)]
    batch = random_batch(lengths, seed=seed)
    batch.update(sample_size=size, pair_rows=torch.arange(groups) * size, pair_images=torch.arange(groups))
    return add_first_stage(batch)


@pytest.fixture(scope="module")
def train_db(tmp_path_factory):
    txt, img = small_itm_db(str(tmp_path_factory.mktemp("itm") / "txt"), 12, "train")
    return TxtTokLmdb(txt, 60), DetectFeatLmdb(img)


def _embeddings(model: UniterForImageTextRetrieval, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = select_rows(batch, batch["pair_rows"])
    with torch.no_grad():
        txt = model.text_embeddings(pairs["input_ids"], pairs["txt_lens"])
        img = model.image_embeddings(pairs["img_feat"], pairs["img_pos_feat"], pairs["num_bbs"])
    return txt, img


def test_the_first_stage_reads_its_tower_and_the_cross_encoder_its_encoder() -> None:
    model = _model(first_stage_tower=True).eval()
    keys = model.state_dict()
    encoder = sorted(k[len("uniter.") :] for k in keys if k.startswith("uniter."))
    assert sorted(k[len(TOWER_PREFIX) :] for k in keys if k.startswith(TOWER_PREFIX)) == encoder
    batch = _grouped_batch(3, 3, seed=1)
    scores, (txt, img) = model(batch, compute_loss=False)["scores"], _embeddings(model, batch)
    with torch.no_grad():
        model.first_stage_uniter.embeddings.word_embeddings.weight.mul_(1.5)
        model.first_stage_uniter.img_embeddings.img_linear.weight.mul_(1.5)
    torch.testing.assert_close(model(batch, compute_loss=False)["scores"], scores, rtol=0, atol=0)
    moved = _embeddings(model, batch)
    assert not torch.allclose(moved[0], txt) and not torch.allclose(moved[1], img)
    with torch.no_grad():
        model.uniter.embeddings.word_embeddings.weight.mul_(1.5)
        model.uniter.img_embeddings.img_linear.weight.mul_(1.5)
    assert not torch.allclose(model(batch, compute_loss=False)["scores"], scores)
    for got, want in zip(_embeddings(model, batch), moved):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["contrastive", "contrastive+distill"])
def test_with_a_tower_the_cross_encoder_learns_from_the_ranking_loss_alone(train_db, loss) -> None:
    """Same weights, dropout off: the tower model's cross-encoder gradients are those of the model without a first
    stage loss (first_stage_weight 0), and the tower and the projections are what the first-stage loss trains."""
    txt_db, img_db = train_db
    data = ItmRankDataset(txt_db, img_db, negative_size=2, seed=3, cross_pairs="distill" in loss)
    batch = data.collate([data[i] for i in range(0, 30, 5)])  # one caption of each of 6 images
    grads = {}
    for weight in (1.0, 0.0):
        model = _model(first_stage_tower=True, first_stage_loss=loss, first_stage_weight=weight).eval()
        out = model(batch)
        out["loss"].backward()
        grads[weight] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        if weight:
            assert out["first_stage_loss"] > 0 and out["loss"] > out["rank_loss"]
    cross = {n: g for n, g in grads[0.0].items() if n.startswith(CROSS_ENCODER)}
    assert cross and set(cross) == {n for n in grads[1.0] if n.startswith(CROSS_ENCODER)}
    for name, grad in cross.items():
        torch.testing.assert_close(grads[1.0][name], grad, rtol=1e-6, atol=1e-9, msg=name)
    tower = [n for n in grads[1.0] if n.startswith((TOWER_PREFIX, "txt_proj.", "img_proj."))]
    assert any(n.startswith(TOWER_PREFIX) for n in tower) and all(grads[1.0][n].abs().sum() > 0 for n in tower[:3])
    assert not any(n.startswith(TOWER_PREFIX) for n in grads[0.0])


def test_fast_equals_reference_with_a_tower() -> None:
    """Both paths, the tower's passes included (on other batches fp32 rounding reaches 2e-6 of the largest gradient
    entry, as without a tower: the helper's element-wise tolerance is tight for the contrastive loss's 1 / 0.05)."""
    batch = _grouped_batch(4, 3, seed=4)

    def build(fast: bool) -> UniterForImageTextRetrieval:
        torch.manual_seed(0)
        model = UniterForImageTextRetrieval(tiny_config(), first_stage_dim=16, fast=fast, first_stage_tower=True)
        return perturb(model)

    compare_fast_reference(build, batch)


def test_train_first_stage_only_distils_the_frozen_cross_encoder(train_db) -> None:
    """The loss is the distillation of the cross-encoder's scores of every text x image of the batch's positives
    (eval mode, no gradient) into the tower's embeddings; no ranking pass; only the tower and the projections have
    gradients (the rest is frozen)."""
    txt_db, img_db = train_db
    data = ItmRankDataset(txt_db, img_db, negative_size=1, seed=5, cross_pairs=True)
    items = 6
    batch = data.collate([data[i] for i in range(0, 5 * items, 5)])
    model = _model(first_stage_tower=True, train_first_stage_only=True, first_stage_loss="distill").train()
    trainable = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"first_stage_uniter", "txt_proj", "img_proj"}
    model.eval()  # no dropout: the hand-made loss below sees the same embeddings
    out = model(batch)
    assert set(out) == {"loss", "first_stage_loss"}
    with torch.no_grad():
        teacher = model.rank_scores(model.teacher_batch(batch)).view(items, items)
    txt, img = _embeddings(model, batch)
    want = distill_loss(txt, img, teacher, model.temperature, model.distill_temperature)
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-7)
    out["loss"].backward()
    with_grad = {n.split(".", 1)[0] for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {"first_stage_uniter", "txt_proj", "img_proj"}


def test_the_frozen_steps_loader_draws_no_negatives(tmp_path) -> None:
    """With train_first_stage_only the task's training set is the positive pairs alone (groups of 1: the step reads
    the positives and the cross pairs, never the negatives), and the step's loss equals, bit for bit, the loss on
    the groups with negatives of the same texts."""
    txt, img = small_itm_db(str(tmp_path / "txt"), 12, "train")
    settings = type("S", (), dict(max_txt_len=60, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36))()
    itm = get_task("itm")
    raw = {"first_stage_dim": 16, "first_stage_tower": True, "first_stage_loss": "distill", "negative_size": 3}
    only = itm.check_options({**raw, "train_first_stage_only": True}, "test")
    data = itm.train_dataset(DbCache(settings), txt, img, only, seed=5)
    both = itm.train_dataset(DbCache(settings), txt, img, itm.check_options(raw, "test"), seed=5)
    assert data.negative_size == 0 and both.negative_size == 3
    items = list(range(0, 30, 5))
    batch, grouped = data.collate([data[i] for i in items]), both.collate([both[i] for i in items])
    assert batch["sample_size"] == 1 and batch["txt_lens"].numel() == len(items)
    assert grouped["sample_size"] == 7 and grouped["txt_lens"].numel() == 7 * len(items)
    model = _model(first_stage_tower=True, train_first_stage_only=True, first_stage_loss="distill").eval()
    assert torch.equal(model(batch)["loss"], model(grouped)["loss"])


def test_a_short_distillation_keeps_the_cross_encoder_and_teaches_the_tower(train_db) -> None:
    """12 images x 5 captions: a cross-encoder trained briefly (ranking loss, no first stage), then its tower
    distilled alone for 60 steps: the cross-encoder's weights are bit-identical, its exact recall the same, and the
    tower's recall of the cross-encoder's top 10 at k = 10 % of the gallery rises above the fresh tower's (measured:
    images 0.12 -> 0.20, the bound; texts 0.08 -> 0.33)."""
    txt_db, img_db = train_db
    task = get_task("itm")
    options = task.check_options({"negative_size": 3, "first_stage_dim": 0}, "test")
    torch.manual_seed(0)
    teacher = task.build_model(tiny_config(vocab_size=1100), options, True)
    learn_subset(teacher, ItmRankDataset(txt_db, img_db, 3, seed=0), 60, steps=40, batch=12, lr=2e-3)
    tower_options = {"first_stage_dim": 32, "first_stage_tower": True, "train_first_stage_only": True}
    student = task.build_model(
        tiny_config(vocab_size=1100), task.check_options({**tower_options, "first_stage_loss": "distill"}, "t"), True
    )
    student.load_state_dict(teacher.state_dict(), strict=False)
    student.copy_encoder_to_tower()
    frozen = {k: v.clone() for k, v in student.state_dict().items() if k.startswith(CROSS_ENCODER)}
    evaluation = ItmEvalDataset(txt_db, img_db)
    before = evaluate_retrieval(student, evaluation, 4096, "exact").metrics
    data = ItmRankDataset(txt_db, img_db, 1, seed=1, cross_pairs=True)
    losses = learn_subset(student, data, len(data), steps=60, batch=12, lr=2e-3)
    after = evaluate_retrieval(student, evaluation, 4096, "exact").metrics
    print("before", before, "after", after, "loss", np.mean(losses[:5]), np.mean(losses[-5:]))
    for name, value in frozen.items():
        assert torch.equal(student.state_dict()[name], value), name
    assert after["r_mean"] == before["r_mean"]
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    # k = 10 % of the gallery: 2 of 12 images (at most 0.2 of a top 10), 6 of 60 texts (at most 0.6)
    assert after["first_stage_img_top10_k10pct"] > before["first_stage_img_top10_k10pct"]
    assert after["first_stage_txt_top10_k10pct"] > before["first_stage_txt_top10_k10pct"] + 0.15


def test_loads_start_the_tower_from_the_encoder(tmp_path) -> None:
    itm = get_task("itm")
    plain = itm.check_options({"first_stage_dim": 16}, "test")
    save_task_model(_model(seed=4), itm, plain, str(tmp_path / "plain"))
    model, options = load_task_model(itm, str(tmp_path / "plain"), {"first_stage_tower": True}, fast=True)
    assert options["first_stage_tower"] and hasattr(model, "first_stage_uniter")
    tower = model.first_stage_uniter.state_dict()
    for name, value in model.uniter.state_dict().items():
        assert torch.equal(tower[name], value), name
    with torch.no_grad():
        model.first_stage_uniter.pooler.dense.weight.add_(1.0)
    save_task_model(model, itm, options, str(tmp_path / "tower"))
    again, fixed = load_task_model(itm, str(tmp_path / "tower"), {"first_stage_tower": False}, fast=True)
    assert fixed["first_stage_tower"]  # the weights hold a tower: the checkpoint fixes it
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    plain_again, kept = load_task_model(itm, str(tmp_path / "plain"), {}, fast=True)
    assert not kept["first_stage_tower"] and not hasattr(plain_again, "first_stage_uniter")


def test_a_default_the_checkpoint_overrides_is_logged_not_warned(tmp_path, caplog) -> None:
    """Loading a tower export with the default options sets the tower at INFO (the defaults are no conflict); an
    option the caller chose that the checkpoint overrides is a WARNING naming it."""
    itm = get_task("itm")
    options = itm.check_options({"first_stage_dim": 16, "first_stage_tower": True}, "test")
    save_task_model(_model(seed=5, first_stage_tower=True), itm, options, str(tmp_path / "tower"))
    with caplog.at_level(logging.INFO, logger="uniter_fast.tasks.checkpoint"):
        _, loaded = load_task_model(itm, str(tmp_path / "tower"), itm.check_options({}, "test"), fast=True)
    assert loaded["first_stage_tower"] and loaded["first_stage_dim"] == 16
    logged = {(r.levelname, r.getMessage().split(": ", 1)[1]) for r in caplog.records if "options" in r.getMessage()}
    want = "the checkpoint sets options {'first_stage_dim': (64, 16), 'first_stage_tower': (False, True)} (default, "
    assert logged == {("INFO", want + "checkpoint)")}, logged
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="uniter_fast.tasks.checkpoint"):
        load_task_model(itm, str(tmp_path / "tower"), itm.check_options({"first_stage_dim": 32}, "test"), fast=True)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "fixes options {'first_stage_dim': (32, 16)} (given, checkpoint)" in warned[0]


def test_tower_options_are_checked() -> None:
    itm = get_task("itm")
    with pytest.raises(ValueError, match="cfg: first_stage_tower must be true or false, got 1"):
        itm.check_options({"first_stage_tower": 1}, "cfg")
    with pytest.raises(
        ValueError,
        match=r"cfg: train_first_stage_only trains the first stage's own tower alone: it needs first_stage_tower "
        r"true, .*got first_stage_tower=False, hard_neg_size=0, first_stage_dim=64, first_stage_weight=1.0",
    ):
        itm.check_options({"train_first_stage_only": True}, "cfg")
    with pytest.raises(ValueError, match="got first_stage_tower=True, hard_neg_size=7"):
        get_task("itm-hn").check_options({"train_first_stage_only": True, "first_stage_tower": True}, "cfg")
    with pytest.raises(ValueError, match="first_stage_tower and train_first_stage_only need first_stage_dim > 0"):
        UniterForImageTextRetrieval(tiny_config(), first_stage_tower=True)
    only = itm.check_options({"train_first_stage_only": True, "first_stage_tower": True}, "cfg")
    with pytest.raises(ConfigError, match="cfg: 'adversarial' perturbs the cross-encoder's inputs"):
        itm.check_adversarial(only, "cfg")


def test_a_first_stage_only_run_needs_its_teacher(tmp_path) -> None:
    from uniter_fast.finetuning.config import parse_finetune_config
    from uniter_fast.finetuning.run import check_finetuning

    (tmp_path / "db").mkdir()
    dbs = {f"{split}_{kind}_db": "db" for split in ("train", "val") for kind in ("txt", "img")}
    raw = {"task": "itm", "output_dir": "out", **dbs, "first_stage_tower": True, "train_first_stage_only": True}
    cfg = parse_finetune_config(raw, base_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="checkpoint: train_first_stage_only distils a trained cross-encoder"):
        check_finetuning(cfg, None)
