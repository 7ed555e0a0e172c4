"""Retrieval evaluation: recall against a brute-force ranking (ties included) and against the original
``itm_eval`` formula, first-stage candidates, fast = exact when k covers the gallery, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from itm_helpers import small_itm_db
from tasks_helpers import original_checkpoint, perturb, tiny_config

from uniter_fast.data import DetectFeatLmdb, TxtTokLmdb
from uniter_fast.errors import CheckpointError
from uniter_fast.tasks import get_task
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.itm import ItmEvalDataset, ItmRankDataset
from uniter_fast.tasks.itm_eval import (
    candidate_pairs,
    evaluate_retrieval,
    first_stage_embeddings,
    first_stage_recall_of_exact,
    gallery_k,
    itm_recall,
)


def brute_force_recall(scores: np.ndarray, gt: list[int]) -> dict[str, float]:
    """Ranks by sorting (descending score, then index) one row / column at a time."""
    num_txt, num_img = scores.shape
    out = {}
    img_ranks = []
    for t in range(num_txt):
        order = sorted(range(num_img), key=lambda j: (-scores[t, j], j))
        img_ranks.append(order.index(gt[t]))
    txt_ranks = []
    for j in range(num_img):
        order = sorted(range(num_txt), key=lambda t: (-scores[t, j], t))
        txt_ranks.append(min(order.index(t) for t in range(num_txt) if gt[t] == j))
    for side, ranks in (("txt", txt_ranks), ("img", img_ranks)):
        for k in (1, 5, 10):
            out[f"{side}_r{k}"] = float(np.mean([r < k for r in ranks]))
    return out


def original_formula(scores: torch.Tensor, gt: list[int]) -> dict[str, float]:
    """The original ``itm_eval`` steps: top-10 by ``topk``; text->image counts ``(nonzero() < K)`` over both columns
    (row index and position); image->text takes the best position of the image's texts in its column's top 10."""
    num_txt, num_img = scores.shape
    top_img = scores.topk(10, dim=1).indices
    hits = (top_img == torch.tensor(gt)[:, None]).nonzero()
    out = {f"img_r{k}": float((hits < k).sum()) / num_txt for k in (1, 5, 10)}
    top_txt = scores.topk(10, dim=0).indices
    for k in (1, 5, 10):
        count = 0
        for j in range(num_img):
            positions = [int(p) for t in range(num_txt) if gt[t] == j for p in (top_txt[:, j] == t).nonzero()]
            count += min([10] + positions) < k
        out[f"txt_r{k}"] = count / num_img
    return out


@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_brute_force(ties: bool) -> None:
    rng = np.random.default_rng(3 + ties)
    for num_img, per_image in ((12, 3), (30, 1), (25, 5)):
        gt = [j for j in range(num_img) for _ in range(per_image)]
        rng.shuffle(gt)
        scores = rng.standard_normal((len(gt), num_img))
        if ties:
            scores = np.round(scores * 2) / 2  # many equal scores
        txt_ids = [f"t{i}" for i in range(len(gt))]
        img_ids = [f"i{j}" for j in range(num_img)]
        got = itm_recall(torch.tensor(scores), txt_ids, img_ids, {t: f"i{g}" for t, g in zip(txt_ids, gt)})
        want = brute_force_recall(scores, gt)
        for key, value in want.items():
            assert got[key] == pytest.approx(value), key
        assert got["r_mean"] == pytest.approx(np.mean(list(want.values())))


def test_recall_on_a_hand_made_matrix() -> None:
    # texts t0, t1 of image A; t2 of image B; ties broken towards the lower index
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.2, 0.3]])
    got = itm_recall(scores, ["t0", "t1", "t2"], ["A", "B"], {"t0": "A", "t1": "A", "t2": "B"})
    assert got["img_r1"] == pytest.approx(1.0)  # t1's tie: A (column 0) ranks first
    assert got["txt_r1"] == pytest.approx(0.5)  # A: t0 first; B: t1 (0.5) beats t2 (0.3)
    assert got["txt_r5"] == pytest.approx(1.0)


def test_ties_rank_the_lower_index_first() -> None:
    """Equal scores rank by lower column (text -> image) and lower row (image -> text): on a constant matrix a
    text's image ranks at its column index and an image's texts at their row indices. An fp16 matrix, as the
    original stores, turns scores closer than its resolution into such ties (here all of them)."""
    gt = [7, 0, 3, 1, 0, 2, 9, 4, 5, 6, 8, 11, 10, 2, 7]
    txt_ids, img_ids = [f"t{i}" for i in range(len(gt))], [f"i{j}" for j in range(12)]
    txt2img = {t: f"i{g}" for t, g in zip(txt_ids, gt)}
    first_row = {j: min(t for t, g in enumerate(gt) if g == j) for j in range(12)}
    for scores in (
        torch.full((len(gt), 12), 0.25),
        (5.0 + 1e-4 * torch.rand(len(gt), 12, generator=torch.Generator().manual_seed(0))).half(),
    ):
        assert scores.unique().numel() == 1
        got = itm_recall(scores, txt_ids, img_ids, txt2img)
        for k in (1, 5, 10):
            assert got[f"img_r{k}"] == pytest.approx(np.mean([g < k for g in gt]))
            assert got[f"txt_r{k}"] == pytest.approx(np.mean([first_row[j] < k for j in range(12)]))
    # a tie at the true image: it ranks above the equal scores of higher columns only
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1], [0.2, 0.7, 0.7, 0.7]])
    got = itm_recall(scores, ["a", "b"], ["i0", "i1", "i2", "i3"], {"a": "i2", "b": "i1"})
    assert got["img_r1"] == pytest.approx(0.5)  # a: i1 (column 1) ties with its i2 and ranks first; b: its i1 first


def test_recall_equals_the_original_formula_up_to_its_row_index_count() -> None:
    rng = np.random.default_rng(0)
    gt = [j for j in range(40) for _ in range(5)]
    scores = torch.tensor(rng.standard_normal((200, 40)) + 3.0 * np.eye(40)[gt], dtype=torch.float32)
    txt_ids, img_ids = [f"t{i}" for i in range(200)], [f"i{j}" for j in range(40)]
    got = itm_recall(scores, txt_ids, img_ids, {t: f"i{g}" for t, g in zip(txt_ids, gt)})
    original = original_formula(scores, gt)
    top10 = scores.topk(10, dim=1).indices
    found = [(top10[t] == gt[t]).any().item() for t in range(200)]
    for k in (1, 5, 10):
        assert got[f"txt_r{k}"] == pytest.approx(original[f"txt_r{k}"])
        spurious = sum(found[:k]) / 200  # the original also counts the row index of the first k texts' hits
        assert got[f"img_r{k}"] == pytest.approx(original[f"img_r{k}"] - spurious)
    assert 0 < got["img_r1"] < 1 and 0 < got["txt_r1"] <= 1


def test_first_stage_recall_of_exact_top_on_a_hand_made_case() -> None:
    """Top 2 of 4 images per text; first stage at k = 1 (25 %) and 2 (50 %); the tie of text 1's first-stage scores
    ranks image 2 first (lower index)."""
    exact = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    first = torch.tensor([[0.9, 0.1, 0.8, 0.0], [0.0, 0.0, 1.0, 1.0]])
    got = first_stage_recall_of_exact(exact, first, top=2, percents=(25, 50))
    # text 0: top {0, 1}, first stage 0, 2, ..: 1/2 at k 1 and 2; text 1: top {3, 2}, first stage 2, 3, ..: 1/2, 2/2
    assert got["first_stage_img_top2_k25pct"] == 0.5 and got["first_stage_img_top2_k50pct"] == 0.75
    assert (got["first_stage_img_k25pct"], got["first_stage_img_k50pct"]) == (1.0, 2.0)
    # per image over the 2 texts: the top 2 is both texts, k = 1 keeps one of them
    assert got["first_stage_txt_top2_k25pct"] == got["first_stage_txt_top2_k50pct"] == 0.5
    assert (got["first_stage_txt_k25pct"], got["first_stage_txt_k50pct"]) == (1.0, 1.0)
    # the default names: top 10 at 2 / 5 / 10 % of the gallery; k < 10 caps the share at k / 10
    wide = torch.randn(3, 150, generator=torch.Generator().manual_seed(0))
    default = first_stage_recall_of_exact(wide, wide)
    assert [default[f"first_stage_img_k{p}pct"] for p in (2, 5, 10)] == [3.0, 8.0, 15.0]
    assert default["first_stage_img_top10_k2pct"] == pytest.approx(0.3) and default["first_stage_img_top10_k10pct"] == 1
    assert (gallery_k(150, 2), gallery_k(750, 5), gallery_k(7, 2)) == (3, 38, 1)
    with pytest.raises(ValueError, match="equal 2-d shapes"):
        first_stage_recall_of_exact(exact, first[:, :3])


@pytest.mark.parametrize("ties", [False, True])
def test_first_stage_recall_of_exact_top_matches_brute_force(ties: bool) -> None:
    gen = torch.Generator().manual_seed(11 + ties)
    for num_txt, num_img in ((23, 37), (41, 12), (9, 130)):
        exact = torch.randn(num_txt, num_img, generator=gen)
        first = torch.randn(num_txt, num_img, generator=gen)
        if ties:
            exact, first = (exact * 2).round(), (first * 2).round()
        got = first_stage_recall_of_exact(exact, first)
        e, f = exact.numpy(), first.numpy()
        for side, queries, gallery, score in (
            ("img", num_txt, num_img, lambda m, q, g: m[q, g]),
            ("txt", num_img, num_txt, lambda m, q, g: m[g, q]),
        ):
            for percent in (2, 5, 10):
                k = max(1, int(np.ceil(gallery * percent / 100 - 1e-9)))
                shares = []
                for q in range(queries):
                    by_exact = sorted(range(gallery), key=lambda g: (-score(e, q, g), g))[: min(10, gallery)]
                    by_first = set(sorted(range(gallery), key=lambda g: (-score(f, q, g), g))[:k])
                    shares.append(np.mean([g in by_first for g in by_exact]))
                assert got[f"first_stage_{side}_k{percent}pct"] == k
                assert got[f"first_stage_{side}_top10_k{percent}pct"] == pytest.approx(np.mean(shares), abs=1e-6)


def test_candidate_pairs_are_the_union_of_both_top_k() -> None:
    sim = torch.randn(17, 6, generator=torch.Generator().manual_seed(1))
    rows, cols = candidate_pairs(sim, 2)
    want = {(t, int(j)) for t in range(17) for j in sim[t].topk(2).indices}
    want |= {(int(t), j) for j in range(6) for t in sim[:, j].topk(2).indices}
    assert set(zip(rows.tolist(), cols.tolist())) == want and len(rows) == len(want)
    with pytest.raises(ValueError, match="top_k must lie in"):
        candidate_pairs(sim, 7)


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory):
    txt, img = small_itm_db(str(tmp_path_factory.mktemp("itm") / "txt"), 6, "test")
    return ItmEvalDataset(TxtTokLmdb(txt, -1), DetectFeatLmdb(img))


def test_fast_with_k_covering_the_gallery_equals_exact(small_eval) -> None:
    task = get_task("itm")
    options = task.check_options({"first_stage_dim": 16}, "test")
    model = perturb(task.build_model(tiny_config(vocab_size=1100), options, True))
    exact = evaluate_retrieval(model, small_eval, 2048, "exact")
    fast = evaluate_retrieval(model, small_eval, 2048, "fast", top_k=len(small_eval.all_img_ids))
    assert exact.metrics["cross_pairs"] == fast.metrics["cross_pairs"] == 30 * 6
    torch.testing.assert_close(fast.score_matrix, exact.score_matrix)
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert fast.metrics[key] == exact.metrics[key]
    assert fast.metrics["first_stage_img_r6"] == 1.0
    # exact scores are the model's own scores of each pair (poisoned matrix not left anywhere)
    batch = small_eval.pairs_batch(np.array([0, 7, 29]), np.array([5, 0, 3]))
    want = model(batch, compute_loss=False)["scores"]
    torch.testing.assert_close(exact.score_matrix[[0, 7, 29], [5, 0, 3]], want, rtol=1e-5, atol=1e-6)
    few = evaluate_retrieval(model, small_eval, 2048, "fast", top_k=2)
    assert few.metrics["cross_pairs"] < 30 * 6 and torch.isfinite(few.score_matrix).all()
    with pytest.raises(ValueError, match="top_k must lie in"):
        evaluate_retrieval(model, small_eval, 2048, "fast", top_k=7)


def test_exact_evaluation_reports_the_first_stages_recall_of_its_top_10(small_eval) -> None:
    """Exact evaluation of a model with a trained first stage adds first_stage_recall_of_exact of its own score
    matrix and the first stage's similarities; without a first stage, or with a fresh one, the keys are absent."""
    task = get_task("itm")
    model = perturb(
        task.build_model(tiny_config(vocab_size=1100), task.check_options({"first_stage_dim": 16}, "t"), True)
    )
    exact = evaluate_retrieval(model, small_eval, 2048, "exact")
    txt, img = first_stage_embeddings(model, small_eval, 2048, lambda b: b)
    want = first_stage_recall_of_exact(exact.score_matrix, txt @ img.t())
    assert len(want) == 12 and {k: exact.metrics[k] for k in want} == want
    assert exact.metrics["first_stage_img_k5pct"] == 1 and exact.metrics["first_stage_txt_k5pct"] == 2  # 6 / 30
    model.mark_first_stage_fresh()
    assert not any(k.startswith("first_stage") for k in evaluate_retrieval(model, small_eval, 2048, "exact").metrics)
    fast = evaluate_retrieval(perturb(model), small_eval, 2048, "fast", top_k=2).metrics
    assert "first_stage_img_top10_k5pct" not in fast


def test_fast_needs_the_first_stage_and_bad_splits_are_named(small_eval, tmp_path) -> None:
    task = get_task("itm")
    model = task.build_model(tiny_config(vocab_size=1100), task.check_options({"first_stage_dim": 0}, "t"), True)
    with pytest.raises(CheckpointError, match="first stage"):
        evaluate_retrieval(model, small_eval, 2048, "fast", top_k=2)
    with pytest.raises(ValueError, match="eval_mode must be one of"):
        task.check_options({"eval_mode": "approx"}, "test config")


def test_fast_refuses_a_first_stage_that_was_never_trained(small_eval, tmp_path) -> None:
    """A pretraining checkpoint has no first stage: loaded for itm, its txt_proj / img_proj are fresh, so fast
    evaluation (chance-level candidates) is refused with how to train one; exact evaluation works, and a training
    step lifts the refusal (as trained weights loaded on resume do)."""
    config = tiny_config(vocab_size=1100)
    h = config.hidden_size
    state = original_checkpoint(config, {"itm_output.weight": (2, h), "itm_output.bias": (2,)})
    torch.save(state, tmp_path / "pretrained.pt")
    model, _ = load_task_model(get_task("itm"), str(tmp_path / "pretrained.pt"), {"first_stage_dim": 16}, config)
    with pytest.raises(CheckpointError) as err:
        evaluate_retrieval(model, small_eval, 2048, "fast", top_k=2)
    message = str(err.value)
    assert "txt_proj / img_proj were initialised freshly from a pretrained checkpoint" in message
    assert "finetune.py --task itm --checkpoint <it>, first_stage_dim 16, first_stage_weight > 0" in message
    assert "--eval-mode exact" in message and "\n" not in message
    assert evaluate_retrieval(model, small_eval, 2048, "exact").metrics["cross_pairs"] == 30 * 6
    ranked = ItmRankDataset(small_eval.txt_db, small_eval.img_db, 1)
    model.train()
    model(ranked.collate([ranked[i] for i in range(0, 30, 5)]))["loss"].backward()  # texts of 6 images
    assert model.first_stage_untrained  # gradients are no training yet
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert not model.first_stage_untrained
    assert evaluate_retrieval(model, small_eval, 2048, "fast", top_k=2).metrics["cross_pairs"] < 30 * 6


def test_a_text_whose_image_is_missing_is_named(tmp_path) -> None:
    from uniter_fast.data.txt_db import TxtDbWriter

    source = TxtTokLmdb(small_itm_db(str(tmp_path / "src"), 1, "test")[0], -1)
    with TxtDbWriter(str(tmp_path / "bad"), source.meta) as writer:
        writer.add("lost", [5, 6, 7], "no_such_image.npz")
    img = small_itm_db(str(tmp_path / "again"), 1, "test")[1]
    with pytest.raises(Exception, match="'lost' names image 'no_such_image.npz'"):
        ItmEvalDataset(TxtTokLmdb(str(tmp_path / "bad"), -1), DetectFeatLmdb(img))


def test_exact_and_fast_results_are_named_by_mode_and_say_what_made_them(small_eval, tmp_path) -> None:
    """``python -m uniter_fast.evaluate`` exact, then fast (k = 2), into one output dir: two sets of files, neither
    overwriting the other, each recording the task, split, checkpoint, mode and k; readable by others (not 0600)."""
    from uniter_fast.evaluate import main
    from uniter_fast.tasks.checkpoint import save_task_model

    task = get_task("itm")
    options = task.check_options({"first_stage_dim": 16}, "test")
    torch.manual_seed(0)
    save_task_model(
        perturb(task.build_model(tiny_config(vocab_size=1100), options, True)), task, options, str(tmp_path / "export")
    )
    out = tmp_path / "results"
    common = ["--checkpoint", str(tmp_path / "export"), "--split", "small", "--output_dir", str(out)]
    common += ["--txt_db", small_eval.txt_db.path, "--img_db", small_eval.img_db.path]
    old = os.umask(0o022)
    try:
        exact = main([*common, "--eval-mode", "exact"])["small"]
        fast = main([*common, "--eval-mode", "fast", "--top-k", "2"])["small"]
    finally:
        os.umask(old)
    stems = ["small_results_exact", "small_results_fast_k2"]
    assert sorted(os.listdir(out)) == sorted(f"{stem}.{ext}" for stem in stems for ext in ("json", "pt"))
    for stem, mode, k, metrics in zip(stems, ("exact", "fast"), (None, 2), (exact, fast)):
        made_by = {"task": "itm", "split": "small", "checkpoint": str(tmp_path / "export"), "mode": mode, "top_k": k}
        record = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
        assert record == {**made_by, "metrics": metrics}
        saved = torch.load(out / f"{stem}.pt")
        assert {k: saved[k] for k in made_by} == made_by and saved["score_matrix"].shape == (30, 6)
        for ext in ("json", "pt"):
            assert os.stat(out / f"{stem}.{ext}").st_mode & 0o777 == 0o644
    assert exact["cross_pairs"] == 30 * 6 > fast["cross_pairs"]


@pytest.mark.slow
def test_evaluate_cli_on_two_ranks_equals_one_process(small_eval, tmp_path) -> None:
    """``torchrun`` with 2 gloo ranks, exact and fast: the score matrix each rank half fills equals the in-process
    one, and the files are written."""
    import subprocess
    import sys

    from uniter_fast.tasks.checkpoint import save_task_model

    task = get_task("itm")
    options = task.check_options({"first_stage_dim": 16}, "test")
    torch.manual_seed(0)
    model = perturb(task.build_model(tiny_config(vocab_size=1100), options, True))
    save_task_model(model, task, options, str(tmp_path / "export"))
    for mode in ("exact", "fast"):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
        command += ["-m", "uniter_fast.evaluate", "--checkpoint", str(tmp_path / "export"), "--split", "small"]
        command += ["--txt_db", small_eval.txt_db.path, "--img_db", small_eval.img_db.path, "--eval-mode", mode]
        command += ["--top-k", "2", "--output_dir", str(tmp_path / mode)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        want = evaluate_retrieval(model, small_eval, 2048, mode, top_k=2)
        saved = torch.load(tmp_path / mode / f"small_results_{want.mode_name()}.pt")
        assert saved["txt_ids"] == want.txt_ids and saved["img_ids"] == want.img_ids
        torch.testing.assert_close(saved["score_matrix"], want.score_matrix, rtol=1e-5, atol=1e-5)
        assert (tmp_path / mode / f"small_results_{want.mode_name()}.json").is_file() and "r_mean" in proc.stdout
