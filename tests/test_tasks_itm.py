"""Image-text retrieval model and training data: original keys, ``init_output``, the triplet loss and the
hard-negative selection against hand-written formulas, fast = reference, original checkpoints, negative sampling,
and a short fine-tuning run that lifts recall on a bundled subset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from itm_helpers import small_itm_db
from tasks_helpers import compare_fast_reference, encoder_keys, original_checkpoint, perturb, random_batch, tiny_config

from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import collate_rows, row
from uniter_fast.tasks.itm import (
    ItmEvalDataset,
    ItmHardNegDataset,
    ItmRankDataset,
    UniterForImageTextRetrieval,
    add_first_stage,
    contrastive_loss,
    distill_loss,
    select_rows,
    triplet_loss,
)
from uniter_fast.tasks.itm_eval import evaluate_retrieval

H = tiny_config().hidden_size
ORIGINAL_HEADS = {
    "itm_output.weight": (2, H),
    "itm_output.bias": (2,),
    "rank_output.weight": (1, H),
    "rank_output.bias": (1,),
}


def test_keys_are_the_originals_and_the_first_stage_is_extra() -> None:
    plain = UniterForImageTextRetrieval(tiny_config())
    assert sorted(plain.state_dict()) == sorted(encoder_keys(tiny_config()) + list(ORIGINAL_HEADS))
    staged = UniterForImageTextRetrieval(tiny_config(), first_stage_dim=8)
    extra = set(staged.state_dict()) - set(plain.state_dict())
    assert extra == {"txt_proj.weight", "txt_proj.bias", "img_proj.weight", "img_proj.bias"}


def test_triplet_loss_against_the_original_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    for groups, size, margin in ((5, 3, 0.2), (3, 9, 0.5), (7, 2, 0.2)):
        scores = torch.randn(groups * size, generator=gen, dtype=torch.float64) * 2
        got = triplet_loss(scores, size, margin)
        want = torch.empty(groups, size - 1, dtype=torch.float64)
        for g in range(groups):
            pos = 1 / (1 + np.exp(-float(scores[g * size])))
            for n in range(1, size):
                neg = 1 / (1 + np.exp(-float(scores[g * size + n])))
                want[g, n - 1] = max(0.0, margin + neg - pos)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
        assert (got > 0).any() and (got == 0).any() or size == 2
    with pytest.raises(ValueError, match="sample_size"):
        triplet_loss(torch.randn(7), 3, 0.2)


def test_contrastive_loss_masks_captions_of_the_same_image() -> None:
    gen = torch.Generator().manual_seed(1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=gen), dim=-1)
    groups = torch.tensor([0, 1, 1, 2])
    logits = txt @ img.t() / 0.1
    want = 0.0
    for mat in (logits, logits.t()):
        for i in range(4):
            keep = [j for j in range(4) if j == i or groups[j] != groups[i]]
            want += -torch.log_softmax(mat[i, keep], 0)[keep.index(i)] / 8
    torch.testing.assert_close(contrastive_loss(txt, img, groups, 0.1), want)


def test_distill_loss_against_the_direct_formula_with_gradients() -> None:
    """KL(softmax(teacher / tau_t) || softmax(sim / tau)) per text over the images and per image over the texts,
    written out in float64 with sums of p * (log p - log q); the loss and the gradients of both embeddings at fp32
    1e-5, and none reaches the teacher's scores."""
    gen = torch.Generator().manual_seed(7)
    for groups, dim, tau, tau_t in ((5, 7, 0.05, 1.0), (9, 3, 0.2, 0.5), (2, 16, 0.1, 2.0)):
        txt0 = torch.nn.functional.normalize(torch.randn(groups, dim, generator=gen), dim=-1)
        img0 = torch.nn.functional.normalize(torch.randn(groups, dim, generator=gen), dim=-1)
        teacher = (torch.randn(groups, groups, generator=gen) * 3).requires_grad_()
        txt, img = txt0.clone().requires_grad_(), img0.clone().requires_grad_()
        got = distill_loss(txt, img, teacher, tau, tau_t)
        got.backward()
        txt64, img64 = txt0.double().requires_grad_(), img0.double().requires_grad_()
        sim, target = txt64 @ img64.t() / tau, teacher.detach().double() / tau_t
        want = 0.0
        for s_mat, t_mat in ((sim, target), (sim.t(), target.t())):
            for i in range(groups):
                p = torch.exp(t_mat[i]) / torch.exp(t_mat[i]).sum()
                log_q = s_mat[i] - torch.log(torch.exp(s_mat[i]).sum())
                want = want + (p * (torch.log(p) - log_q)).sum() / (2 * groups)
        want.backward()
        assert got.dtype == torch.float32 and float(want.detach()) > 0
        torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(txt.grad.double(), txt64.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(img.grad.double(), img64.grad, rtol=1e-5, atol=1e-5)
        assert teacher.grad is None
    # a student that reproduces the teacher's logits has nothing to learn
    emb = torch.nn.functional.normalize(torch.randn(4, 6, generator=gen), dim=-1)
    assert float(distill_loss(emb, emb, emb @ emb.t() / 0.1, 0.1, 1.0)) < 1e-6


def _distill_models(loss: str) -> UniterForImageTextRetrieval:
    torch.manual_seed(0)
    model = UniterForImageTextRetrieval(tiny_config(vocab_size=1100), first_stage_dim=16, first_stage_loss=loss)
    return perturb(model)


def test_distill_trains_the_first_stage_on_the_cross_encoders_batch_scores(train_db) -> None:
    """With first_stage_loss "distill" the batch carries every text x image of its positives; the loss is the
    triplet mean plus the weighted distill_loss of the first-stage embeddings against those pairs' cross-encoder
    scores (eval mode, no gradient); rank_output and itm_output get exactly the gradients of the contrastive option
    (the cross-encoder's own training is untouched), and the shared encoder also learns from the distillation."""
    txt_db, img_db = train_db
    items = 5
    plain = ItmRankDataset(txt_db, img_db, negative_size=2, seed=3)
    crossed = ItmRankDataset(txt_db, img_db, negative_size=2, seed=3, cross_pairs=True)
    batch = crossed.collate([crossed[i] for i in range(items)])
    plain_batch = plain.collate([plain[i] for i in range(items)])
    assert "cross_pairs" not in plain_batch and set(plain_batch) == set(batch) - {"cross_pairs"}
    for key in plain_batch:
        if isinstance(plain_batch[key], torch.Tensor):
            assert torch.equal(plain_batch[key], batch[key]), key
    positives = [crossed[i]["rows"][0] for i in range(items)]  # the grid, row i * items + j: text i, image j
    grid = [row(t["input_ids"], i["img_feat"], i["img_pos_feat"]) for t in positives for i in positives]
    grid = collate_rows(grid, "itm")

    grads, outs = {}, {}
    for name in ("contrastive", "distill", "contrastive+distill"):
        model = _distill_models(name)
        model.eval()  # no dropout: the two options see the same encoder outputs
        out = model(batch)
        out["loss"].backward()
        outs[name] = out
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        if name != "contrastive":
            pairs = select_rows(batch, batch["pair_rows"])
            with torch.no_grad():
                teacher = model.rank_scores(grid).view(items, items)
                txt = model.text_embeddings(pairs["input_ids"], pairs["txt_lens"])
                img = model.image_embeddings(pairs["img_feat"], pairs["img_pos_feat"], pairs["num_bbs"])
                scores = model(batch, compute_loss=False)["scores"]
            want = distill_loss(txt, img, teacher, 0.05, 1.0)
            if name == "contrastive+distill":
                want = want + contrastive_loss(txt, img, batch["pair_images"], 0.05)
            torch.testing.assert_close(out["first_stage_loss"], want, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out["rank_loss"], triplet_loss(scores, 5, 0.2).mean(), rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(out["loss"], out["rank_loss"] + want, rtol=1e-5, atol=1e-6)
            assert model.training is False  # teacher_scores restores the mode it found
    for name in ("distill", "contrastive+distill"):
        torch.testing.assert_close(outs[name]["rank_loss"], outs["contrastive"]["rank_loss"])
        for head in ("rank_output.weight", "rank_output.bias"):
            torch.testing.assert_close(grads[name][head], grads["contrastive"][head], rtol=0, atol=0)
    assert "itm_output.weight" not in grads["distill"]
    assert grads["distill"]["txt_proj.weight"].abs().sum() > 0 and grads["distill"]["img_proj.weight"].abs().sum() > 0
    encoder = "uniter.embeddings.word_embeddings.weight"
    assert not torch.allclose(grads["distill"][encoder], grads["contrastive"][encoder])
    with pytest.raises(ValueError, match=r"lacks the keys \['cross_pairs'\] \(first_stage_loss 'distill'\)"):
        _distill_models("distill")(plain_batch)
    # itm-hn: the teacher pairs survive the hard-negative selection
    hard = ItmHardNegDataset(txt_db, img_db, negative_size=4, seed=3, cross_pairs=True)
    hard_batch = hard.collate([hard[i] for i in range(3)])
    assert hard_batch["cross_pairs"]["gather_index"].size(0) == 9
    torch.manual_seed(0)
    model = UniterForImageTextRetrieval(
        tiny_config(vocab_size=1100), hard_neg_size=2, first_stage_dim=16, first_stage_loss="distill"
    )
    out = perturb(model).train()(hard_batch)
    assert torch.isfinite(out["first_stage_loss"]) and out["first_stage_loss"] > 0 and model.training


@pytest.mark.parametrize("hard", [False, True])
def test_the_teacher_grid_gathers_every_positive_text_with_every_positive_image(train_db, hard: bool) -> None:
    """The loader's grid carries no region feature (index arithmetic only); the model's teacher batch gathers them
    from the batch: on the packed path the collate's layout of the explicit (text i, image j) rows, tensor for
    tensor, and the padded path's scores equal that layout's; itm-hn: the same after the hard-negative selection."""
    txt_db, img_db = train_db
    items = 4
    data = (ItmHardNegDataset if hard else ItmRankDataset)(txt_db, img_db, negative_size=3, seed=7, cross_pairs=True)
    batch = data.collate([data[i] for i in range(0, 3 * items, 3)])
    assert not any(k in batch["cross_pairs"]["packed"] for k in ("img_feat", "img_pos_feat"))
    positives = [data[i]["rows"][0] for i in range(0, 3 * items, 3)]
    rows = [row(t["input_ids"], i["img_feat"], i["img_pos_feat"]) for t in positives for i in positives]
    want = collate_rows(rows, data.task)
    scores = {}
    for fast in (True, False):
        torch.manual_seed(0)
        model = perturb(
            UniterForImageTextRetrieval(tiny_config(vocab_size=1100), fast=fast, hard_neg_size=2 if hard else 0)
        ).eval()
        source = model.hard_batch(batch, 4) if hard else batch  # itm-hn: the teacher reads the kept rows
        teacher = model.teacher_batch(source)
        if fast:
            assert set(teacher) == {"packed"} and set(teacher["packed"]) == set(want["packed"])
            for key, value in want["packed"].items():
                got = teacher["packed"][key]
                assert torch.equal(got, value) if torch.is_tensor(value) else got == value, key
        with torch.no_grad():
            scores[fast] = model.rank_scores(teacher), model.rank_scores(want)
    torch.testing.assert_close(scores[True][0], scores[True][1], rtol=0, atol=0)
    torch.testing.assert_close(scores[False][0], scores[False][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores[False][0], scores[True][0], rtol=1e-4, atol=1e-5)


def test_first_stage_loss_options_are_checked() -> None:
    itm = get_task("itm")
    options = itm.check_options({}, "test")
    assert (options["first_stage_loss"], options["distill_temperature"]) == ("contrastive", 1.0)
    model = itm.build_model(tiny_config(), itm.check_options({"first_stage_loss": "distill"}, "t"), True)
    assert model.first_stage_loss == "distill"
    with pytest.raises(
        ValueError,
        match=r"cfg: first_stage_loss must be one of \('contrastive', 'distill', 'contrastive\+distill'\), got 'kl'",
    ):
        itm.check_options({"first_stage_loss": "kl"}, "cfg")
    with pytest.raises(ValueError, match="cfg: distill_temperature must be a number > 0, got 0"):
        get_task("itm-hn").check_options({"distill_temperature": 0}, "cfg")


def test_init_output_copies_the_positive_row_and_pretrained_checkpoints_use_it(tmp_path) -> None:
    state = original_checkpoint(tiny_config(), {"itm_output.weight": (2, H), "itm_output.bias": (2,)})
    state["cls.predictions.bias"] = torch.zeros(tiny_config().vocab_size).half()  # a pretraining head, skipped
    torch.save(state, tmp_path / "uniter-tiny.pt")
    model, options = load_task_model(get_task("itm"), str(tmp_path / "uniter-tiny.pt"), {}, tiny_config())
    torch.testing.assert_close(model.rank_output.weight, state["itm_output.weight"][1:].float())
    torch.testing.assert_close(model.rank_output.bias, state["itm_output.bias"][1:].float())
    torch.testing.assert_close(model.itm_output.weight, state["itm_output.weight"].float())
    assert options["first_stage_dim"] == 64 and model.first_stage_dim == 64


def test_original_finetuned_checkpoints_load_strictly(tmp_path) -> None:
    state = original_checkpoint(tiny_config(), ORIGINAL_HEADS, seed=2)
    torch.save(state, tmp_path / "model_step_5000.pt")
    for name in ("itm", "itm-hn"):
        model, options = load_task_model(get_task(name), str(tmp_path / "model_step_5000.pt"), {})
        assert options["first_stage_dim"] == 0 and sorted(model.state_dict()) == sorted(state)
        for key, value in state.items():
            torch.testing.assert_close(model.state_dict()[key], value.float(), msg=key)
    state["rank_output.extra"] = torch.zeros(1).half()
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"unexpected \[.rank_output.extra.\]"):
        load_task_model(get_task("itm"), str(tmp_path / "bad.pt"), {})


def _grouped_batch(groups: int, size: int, seed: int) -> dict:
    lengths = [(5 + (i * 7) % 9, 3 + (i * 5) % 11) for i in range(groups * size)]
    batch = random_batch(lengths, seed=seed)
    batch["sample_size"] = size
    batch["pair_rows"] = torch.arange(groups) * size
    batch["pair_images"] = torch.arange(groups)
    return add_first_stage(batch)


def test_fast_equals_reference_with_the_first_stage_loss() -> None:
    batch = _grouped_batch(4, 3, seed=3)

    def build(fast: bool) -> UniterForImageTextRetrieval:
        torch.manual_seed(0)
        return perturb(UniterForImageTextRetrieval(tiny_config(), first_stage_dim=16, fast=fast))

    compare_fast_reference(build, batch)


def test_hard_negatives_are_the_best_scoring_candidates() -> None:
    groups, pool, hard = 3, 6, 2
    batch = _grouped_batch(groups, pool + 1, seed=4)
    torch.manual_seed(0)
    model = perturb(UniterForImageTextRetrieval(tiny_config(), hard_neg_size=hard, fast=True))
    model.eval()
    scores = model(batch, compute_loss=False)["scores"].detach().view(groups, pool + 1)
    model.train()
    loss = model(batch)["loss"]
    want = []
    for g in range(groups):
        negs = sorted(range(1, pool + 1), key=lambda n: -float(scores[g, n]))[:hard]
        pos = torch.sigmoid(scores[g, 0])
        want += [torch.clamp(0.2 + torch.sigmoid(scores[g, n]) - pos, min=0) for n in negs]
    torch.testing.assert_close(loss, torch.stack(want).mean(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def train_db(tmp_path_factory):
    txt, img = small_itm_db(str(tmp_path_factory.mktemp("itm") / "txt"), 12, "train")
    return TxtTokLmdb(txt, 60), DetectFeatLmdb(img)


def test_training_groups_follow_the_original_layout(train_db) -> None:
    txt_db, img_db = train_db
    ranked = ItmRankDataset(txt_db, img_db, negative_size=2, seed=5)
    item = ranked[7]
    text, image = ranked.ids[7], ranked.txt2img[ranked.ids[7]]
    rows = item["rows"]
    assert len(rows) == 5 and torch.equal(rows[1]["input_ids"], rows[0]["input_ids"])
    feats = [r["img_feat"] for r in rows]
    assert torch.equal(feats[3], feats[0]) and torch.equal(feats[4], feats[0])
    assert not torch.equal(feats[1], feats[0]) and not torch.equal(feats[2], feats[0])
    own = {tuple(ranked.text(t).tolist()) for t in ranked.img2txts[image]}
    assert tuple(rows[3]["input_ids"].tolist()) not in own and tuple(rows[4]["input_ids"].tolist()) not in own
    assert ranked.lens[7] == 1 and len(ranked.text(text)) == txt_db.id2len[text] + 2  # batches count texts
    batch = ranked.collate([ranked[i] for i in range(3)])
    assert batch["sample_size"] == 5 and batch["pair_rows"].tolist() == [0, 5, 10]
    hard = ItmHardNegDataset(txt_db, img_db, negative_size=4, seed=5)
    batch = hard.collate([hard[0], hard[1]])
    assert batch["sample_size"] == 5 and batch["input_ids"].size(0) == 20 and batch["pair_rows"].tolist() == [0, 10]
    with pytest.raises(ValueError, match="negative images"):
        ItmRankDataset(txt_db, img_db, negative_size=30)[0]


def test_hard_negative_loss_is_the_originals_sum_of_both_sides(train_db) -> None:
    """The original (train_itm_hard_negatives.py with model/itm.py's HardNeg model) back-propagates per text, each
    over train_batch_size texts: the image side's hinge mean (sample_from='i'), then the text side's ('t'), each of
    its positive and the hard_size best-scoring candidates (scored in eval mode, no gradient). Written out here
    group by group: the loss, every gradient and the clipped norm equal one forward of the collated itm-hn batch."""
    txt_db, img_db = train_db
    hard, items = 2, 3
    data = ItmHardNegDataset(txt_db, img_db, negative_size=5, seed=1)
    batch = data.collate([data[i] for i in range(items)])
    torch.manual_seed(0)
    model = perturb(UniterForImageTextRetrieval(tiny_config(vocab_size=1100), hard_neg_size=hard, fast=True))
    model.train()
    out = model(batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total, sides = 0.0, {"t": [], "i": []}
    for k in range(items):
        rows = data[k]["rows"]
        for side, group in (("i", rows[6:]), ("t", rows[:6])):  # the original: image side first
            with torch.no_grad():
                model.eval()
                scores = model.rank_scores(collate_rows(group, "itm"))
                model.train()
            keep = [0] + (scores[1:].topk(hard).indices + 1).tolist()
            picked = torch.sigmoid(model.rank_scores(collate_rows([group[i] for i in keep], "itm")))
            rank_loss = torch.clamp(0.2 + picked[1:] - picked[:1], min=0)  # model/itm.py's triplet loss
            (rank_loss.mean() / items).backward()  # loss.mean() / opts.train_batch_size
            total += float(rank_loss.detach().mean()) / items
            sides[side].append(float(rank_loss.detach().mean()))
    assert out["loss"].item() == pytest.approx(total, rel=1e-5) and total > 0
    assert out["text_side_loss"].item() == pytest.approx(np.mean(sides["t"]), rel=1e-5)
    assert out["image_side_loss"].item() == pytest.approx(np.mean(sides["i"]), rel=1e-5)
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(want) == set(grads)
    for name, grad in want.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
    for name, param in model.named_parameters():
        if param.grad is not None:
            param.grad.copy_(grads[name])
    assert float(torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)) == pytest.approx(float(norm), rel=1e-5)
    # the itm task's single-sided groups keep their plain mean
    ranked = ItmRankDataset(txt_db, img_db, negative_size=2, seed=1)
    plain = ranked.collate([ranked[i] for i in range(items)])
    scores = model(plain, compute_loss=False)["scores"]
    assert "sides" not in plain and "text_side_loss" not in model(plain)
    model.eval()
    torch.testing.assert_close(model(plain)["loss"], triplet_loss(scores, 5, 0.2).mean())


def test_short_finetuning_lifts_recall(train_db) -> None:
    """12 images x 5 captions, 120 steps of the itm loss + first stage from a random init: text->image R@1 (chance
    1/12) and the first stage's recall at 3 (chance 1/4) rise well above chance."""
    from tasks_helpers import learn_subset

    txt_db, img_db = train_db
    task = get_task("itm")
    options = task.check_options({"negative_size": 3, "first_stage_dim": 32}, "test")
    torch.manual_seed(0)
    model = task.build_model(tiny_config(vocab_size=1100), options, True)
    data = ItmRankDataset(txt_db, img_db, options["negative_size"], seed=0)
    losses = learn_subset(model, data, len(data), steps=120, batch=16, lr=2e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    after = evaluate_retrieval(model, ItmEvalDataset(txt_db, img_db), 4096, "fast", top_k=3).metrics
    torch.set_num_threads(threads)
    print("after", after, "loss", np.mean(losses[:10]), np.mean(losses[-10:]))
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert after["img_r1"] > 0.25 and after["r_mean"] > 0.5
    assert after["first_stage_img_r3"] > 0.5


def test_hard_negative_run_starts_from_an_itm_export(tmp_path) -> None:
    from uniter_fast.tasks.checkpoint import save_task_model

    itm = get_task("itm")
    options = itm.check_options({"first_stage_dim": 16, "eval_mode": "fast"}, "test")
    save_task_model(itm.build_model(tiny_config(), options, True), itm, options, str(tmp_path / "export"))
    model, loaded = load_task_model(get_task("itm-hn"), str(tmp_path / "export"), {"eval_mode": "exact"})
    assert (loaded["first_stage_dim"], loaded["hard_neg_size"], loaded["negative_size"]) == (16, 7, 31)
    assert model.hard_neg_size == 7 and loaded["eval_mode"] == "exact"
