"""The captured step's CPU side: fixed-shape batches (uniter_fast.data.buckets) and the step wrapper's fallback
(uniter_fast.training.capture).

The padded batch must leave every real row's arithmetic as it was: the encoder's real rows equal in float64, and the
losses and gradients of every pretraining task (real sampler batches), of VQA and of every captured fine-tuning head
(``HEADS``: random ragged batches of the task's example) equal the unpadded step's on the same batches to float32
rounding (losses 1e-5 relative, the fp32 standard; gradients 3e-6 relative over all parameters). How large that
rounding is depends on the CPU's kernels: measured up to 1.2e-7 (losses) and 1.05e-6 (gradients, ITM + WRA, whose 50
IPOT iterations carry the rounding of the encoder's sums further) on one CPU, 3.5e-6 (an ITM loss term) and 1.35e-6
(an RE step's gradients) on one with AVX-512. The capture itself needs CUDA: the last tests here
(skipped without a GPU) and the GPU suite's ``capture`` part.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
import pytest
import torch
from tasks_helpers import perturb, random_batch, random_row, tiny_config

from uniter_fast.config import UniterConfig
from uniter_fast.data import (
    DetectFeatLmdb,
    TxtTokLmdb,
    default_corpus,
)
from uniter_fast.data.buckets import (
    Buckets,
    NotCapturable,
    mean_example_tokens,
    pad_batch,
    padding_cost,
    round_coarse,
    round_up,
    shape_key,
)
from uniter_fast.data.loader import move_to_device
from uniter_fast.errors import ConfigError
from uniter_fast.finetuning.data import capture_tokens
from uniter_fast.layout import pad_masks, padded_slots
from uniter_fast.pretraining.data import bundled_batches
from uniter_fast.pretraining.model import UniterForPretraining
from uniter_fast.syncs import count_syncs
from uniter_fast.tasks import get_task
from uniter_fast.tasks.data import collate_rows
from uniter_fast.tasks.itm import add_cross_pairs, add_first_stage, distill_loss
from uniter_fast.tasks.vqa import UniterForVisualQuestionAnswering
from uniter_fast.training.capture import NOT_CAPTURED, CapturedStep, _GraphedStep, capture_blocker, flatten
from uniter_fast.training.config import RunConfig, parse_run_config

TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
HEADS = {  # fine-tuning heads on the fast path: (task, options over the task's defaults)
    "vcr": ("vcr", {}),
    "nlvr2-paired": ("nlvr2", {"model": "paired"}),
    "nlvr2-triplet": ("nlvr2", {"model": "triplet"}),
    "nlvr2-paired-attn": ("nlvr2", {"model": "paired-attn"}),
    "re": ("re", {}),
    "re-mlp": ("re", {"mlp": 2}),
    "itm": ("itm", {}),  # the ranking loss + the contrastive first stage (the defaults)
    "itm-rank": ("itm", {"first_stage_dim": 0}),  # the original's model: the ranking loss alone
    "itm-tower": ("itm", {"first_stage_tower": True}),  # the first stage on its own encoder
    "itm-tower-only": ("itm", {"first_stage_tower": True, "train_first_stage_only": True}),  # the tower alone
    "itm-distill": ("itm", {"first_stage_loss": "distill"}),  # the first stage distilled from the cross-encoder
    "itm-contrastive-distill": ("itm", {"first_stage_loss": "contrastive+distill"}),
    "itm-tower-distill-only": (  # configs/finetune-itm-tower-tiny.json's model: a tower distilled alone
        "itm",
        {"first_stage_tower": True, "train_first_stage_only": True, "first_stage_loss": "distill"},
    ),
}
SMALL = Buckets(token_multiple=128, min_rows=16, min_examples=8)
LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-5, 3e-6


def corpus_batches(kind: str, count: int = 2, budget: int = 512) -> list[dict[str, Any]]:
    """The first ``count`` token-bucket batches of the bundled corpus's ``kind`` loader, as training builds them."""
    return bundled_batches(kind, budget, count)


def as_double(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with its floating-point tensors in float64."""
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in values.items()}


def pretraining_model(dtype: torch.dtype = torch.float32) -> UniterForPretraining:
    config = UniterConfig.tiny(
        vocab_size=default_corpus().vocab_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    torch.manual_seed(0)
    return perturb(UniterForPretraining(config, fast=True), 0.02).to(dtype).train()


def step(model: torch.nn.Module, batch: dict[str, Any], task: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Forward + backward; (outputs, {name: gradient})."""
    model.zero_grad(set_to_none=True)
    out = model(batch, task)
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(
    model: torch.nn.Module, batch: dict[str, Any], task: str, grad_tol: float = GRAD_TOLERANCE, loss_atol: float = 0
) -> None:
    """The padded batch's losses and gradients equal the unpadded batch's (float32 rounding, module doc; ``loss_atol``
    for a loss that is a small difference of O(1) terms)."""
    out, grads = step(model, batch, task)
    out_fixed, grads_fixed = step(model, pad_batch(batch, SMALL), task)
    assert sorted(out) == sorted(out_fixed)
    for key in out:
        assert torch.isfinite(out_fixed[key])
        torch.testing.assert_close(out_fixed[key], out[key], rtol=LOSS_TOLERANCE, atol=loss_atol)
    assert sorted(grads) == sorted(grads_fixed)
    flat = torch.cat([g.flatten() for g in grads.values()])
    flat_fixed = torch.cat([grads_fixed[n].flatten() for n in grads])
    assert flat.norm() > 0
    assert ((flat_fixed - flat).norm() / flat.norm()).item() <= grad_tol


def head_model(head: str, data_options: Optional[dict[str, Any]] = None) -> torch.nn.Module:
    """The fast tiny model of ``head`` (``HEADS``), dropout 0, every parameter perturbed, in training mode;
    ``data_options``: those of its databases (default: those of the task's example)."""
    name, options = HEADS[head]
    task, config = get_task(name), tiny_config()
    options = {**task.check_options(options, head), **(head_options(name) if data_options is None else data_options)}
    torch.manual_seed(0)
    model = task.build_model(config, options, True)
    task.prepare_model(model, options)
    return perturb(model, 0.05).train()


def head_options(name: str) -> dict[str, Any]:
    """The data options ``Task.example`` gives task ``name`` (VCR's ``special_token_base``; NLVR2's model dropped:
    ``HEADS`` chooses it); ITM has no example."""
    if name == "itm":
        return {}
    options = get_task(name).example(tiny_config(), 1, np.random.default_rng(0))[0]
    return {k: v for k, v in options.items() if k not in get_task(name).options}


def head_batch(head: str, size: int, seed: int) -> dict[str, Any]:
    """A fresh random training batch of ``head`` with ragged lengths: ``Task.example`` of ``size`` examples (NLVR2
    triplet: each row its own example, with a target of its own; ITM: ``size`` groups of a positive and 2
    negatives, as ``ItmRankDataset`` collates them)."""
    rng = np.random.default_rng(seed)
    name = HEADS[head][0]
    if name == "itm":
        lengths = [(int(rng.integers(3, 14)), int(rng.integers(1, 10))) for _ in range(3 * size)]
        batch = random_batch(lengths, seed=seed)
        batch.update(sample_size=3, pair_rows=torch.arange(size) * 3, pair_images=torch.arange(size) % 2)
        batch = add_first_stage(batch)
        return add_cross_pairs(batch) if "distill" in HEADS[head][1].get("first_stage_loss", "") else batch
    batch = get_task(name).example(tiny_config(), size, rng, (3, 14), (1, 9))[1]
    if head == "nlvr2-triplet":
        batch["targets"] = torch.from_numpy(rng.integers(0, 2, batch["packed"]["cls_index"].numel()))
    return batch


# ------------------------------------------------------------------------------------------------- the bucketing
def test_coarse_rounding_has_four_steps_per_octave() -> None:
    assert [round_coarse(v, 16) for v in (1, 16, 17, 20, 21, 129, 160, 161, 256, 257)] == [
        16,
        16,
        20,
        20,
        24,
        160,
        160,
        192,
        256,
        320,
    ]
    for value in range(1, 3000):
        rounded = round_coarse(value, 1)
        assert value <= rounded <= 1.25 * value
    assert len({round_coarse(v, 64) for v in range(200, 500)}) == 6  # 224, 256, 320, 384, 448, 512


def test_token_counts_round_up_and_padding_sits_after_the_last_example() -> None:
    batch = corpus_batches("mlm", count=1)[0]
    packed = batch["packed"]
    fixed = pad_batch(batch, SMALL)["packed"]
    num_txt, num_img = packed["txt_ids"].numel(), packed["img_feat"].size(0)
    total, examples = num_txt + num_img, packed["cls_index"].numel()
    txt_b, img_b = round_up(num_txt, 128), round_up(num_img, 128)
    assert (fixed["txt_ids"].numel(), fixed["img_feat"].size(0)) == (txt_b, img_b)
    assert txt_b - num_txt < 128 and img_b - num_img < 128
    for key in ("txt_ids", "txt_position_ids", "txt_index", "img_feat", "img_pos_feat", "img_index", "mlm_index"):
        assert torch.equal(fixed[key][: packed[key].size(0)], packed[key]), key
    assert torch.equal(fixed["txt_ids"][num_txt:], torch.zeros(txt_b - num_txt, dtype=torch.int64))
    assert not fixed["img_feat"][num_img:].any() and not fixed["img_pos_feat"][num_img:].any()
    # padding tokens: text first, then regions, at the positions after the last real token
    assert torch.equal(fixed["txt_index"][num_txt:], torch.arange(total, total + txt_b - num_txt))
    assert torch.equal(fixed["img_index"][num_img:], torch.arange(total + txt_b - num_txt, txt_b + img_b))
    positions = torch.cat([fixed["txt_index"], fixed["img_index"]]).sort().values
    assert torch.equal(positions, torch.arange(txt_b + img_b))
    # cu_seqlens: the real bounds, dummy sequences of at most max_seqlen up to T', then empty sequences
    cu = fixed["cu_seqlens"]
    assert cu.dtype == torch.int32 and torch.equal(cu[: examples + 1], packed["cu_seqlens"])
    tail = cu[examples:].tolist()
    assert tail[-1] == txt_b + img_b and all(0 <= b - a <= SMALL.max_seqlen for a, b in zip(tail, tail[1:]))
    dummies = sum(b > a for a, b in zip(tail, tail[1:]))
    assert dummies == -(-(txt_b + img_b - total) // SMALL.max_seqlen)
    assert cu.numel() == round_coarse(examples, 8) + 2 + 1  # room for 2 * 127 padding tokens in 162-token dummies
    assert fixed["max_seqlen"] == 62 + 100
    # per-example and masked rows
    assert fixed["cls_index"].numel() == round_coarse(examples, 8) and not fixed["cls_index"][examples:].any()
    rows = packed["mlm_index"].numel()
    assert fixed["mlm_index"].numel() == round_coarse(rows, 16) == fixed["mlm_labels"].numel()
    assert torch.equal(fixed["mlm_labels"][:rows], packed["mlm_labels"]) and not fixed["mlm_labels"][rows:].any()
    assert torch.equal(fixed["mlm_weights"], (torch.arange(round_coarse(rows, 16)) < rows).float())


def test_masked_regions_targets_and_example_weights() -> None:
    batch = corpus_batches("mrckl", count=1)[0]
    fixed = pad_batch(batch, SMALL)
    rows, examples = batch["feat_targets"].size(0), batch["packed"]["cls_index"].numel()
    padded_rows = round_coarse(rows, 16)
    for key in ("feat_targets", "label_targets"):
        assert fixed[key].shape == (padded_rows, batch[key].size(1))
        assert torch.equal(fixed[key][:rows], batch[key]) and not fixed[key][rows:].any()
    assert torch.equal(fixed["packed"]["mrm_weights"], (torch.arange(padded_rows) < rows).float())
    num_img = batch["packed"]["img_masks"].numel()
    assert torch.equal(fixed["packed"]["img_masks"][:num_img], batch["packed"]["img_masks"])
    assert not fixed["packed"]["img_masks"][num_img:].any()
    assert torch.equal(fixed["example_weights"], (torch.arange(round_coarse(examples, 8)) < examples).float())
    assert "txt_lens" not in fixed and "num_bbs" not in fixed  # host-only keys stay out of a captured step


def test_itm_ot_grids_are_fixed_and_padding_goes_to_the_spare_row() -> None:
    batch = corpus_batches("itm", count=1)[0]
    fixed = pad_batch(batch, SMALL)
    ot, packed = fixed["ot_inputs"], fixed["packed"]
    examples = batch["packed"]["cls_index"].numel()
    padded_examples = round_coarse(examples, 8)
    assert ot["txt_pad"].shape == (padded_examples, 62) and ot["img_pad"].shape == (padded_examples, 100)
    txt_lens, img_lens = batch["ot_inputs"]["txt_lens"], batch["ot_inputs"]["img_lens"]
    assert torch.equal(ot["txt_lens"], torch.cat([txt_lens, torch.ones(padded_examples - examples, dtype=torch.long)]))
    assert torch.equal(ot["img_lens"], torch.cat([img_lens, torch.ones(padded_examples - examples, dtype=torch.long)]))
    txt_pad, img_pad = pad_masks(ot["txt_lens"], ot["img_lens"], 62, 100)
    assert torch.equal(ot["txt_pad"], txt_pad) and torch.equal(ot["img_pad"], img_pad)
    num_txt = int(txt_lens.sum())
    assert torch.equal(packed["txt_slot"][:num_txt], padded_slots(txt_lens, 62))
    assert torch.equal(
        packed["txt_slot"][num_txt:], torch.full_like(packed["txt_slot"][num_txt:], padded_examples * 62)
    )
    num_img = int(img_lens.sum())
    assert torch.equal(
        packed["img_slot"][num_img:], torch.full_like(packed["img_slot"][num_img:], padded_examples * 100)
    )
    assert torch.equal(fixed["targets"][:examples], batch["targets"]) and not fixed["targets"][examples:].any()


def test_head_keys_are_padded_in_whole_examples() -> None:
    """NLVR2 pairs and ITM groups stay whole; the grids widen to the buckets' widths with masked cells, a padded row
    keeps cell 0 unmasked; ITM's first-stage layouts get one sequence per padded group."""
    batch = head_batch("nlvr2-paired-attn", 5, 0)  # 10 sequences -> 16 (min_examples): 8 pairs, 3 of them padding
    fixed = pad_batch(batch, Buckets(token_multiple=128, min_rows=16, min_examples=16))
    packed, out = batch["packed"], fixed["packed"]
    assert out["cls_index"].numel() == 16 and fixed["example_weights"].tolist() == [1.0] * 5 + [0.0] * 3
    assert torch.equal(fixed["targets"], torch.cat([batch["targets"], torch.zeros(3, dtype=torch.long)]))
    rows, width = packed["seq_index"].shape
    assert out["seq_index"].shape == out["seq_pad"].shape == (16, 162)
    assert torch.equal(out["seq_index"][:rows, :width], packed["seq_index"]) and not out["seq_index"][:, width:].any()
    assert torch.equal(out["seq_pad"][:rows, :width], packed["seq_pad"]) and out["seq_pad"][:rows, width:].all()
    assert not out["seq_pad"][rows:, 0].any() and out["seq_pad"][rows:, 1:].all()
    with pytest.raises(NotCapturable, match="10 sequences do not form examples of 3"):
        pad_batch({**batch, "targets": batch["targets"][:3]}, SMALL)

    re_batch = head_batch("re", 3, 0)
    re_fixed = pad_batch(re_batch, SMALL)
    assert re_fixed["obj_masks"].shape == re_fixed["packed"]["region_index"].shape == (8, 100)
    assert torch.equal(re_fixed["obj_masks"][:3, : re_batch["obj_masks"].size(1)], re_batch["obj_masks"])

    itm = head_batch("itm", 3, 0)  # 9 sequences -> 10 (coarse) -> 12: 4 groups of 3
    itm_fixed = pad_batch(itm, SMALL)
    assert itm_fixed["packed"]["cls_index"].numel() == 12 and itm_fixed["example_weights"].tolist() == [1, 1, 1, 0]
    stage = itm_fixed["first_stage"]
    assert stage["txt"]["cls_index"].numel() == stage["img"]["cls_index"].numel() == 4
    assert stage["img_counts"].tolist() == itm["first_stage"]["img_counts"].tolist() + [1.0]
    real = itm["first_stage"]["img_rows"].numel()
    assert stage["img_rows"][real:].eq(4).all() and stage["img_rows"].numel() == stage["img"]["img_feat"].size(0)
    assert stage["txt"]["txt_ids"].numel() % 128 == 0 and stage["img"]["img_feat"].size(0) % 128 == 0
    assert itm_fixed["sample_size"] == 3 and "pair_rows" not in itm_fixed and itm_fixed["pair_images"].numel() == 4


def test_the_distillation_grid_is_padded_to_the_padded_groups() -> None:
    """ITM's teacher grid (3 groups -> 4, 9 pairs -> 16 sequences): token counts on a multiple of the batch's times
    G' / sample_size, padding regions read row 0, ``grid_index`` places pair i * 3 + j at cell i * 4 + j; the padded
    batch's teacher scores are the unpadded ones in the real cells, and pair 0's in the padded ones."""
    batch = head_batch("itm-distill", 3, 0)
    fixed = pad_batch(batch, SMALL)
    cross, grid = batch["cross_pairs"], fixed["cross_pairs"]
    assert sorted(grid) == ["grid_index", "packed", "regions"]  # the padded layout's attn_masks / gather_index dropped
    assert grid["packed"]["cls_index"].numel() == 16 and grid["grid_index"].numel() == 16
    multiple = SMALL.token_multiple * (4 // 3)
    assert grid["packed"]["txt_ids"].numel() % multiple == 0 and grid["regions"].numel() % multiple == 0
    real = cross["regions"].numel()
    assert torch.equal(grid["regions"][:real], cross["regions"]) and not grid["regions"][real:].any()
    want = torch.zeros(4, 4, dtype=torch.int64)
    want[:3, :3] = torch.arange(9).view(3, 3)
    assert torch.equal(grid["grid_index"], want.flatten())
    model = head_model("itm-distill")
    scores, padded_scores = model.teacher_scores(batch), model.teacher_scores(fixed)
    assert padded_scores.shape == (4, 4)
    torch.testing.assert_close(padded_scores[:3, :3], scores, rtol=1e-6, atol=1e-6)
    first = padded_scores[0, 0]  # pair 0's score in the padded batch
    assert torch.equal(padded_scores[3], first.expand(4)) and torch.equal(padded_scores[:3, 3], first.expand(3))


def test_weighted_distillation_loss_is_the_real_groups_loss() -> None:
    """``distill_loss`` with ``weights``: padded groups (weight 0) with arbitrary embeddings and teacher scores give
    the loss and gradients of the real groups alone."""
    gen = torch.Generator().manual_seed(3)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=1).requires_grad_()
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=gen), dim=1).requires_grad_()
    teacher = torch.randn(5, 5, generator=gen) * 3
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    padded = distill_loss(txt, img, teacher, 0.05, 0.25, weights)
    padded_grads = torch.autograd.grad(padded, (txt, img))
    real = distill_loss(txt[:3], img[:3], teacher[:3, :3], 0.05, 0.25)
    real_grads = torch.autograd.grad(real, (txt, img))
    torch.testing.assert_close(padded, real, rtol=1e-6, atol=0)
    for got, want in zip(padded_grads, real_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert not got[3:].any()
    all_real = distill_loss(txt, img, teacher, 0.05, 0.25, torch.ones(5))
    torch.testing.assert_close(all_real, distill_loss(txt, img, teacher, 0.05, 0.25), rtol=1e-6, atol=0)


def test_batches_of_one_bucket_share_one_shape_key() -> None:
    batches = corpus_batches("mlm", count=4)
    coarse = Buckets(token_multiple=1024, min_rows=256, min_examples=64)
    keys = {shape_key(pad_batch(b, coarse)) for b in batches}
    assert len(keys) == 1
    cost = padding_cost(batches, coarse)
    assert cost["shapes"] == 1 and cost["padded_tokens"] == 4 * 2048 and cost["ratio"] > 1


def test_what_cannot_be_padded_is_refused() -> None:
    batch = corpus_batches("mlm", count=1)[0]
    with pytest.raises(NotCapturable, match="packed layout"):
        pad_batch({"task": "mlm", "input_ids": torch.zeros(2, 3)}, SMALL)
    with pytest.raises(NotCapturable, match="'surprise'"):
        pad_batch({**batch, "surprise": torch.zeros(3)}, SMALL)
    with pytest.raises(NotCapturable, match="longer than the buckets' max_seqlen 12"):
        pad_batch(batch, Buckets(max_txt_len=4, max_bb=8))
    with pytest.raises(ConfigError, match="token_multiple must be an integer >= 1"):
        Buckets(token_multiple=0)
    assert Buckets.for_run(60, 100, 36, 10240) == Buckets(token_multiple=512, max_txt_len=62, max_bb=100)
    assert Buckets.for_run(40, 10, 36, 1024) == Buckets(token_multiple=64, max_txt_len=42, max_bb=36)


class LengthsDataset:
    """A task dataset of examples with known (text, regions) lengths, collated by the one collate."""

    def __init__(self, lengths: list[tuple[int, int]]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self.lengths[index]

    def collate(self, items: list[tuple[int, int]]) -> dict[str, Any]:
        return random_batch(items)


def test_mean_example_tokens_is_a_seeded_sample_of_the_packed_tokens() -> None:
    lengths = [(3 + i % 7, 2 * (i % 5)) for i in range(40)]
    dataset = LengthsDataset(lengths)
    assert mean_example_tokens(dataset, 8, seed=0, count=100) == np.mean([t + n for t, n in lengths])
    sample = np.random.default_rng(3).permutation(40)[:10]
    assert mean_example_tokens(dataset, 4, seed=3, count=10) == np.mean([sum(lengths[i]) for i in sample])
    with pytest.raises(ValueError, match="no example"):
        mean_example_tokens(LengthsDataset([]), 8, seed=0)


def test_by_example_heads_size_their_buckets_from_the_tokens_their_batches_hold(tmp_path) -> None:
    """RE and ITM count examples in train_batch_size: their buckets follow train_batch_size x the packed tokens of
    an example (an ITM group: all its pairs), not the 64-token floor; token-counting tasks keep their budget."""
    from itm_helpers import small_itm_db

    from uniter_fast.tasks.itm import ItmRankDataset

    txt_path, img_path = small_itm_db(str(tmp_path / "itm"), 8)
    dataset = ItmRankDataset(TxtTokLmdb(txt_path, 60), DetectFeatLmdb(img_path), negative_size=2, seed=1)
    groups = [dataset.collate([dataset[i]]) for i in range(len(dataset))]
    mean = np.mean([int(g["txt_lens"].sum() + g["num_bbs"].sum()) for g in groups])  # 5 pairs per group
    tokens = capture_tokens(get_task("itm"), [dataset], 40, seed=0)
    assert tokens == round(40 * mean) and tokens > 20 * 40
    assert Buckets.for_run(60, 100, 36, tokens).token_multiple == max(64, tokens // 20 // 64 * 64) > 64
    assert Buckets.for_run(60, 100, 36, 40).token_multiple == 64  # the old budget: the floor
    assert capture_tokens(get_task("vqa"), [dataset], 4096, seed=0) is None


@pytest.mark.parametrize(
    ("config", "capture", "expected"), [("re", True, 326), ("re", False, None), ("ve", True, None)]
)
def test_the_finetuning_recipe_gives_the_trainer_the_tokens_of_a_batch(
    config: str, capture: bool, expected: Optional[int], tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """finetune() hands fit the tokens of a by-examples batch (the bundled RE set's 32 expressions hold about 326,
    bench/capture_padding.py --heads); None for a token-counting task (its budget) and without capture."""
    import json
    import os

    from uniter_fast.finetuning import run as recipe
    from uniter_fast.finetuning.config import parse_finetune_config
    from uniter_fast.training.run import Run

    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    with open(os.path.join(configs, f"finetune-{config}-tiny.json"), encoding="utf-8") as f:
        raw = {k: v for k, v in json.load(f).items() if k != "checkpoint"}
    cfg = parse_finetune_config({**raw, "capture": capture, "output_dir": str(tmp_path)}, configs, "cfg.json")
    given = {}

    def fit(*args: Any, **kwargs: Any) -> None:
        given.update(kwargs)
        raise InterruptedError

    monkeypatch.setattr(recipe, "fit", fit)
    with pytest.raises(InterruptedError):
        recipe.finetune(cfg, Run(0, 1, 0, {"gradient_accumulation_steps": 1}))
    assert given["capture_tokens"] == expected


def test_the_trainer_sizes_its_buckets_from_the_tokens_it_is_given(tmp_path) -> None:
    from uniter_fast.training.loop import Trainer

    engine, cfg = FakeEngine(module=pretraining_model()), RunConfig(output_dir=str(tmp_path), capture=True)
    default = Trainer(engine, cfg, None, None, None)
    assert default.captured.buckets == Buckets.for_run(60, 100, 36, cfg.train_batch_size)  # 4096 tokens: 192
    given = Trainer(engine, cfg, None, None, None, capture_tokens=10240)
    assert given.captured.buckets == Buckets(token_multiple=512, max_txt_len=62, max_bb=100)


# ------------------------------------------------------------------------------------------------- the same step
def test_padding_changes_no_real_row_of_the_encoder() -> None:
    torch.manual_seed(0)
    model = perturb(UniterForVisualQuestionAnswering(tiny_config(), num_answer=7, fast=True)).double().train()
    batch = random_batch([(6, 4), (1, 9), (12, 0), (3, 10), (30, 2)], seed=3)
    batch["packed"] = {
        k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch["packed"].items()
    }
    fixed = pad_batch(batch, SMALL)
    out = model.uniter.forward_packed(batch["packed"], check_values=True)
    out_fixed = model.uniter.forward_packed(fixed["packed"], check_values=True)
    assert out_fixed.size(0) == 128 + 128
    torch.testing.assert_close(out_fixed[: out.size(0)], out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("task", TASKS)
def test_padded_step_equals_the_unpadded_step(task: str) -> None:
    model = pretraining_model()
    for batch in corpus_batches(task):
        assert_same_step(model, batch, task)


def test_padded_rows_with_type_ids_and_mlm_labels_step_as_unpadded() -> None:
    """Task rows through the one collate (both layouts, type ids, MLM labels: VCR's second-stage pretraining)."""
    model = pretraining_model()
    gen = torch.Generator().manual_seed(5)
    rows = []
    for txt, num_bb in ((9, 12), (14, 3), (5, 20)):
        row = random_row(gen, txt, num_bb, vocab=100, txt_types=[0] * txt, img_type=1)
        labels = torch.full((txt,), -1)
        labels[1 : txt - 1 : 3] = row["input_ids"][1 : txt - 1 : 3]
        rows.append({**row, "txt_labels": labels})
    batch = collate_rows(rows, "mlm")
    fixed = pad_batch(batch, SMALL)
    assert fixed["packed"]["txt_type_ids"].numel() == 128 and fixed["packed"]["img_type_ids"].numel() == 128
    assert_same_step(model, batch, "mlm")


def test_padded_vqa_step_equals_the_unpadded_step() -> None:
    torch.manual_seed(0)
    model = perturb(UniterForVisualQuestionAnswering(tiny_config(), num_answer=7, fast=True), 0.05).train()
    for seed, lengths in enumerate([[(6, 4), (9, 7), (3, 10), (12, 2)], [(20, 30), (2, 1), (7, 0)]]):
        batch = random_batch(lengths, seed=seed)
        batch["targets"] = torch.rand(len(lengths), 7, generator=torch.Generator().manual_seed(seed))
        assert_same_step(model, batch, "vqa")


@pytest.mark.parametrize("head", sorted(HEADS))
def test_padded_head_step_equals_the_unpadded_step(head: str) -> None:
    """Every captured fine-tuning head: its losses and gradients on a fixed-shape batch equal the unpadded fast
    batch's (padding sequences in whole examples, grids widened, rows weighted 0)."""
    model = head_model(head)
    assert model.captures
    padded_examples = 0
    sizes = (2, 3, 5) if head.startswith("itm-tower") else (1, 3, 5)  # their only loss needs 2 groups
    for seed, size in enumerate(sizes):
        batch = head_batch(head, size, seed)
        padded_examples += int((pad_batch(batch, SMALL)["example_weights"] == 0).sum())
        # ITM's losses run in float32 (a float64 model's still differ by 5e-7): held to the tolerances as everywhere
        assert_same_step(model, batch, HEADS[head][0])
    assert padded_examples > 0


def bundled_head_batches(head: str, tmp_path: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Two training batches of the bundled set of ``head``'s task, collated by its dataset (3 and 5 examples), and
    the data options its model needs."""
    from itm_helpers import small_itm_db

    from uniter_fast.data.re_db import ReTxtTokLmdb
    from uniter_fast.data.vcr_db import VcrTxtTokLmdb
    from uniter_fast.tasks.bundled import resolve_bundled
    from uniter_fast.tasks.data import DbCache
    from uniter_fast.tasks.itm import ItmRankDataset
    from uniter_fast.tasks.nlvr2 import Nlvr2Dataset
    from uniter_fast.tasks.re import ReDataset
    from uniter_fast.tasks.vcr import VcrDataset

    settings = type("S", (), dict(max_txt_len=60, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36))()
    dbs, options = DbCache(settings), {}
    det = dbs.img(resolve_bundled("bundled:pool/img_det"))
    gt = dbs.img(resolve_bundled("bundled:pool/img_gt"), gt=True)
    name = HEADS[head][0]
    if name == "vcr":
        txt = dbs.txt(VcrTxtTokLmdb, resolve_bundled("bundled:vcr/txt_train"), True, task="qar")
        dataset, options = VcrDataset(txt, gt, det), {"special_token_base": txt.special_token_base}
    elif name == "nlvr2":
        txt = dbs.txt(TxtTokLmdb, resolve_bundled("bundled:nlvr2/txt_train"), True)
        dataset = Nlvr2Dataset(txt, det, paired=head != "nlvr2-triplet")
    elif name == "re":
        dataset = ReDataset(dbs.txt(ReTxtTokLmdb, resolve_bundled("bundled:re/txt_train"), True), gt, gt=True)
    else:
        txt_path, img_path = small_itm_db(str(tmp_path / "itm"), 8)
        txt_db, img_db = TxtTokLmdb(txt_path, 60), DetectFeatLmdb(img_path)
        dataset = ItmRankDataset(txt_db, img_db, negative_size=2, seed=1, cross_pairs=head == "itm-distill")
    return [
        dataset.collate([dataset[i] for i in range(start, start + size)]) for start, size in ((0, 3), (7, 5))
    ], options


@pytest.mark.parametrize("head", ["vcr", "nlvr2-paired-attn", "nlvr2-triplet", "re", "itm", "itm-distill"])
def test_padded_head_step_on_bundled_batches_equals_the_unpadded_step(head: str, tmp_path) -> None:
    """The datasets' own collates (every key a training batch carries) through pad_batch; in float64 the padded step
    equals the unpadded one to 1e-12, so what fp32 shows is rounding (ITM's ranking gradients, sums of cancelling
    hinge terms, reach 1.5e-6 on these batches: held to GRAD_TOLERANCE)."""
    batches, options = bundled_head_batches(head, tmp_path)
    model, name = head_model(head, options), HEADS[head][0]
    # the distillation's KL of nearly equal softmaxes here (about 2e-3) is a sum of O(1) terms that cancel: its fp32
    # rounding is absolute (7e-8 measured), not relative to the small result; its gradients carry the teacher's
    # rounding (a no-grad forward of another grid layout) divided by the temperatures (8.2e-6 measured; 2e-15 in
    # float64 below)
    distill = head == "itm-distill"
    for batch in batches:
        assert_same_step(model, batch, name, 2e-5 if distill else GRAD_TOLERANCE, 1e-6 if distill else 0)
    model.double()
    for batch in batches:
        assert_same_step(model, {**batch, "packed": as_double(batch["packed"])}, name, 1e-12)


def test_heads_that_read_the_host_are_not_captured() -> None:
    """RE's rank loss and ITM's hard negatives (module doc of uniter_fast.training.capture)."""
    uncaptured = [("re", {"train_loss": "rank"}), ("itm", {"hard_neg_size": 1})]
    for name, options in uncaptured:
        task = get_task(name)
        model = task.build_model(tiny_config(), task.check_options(options, name), True)
        assert not model.captures
        assert capture_blocker(model, torch.device("cuda")) == f"{type(model).__name__} {NOT_CAPTURED}"
    assert (
        get_task("itm")
        .build_model(tiny_config(), get_task("itm").check_options({"first_stage_weight": 0}, ""), True)
        .captures
    )
    with pytest.raises(NotCapturable, match="'sides'"):  # itm-hn batches: two sides a group
        pad_batch({**head_batch("itm", 2, 0), "sides": 2}, SMALL)


def test_padded_bf16_step_stays_within_bf16_rounding() -> None:
    """bf16: the padded step's loss and gradients are as close to the float64 step as the unpadded bf16 step's (at
    most twice its error, or 1e-2)."""
    reference, model = pretraining_model(torch.float64), pretraining_model(torch.bfloat16)
    for task in ("mlm", "mrfr", "itm"):
        batch = corpus_batches(task, count=1)[0]
        if task == "itm":  # OT takes no float64: compare the itm-only objective
            reference.itm_ot_lambda = model.itm_ot_lambda = 0.0
        exact, exact_grads = step(reference, {**as_double(batch), "packed": as_double(batch["packed"])}, task)
        flat = torch.cat([g.flatten() for g in exact_grads.values()])
        errors = []
        for candidate in (batch, pad_batch(batch, SMALL)):
            out, grads = step(model, candidate, task)
            mine = torch.cat([grads[n].double().flatten() for n in exact_grads])
            loss_error = abs(out["loss"].double() - exact["loss"]) / exact["loss"].abs()
            errors.append((float(loss_error), float((mine - flat).norm() / flat.norm())))
        (loss_plain, grad_plain), (loss_padded, grad_padded) = errors
        assert loss_padded <= max(2 * loss_plain, 1e-2) and grad_padded <= max(2 * grad_plain, 1e-2), errors


@pytest.mark.parametrize("task", ("mlm", "mrc"))
def test_the_padded_step_has_no_host_sync(task: str) -> None:
    model = pretraining_model()
    fixed = pad_batch(corpus_batches(task, count=1)[0], SMALL)
    model(fixed, task)["loss"].backward()
    assert count_syncs(lambda: model(fixed, task)["loss"].backward()) == (0, [])


@pytest.mark.parametrize("head", ["nlvr2-paired-attn", "re", "itm", "vcr"])
def test_the_padded_head_step_has_no_host_sync(head: str) -> None:
    model, name = head_model(head), HEADS[head][0]
    fixed = pad_batch(head_batch(head, 3, 0), SMALL)
    model(fixed, name)["loss"].backward()
    assert count_syncs(lambda: model(fixed, name)["loss"].backward()) == (0, [])


# ------------------------------------------------------------------------------------------------- the wrapper
def test_flatten_rebuilds_the_batch() -> None:
    batch = pad_batch(corpus_batches("itm", count=1)[0], SMALL)
    tensors, rebuild = flatten(batch)
    assert all(isinstance(t, torch.Tensor) for t in tensors) and len(tensors) == 16
    again = rebuild([t.clone() for t in tensors])
    assert shape_key(again) == shape_key(batch) and again["task"] == "itm"
    assert again["packed"]["max_seqlen"] == 162 and torch.equal(
        again["packed"]["txt_slot"], batch["packed"]["txt_slot"]
    )


def test_on_cpu_the_step_runs_eagerly_and_says_why_once(caplog: pytest.LogCaptureFixture) -> None:
    model = pretraining_model()
    batches = corpus_batches("mlm")
    with caplog.at_level(logging.WARNING, logger="uniter_fast.training.capture"):
        captured = CapturedStep(model, torch.device("cpu"), SMALL)
        outs = [captured(b, "mlm") for b in batches]
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["capture: off (device cpu: CUDA graphs need a CUDA device); the training step runs uncaptured"]
    for batch, out in zip(batches, outs):
        assert torch.equal(out["loss"], model(batch, "mlm")["loss"])  # the unpadded batch, exactly
    assert captured.graphs == {}


class FakeEngine:
    """What capture_blocker and the Trainer's forward read of a DeepSpeed engine."""

    def __init__(self, zero3: bool = False, autocast: bool = False, module: Any = None) -> None:
        self.zero3, self.autocast, self.module, self.device = zero3, autocast, module, torch.device("cpu")

    def __call__(self, batch: dict[str, Any], task: str) -> dict[str, torch.Tensor]:
        return self.module(batch, task)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        loss.backward()

    def zero_optimization_partition_weights(self) -> bool:
        return self.zero3

    def torch_autocast_enabled(self) -> bool:
        return self.autocast


def test_a_replay_runs_inside_the_engine_forward_and_accumulates_gradients() -> None:
    model = pretraining_model()
    calls = []

    class CountingEngine(FakeEngine):
        def __call__(self, batch: dict[str, Any], task: str) -> dict[str, torch.Tensor]:
            calls.append(sorted(batch))
            return super().__call__(batch, task)

    class Uncaptured(_GraphedStep):
        """What capture records, run as it is: the model's class forward (a graph never calls the instance's)."""

        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = UniterForPretraining.forward(self.model, self.rebuild(tensors), self.task)
            self.keys = sorted(out)
            return tuple(out[key] for key in self.keys)

    captured = CapturedStep(model, torch.device("cpu"), SMALL, CountingEngine(module=model))
    captured.blocker = None  # as on a GPU, with the uncaptured step standing in for the graph
    captured._capture = lambda tensors, rebuild, task: Uncaptured(model, rebuild, task)
    batches = corpus_batches("mrc", count=2)
    for batch in batches + batches:
        model.zero_grad(set_to_none=True)
        out = captured(batch, "mrc")
        out["loss"].backward()
        first = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        captured(batch, "mrc")["loss"].backward()  # a second micro-batch adds to .grad
        expected, grads = step(model, pad_batch(batch, SMALL), "mrc")
        assert torch.equal(out["loss"], expected["loss"])
        assert sorted(first) == sorted(grads)
        for name, grad in grads.items():
            torch.testing.assert_close(first[name], grad, rtol=0, atol=0)
    assert calls == [["example_weights", "feat_targets", "label_targets", "packed", "task"]] * 8
    assert "forward" not in vars(model)  # the model's own forward is back
    assert len(captured.graphs) == len({shape_key(pad_batch(b, SMALL)) for b in batches})
    reached = {id(p) for p in captured.reached["mrc"]}
    assert id(model.region_classifier.output.weight) in reached and id(model.itm_output.weight) not in reached


@pytest.mark.parametrize("head", ["itm", "nlvr2-paired-attn", "re"])
def test_a_head_step_goes_through_the_wrapper(head: str) -> None:
    """The wrapper's flatten / rebuild of a head's fixed-shape batch (nested first-stage layouts, grids, constants):
    the step it replays is the padded batch's eager step."""
    model, name = head_model(head), HEADS[head][0]

    class Uncaptured(_GraphedStep):
        def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = type(self.model).forward(self.model, self.rebuild(tensors), self.task)
            self.keys = sorted(out)
            return tuple(out[key] for key in self.keys)

    captured = CapturedStep(model, torch.device("cpu"), SMALL)
    captured.blocker = None
    captured._capture = lambda tensors, rebuild, task: Uncaptured(model, rebuild, task)
    batch = head_batch(head, 3, 2)
    model.zero_grad(set_to_none=True)
    out = captured(batch, name)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    expected, expected_grads = step(model, pad_batch(batch, SMALL), name)
    assert torch.equal(out["loss"], expected["loss"]) and sorted(grads) == sorted(expected_grads)
    assert all(torch.equal(grads[n], g) for n, g in expected_grads.items())


def test_every_reason_not_to_capture_is_named() -> None:
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    fast = pretraining_model()
    assert capture_blocker(fast, cuda) is None and capture_blocker(fast, cuda, FakeEngine()) is None
    assert "CUDA graphs need a CUDA device" in capture_blocker(fast, torch.device("cpu"))
    reference = UniterForPretraining(UniterConfig.tiny(), fast=False)
    assert "fast: false" in capture_blocker(reference, cuda)
    from uniter_fast.tasks.re import UniterForReferringExpressionComprehension

    rank = UniterForReferringExpressionComprehension(UniterConfig.tiny(), loss="rank", fast=True)
    assert capture_blocker(rank, cuda) == f"UniterForReferringExpressionComprehension {NOT_CAPTURED}"
    assert "ZeRO-3" in capture_blocker(fast, cuda, FakeEngine(zero3=True))
    assert "torch_autocast" in capture_blocker(fast, cuda, FakeEngine(autocast=True))


def test_the_trainer_steps_through_the_captured_step(tmp_path) -> None:
    from uniter_fast.training.adversarial import plain_step
    from uniter_fast.training.loop import Trainer

    model = pretraining_model()
    engine = FakeEngine(module=model)
    batch = corpus_batches("mrfr", count=1)[0]
    plain = Trainer(engine, RunConfig(output_dir=str(tmp_path)), None, None, None)
    assert plain.captured is None
    trainer = Trainer(engine, RunConfig(output_dir=str(tmp_path), capture=True), None, None, None)
    assert trainer.captured.buckets == Buckets(token_multiple=192, max_txt_len=62, max_bb=100)  # 4096 tokens
    assert trainer.captured.blocker == "device cpu: CUDA graphs need a CUDA device"
    captured = trainer.run_micro_batch(batch, "mrfr")
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    uncaptured = plain.run_micro_batch(batch, "mrfr")
    assert torch.equal(captured["loss"], uncaptured["loss"])
    assert grads and all(torch.equal(g, dict(model.named_parameters())[n].grad) for n, g in grads.items())
    with pytest.raises(ConfigError, match="capture"):  # a run with its own micro-batch step is not captured
        Trainer(engine, RunConfig(output_dir=str(tmp_path), capture=True), None, None, None, micro_step=plain_step)


def test_the_run_config_option_is_checked(tmp_path) -> None:
    cfg = parse_run_config(RunConfig, {"output_dir": "out", "capture": True}, "run.json", str(tmp_path))
    assert cfg.capture is True and parse_run_config(RunConfig, {"output_dir": "o"}, "r", str(tmp_path)).capture is False
    with pytest.raises(ConfigError, match="run.json: capture must be true or false, got 'yes'"):
        parse_run_config(RunConfig, {"output_dir": "out", "capture": "yes"}, "run.json", str(tmp_path))
    with pytest.raises(ConfigError, match="capture needs the fast path"):
        parse_run_config(RunConfig, {"output_dir": "out", "capture": True, "fast": False}, "run.json", str(tmp_path))


# ------------------------------------------------------------------------------------------------- on a GPU
def assert_replays_eager(
    model: torch.nn.Module, captured: CapturedStep, batches: list[dict], task: str
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Each host batch through ``captured`` (each shape captured once, then replayed) equals the eager step on the
    same padded batch: loss and every parameter gradient. Returns the last batch and its eager gradients."""
    params = dict(model.named_parameters())
    for batch in batches:
        eager, eager_grads = step(model, move_to_device(pad_batch(batch, SMALL), captured.device), task)
        model.zero_grad(set_to_none=True)
        out = captured(batch, task)
        out["loss"].backward()
        assert captured.blocker is None
        torch.testing.assert_close(out["loss"], eager["loss"], rtol=1e-6, atol=0)
        for name, grad in eager_grads.items():
            torch.testing.assert_close(params[name].grad, grad, rtol=1e-5, atol=1e-7)
    return batch, eager_grads


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU tests above cover the rest")
def test_captured_step_replays_the_eager_losses_and_gradients() -> None:
    device = torch.device("cuda")
    model = pretraining_model().to(device)
    captured = CapturedStep(model, device, SMALL)
    params = dict(model.named_parameters())
    for task in TASKS:
        batch, eager_grads = assert_replays_eager(model, captured, corpus_batches(task, count=3) * 2, task)
        # accumulation over micro-batches: a second replay adds to .grad (never overwrites the first's)
        captured(batch, task)["loss"].backward()
        for name, grad in eager_grads.items():
            torch.testing.assert_close(params[name].grad, 2 * grad, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU tests above cover the rest")
@pytest.mark.parametrize("head", sorted(HEADS))
def test_captured_head_step_replays_the_eager_step(head: str) -> None:
    device, name = torch.device("cuda"), HEADS[head][0]
    model = head_model(head).to(device)
    captured = CapturedStep(model, device, SMALL)
    assert_replays_eager(
        model, captured, [head_batch(head, size, seed) for seed, size in enumerate((1, 3, 5))] * 2, name
    )
