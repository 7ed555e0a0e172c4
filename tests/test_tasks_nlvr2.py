"""NLVR2 (paired, triplet, paired-attn): original keys, the 3-row type table, each variant's scores and loss against
hand-written formulas (the paired-attn attention written out), original checkpoints, fast vs reference, the data
layout and errors, accuracy / consistency on hand-computed cases, and learning on the bundled set."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tasks_helpers import (
    compare_fast_reference,
    encoder_keys,
    encoder_rows,
    learn_subset,
    original_checkpoint,
    perturb,
    random_row,
    tiny_config,
)
from tests.test_tasks_vqa import _npz_dir, _vocab
from uniter_fast.build import main as build_main
from uniter_fast.data import TxtDbWriter, TxtTokLmdb
from uniter_fast.errors import DataError
from uniter_fast.tasks import get_task
from uniter_fast.tasks.bundled import resolve_bundled
from uniter_fast.tasks.checkpoint import load_task_model
from uniter_fast.tasks.data import DbCache, collate_rows
from uniter_fast.tasks.nlvr2 import MODELS, Nlvr2Dataset, add_pair_layout, consistency

ATTN_KEYS = [
    "attn1.in_proj_weight",
    "attn1.in_proj_bias",
    "attn1.out_proj.weight",
    "attn1.out_proj.bias",
    "attn2.in_proj_weight",
    "attn2.in_proj_bias",
    "attn2.out_proj.weight",
    "attn2.out_proj.bias",
    "fc.0.weight",
    "fc.0.bias",
    "attn_pool.fc.0.weight",
    "attn_pool.fc.0.bias",
]
SETTINGS = type("S", (), dict(max_txt_len=60, conf_th=0.2, max_bb=100, min_bb=10, num_bb=36))()


def model(variant: str, fast: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    net = MODELS[variant](tiny_config(), fast=fast)
    get_task("nlvr2").prepare_model(net, {"model": variant})
    return perturb(net)


def pair_batch(paired: bool, lengths=((5, 4, 6), (8, 7, 3), (3, 10, 9)), seed: int = 0) -> dict:
    """Random (text, left regions, right regions) examples collated as the NLVR2 dataset does."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for t, n1, n2 in lengths:
        left, right = random_row(gen, t, n1, img_type=1), random_row(gen, t, n2, img_type=2)
        right["input_ids"] = left["input_ids"]
        if paired:
            rows += [left, right]
        else:
            rows.append(
                {
                    "input_ids": left["input_ids"],
                    "img_feat": torch.cat([left["img_feat"], right["img_feat"]]),
                    "img_pos_feat": torch.cat([left["img_pos_feat"], right["img_pos_feat"]]),
                    "img_type_ids": torch.cat([left["img_type_ids"], right["img_type_ids"]]),
                }
            )
    batch = collate_rows(rows, "nlvr2")
    if paired:
        add_pair_layout(batch)
    batch["targets"] = torch.tensor([1, 0, 1][: len(lengths)])
    return batch


def double(batch: dict) -> dict:
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


@pytest.mark.parametrize("variant", ["paired", "triplet", "paired-attn"])
def test_keys_and_type_table(variant: str) -> None:
    net = model(variant)
    head = (ATTN_KEYS if variant == "paired-attn" else []) + ["nlvr2_output.weight", "nlvr2_output.bias"]
    assert list(net.state_dict()) == encoder_keys(tiny_config()) + head
    assert net.uniter.embeddings.token_type_embeddings.weight.shape[0] == 3
    assert net.nlvr2_output.in_features == (64 if variant == "triplet" else 128)


def test_init_type_embedding_copies_the_image_row() -> None:
    torch.manual_seed(0)
    net = perturb(MODELS["paired"](tiny_config()))
    old = net.uniter.embeddings.token_type_embeddings.weight.detach().clone()
    get_task("nlvr2").prepare_model(net, {})
    new = net.uniter.embeddings.token_type_embeddings.weight
    torch.testing.assert_close(new[:2], old)
    torch.testing.assert_close(new[2], old[1])
    assert net.config.type_vocab_size == 3
    batch = pair_batch(True)
    before = encoder_rows(net, batch)
    with torch.no_grad():
        new[2].add_(torch.randn_like(new[2]))  # only the right image's regions (type 2) see row 2
    after = encoder_rows(net, batch)
    torch.testing.assert_close(after[0::2], before[0::2])
    assert (after[1::2] - before[1::2]).abs().max() > 1e-3


def test_paired_and_triplet_formulas() -> None:
    for variant in ("paired", "triplet"):
        net = model(variant).double()
        batch = double(pair_batch(variant == "paired"))
        p = dict(net.named_parameters())
        pooled = torch.tanh(
            encoder_rows(net, batch)[:, 0] @ p["uniter.pooler.dense.weight"].T + p["uniter.pooler.dense.bias"]
        )
        features = pooled.reshape(3, -1)  # paired: [pooled(left); pooled(right)] per example
        scores = features @ p["nlvr2_output.weight"].T + p["nlvr2_output.bias"]
        torch.testing.assert_close(net(batch, compute_loss=False)["scores"], scores, rtol=1e-9, atol=1e-9)
        expected = -torch.log_softmax(scores, 1)[torch.arange(3), batch["targets"]].mean()
        torch.testing.assert_close(net(batch)["loss"].double(), expected, rtol=1e-6, atol=1e-9)


def _attention(q_in, kv, pad, w, b, w_out, b_out, heads):
    """Multi-head attention written out: q/k/v = x W^T + b (rows of in_proj), softmax(q k^T / sqrt(d)) over
    unpadded keys, heads concatenated, output projection. q_in: [B, Lq, H]; kv: [B, Lk, H]; pad: [B, Lk]."""
    hidden = q_in.size(-1)
    d = hidden // heads
    q = q_in @ w[:hidden].T + b[:hidden]
    k = kv @ w[hidden : 2 * hidden].T + b[hidden : 2 * hidden]
    v = kv @ w[2 * hidden :].T + b[2 * hidden :]
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(d)
        logits = logits.masked_fill(pad[:, None, :], float("-inf"))
        out.append(torch.softmax(logits, -1) @ v[..., sl])
    return torch.cat(out, -1) @ w_out.T + b_out


def test_paired_attn_formula() -> None:
    net = model("paired-attn").double()
    batch = double(pair_batch(True))
    p = dict(net.named_parameters())
    seq = encoder_rows(net, batch)
    pad = batch["attn_masks"] == 0
    left, right, lpad, rpad = seq[0::2], seq[1::2], pad[0::2], pad[1::2]
    heads = tiny_config().num_attention_heads

    def side(own, other, own_pad, other_pad, attn):
        att = _attention(
            own,
            other,
            other_pad,
            p[f"{attn}.in_proj_weight"],
            p[f"{attn}.in_proj_bias"],
            p[f"{attn}.out_proj.weight"],
            p[f"{attn}.out_proj.bias"],
            heads,
        )
        x = torch.relu(torch.cat([att, own], -1) @ p["fc.0.weight"].T + p["fc.0.bias"])
        score = torch.relu(x @ p["attn_pool.fc.0.weight"].T + p["attn_pool.fc.0.bias"]).squeeze(-1)
        weights = torch.softmax(score - 1e4 * own_pad.double(), dim=1)
        return (weights[..., None] * x).sum(1)

    pooled = torch.cat([side(left, right, lpad, rpad, "attn1"), side(right, left, rpad, lpad, "attn2")], -1)
    scores = pooled @ p["nlvr2_output.weight"].T + p["nlvr2_output.bias"]
    torch.testing.assert_close(net(batch, compute_loss=False)["scores"], scores, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("variant", ["paired", "triplet", "paired-attn"])
def test_fast_path_matches_reference(variant: str) -> None:
    compare_fast_reference(lambda fast: model(variant, fast=fast), pair_batch(variant != "triplet"))


def test_original_checkpoints_load_strictly_and_fix_the_variant(tmp_path) -> None:
    h, task = tiny_config().hidden_size, get_task("nlvr2")
    attn = {
        "attn1.in_proj_weight": (3 * h, h),
        "attn1.in_proj_bias": (3 * h,),
        "attn1.out_proj.weight": (h, h),
        "attn1.out_proj.bias": (h,),
        "fc.0.weight": (h, 2 * h),
        "fc.0.bias": (h,),
        "attn_pool.fc.0.weight": (1, h),
        "attn_pool.fc.0.bias": (1,),
    }
    attn.update({k.replace("attn1", "attn2"): v for k, v in attn.items() if k.startswith("attn1")})
    cases = {
        "paired-attn": {**attn, "nlvr2_output.weight": (2, 2 * h), "nlvr2_output.bias": (2,)},
        "paired": {"nlvr2_output.weight": (2, 2 * h), "nlvr2_output.bias": (2,)},
        "triplet": {"nlvr2_output.weight": (2, h), "nlvr2_output.bias": (2,)},
    }
    for variant, shapes in cases.items():
        state = original_checkpoint(tiny_config(), shapes, type_rows=3)
        torch.save(state, tmp_path / f"{variant}.pt")
        net, options = load_task_model(task, str(tmp_path / f"{variant}.pt"), {"model": "paired"})
        assert options["model"] == variant and isinstance(net, MODELS[variant])
        for key, value in state.items():
            torch.testing.assert_close(net.state_dict()[key], value.float(), msg=key)
    state = original_checkpoint(tiny_config(), cases["paired"], type_rows=2)
    torch.save(state, tmp_path / "two_rows.pt")
    with pytest.raises(ValueError, match=r"must hold the task's embedding tables.*token_type_embeddings.*\(2, 64\)"):
        load_task_model(task, str(tmp_path / "two_rows.pt"), {})


def test_metric_consistency_and_csv(tmp_path) -> None:
    preds = [
        {"identifier": "dev-1-0-0", "prediction": "True", "label": "True"},
        {"identifier": "dev-1-1-0", "prediction": "False", "label": "False"},
        {"identifier": "dev-2-0-0", "prediction": "True", "label": "False"},
        {"identifier": "dev-2-1-0", "prediction": "True", "label": "True"},
        {"identifier": "dev-3-0-1", "prediction": "False", "label": "False"},
    ]
    assert consistency(preds) == pytest.approx(2 / 3)  # sentences dev-1, dev-3 all right; dev-2 not
    task = get_task("nlvr2")
    scores = torch.tensor([[0.0, 1.0], [2.0, 0.0], [0.5, 0.4]])
    batch = {"targets": torch.tensor([1, 1, 0]), "qids": ["test1-0-0-0", "test1-0-1-0", "test1-1-0-0"]}
    sums, out = task.eval_batch(lambda b, t, compute_loss: {"scores": scores}, batch, {})
    metrics = task.metrics(sums, out)
    assert metrics["acc"] == pytest.approx(2 / 3) and metrics["consistency"] == pytest.approx(1 / 2)
    assert metrics["loss"] == pytest.approx(float(F.cross_entropy(scores, batch["targets"])))
    (path,) = task.write_predictions(out, str(tmp_path), "results")
    assert open(path).read() == "test1-0-0-0,True\ntest1-0-1-0,False\ntest1-1-0-0,False\n"


def test_dataset_layout_and_an_example_without_two_images(tmp_path) -> None:
    _npz_dir(tmp_path / "feats", ["a", "b", "c"])
    lines = [
        {"identifier": "dev-0-0-0", "images": ["a", "b"], "sentence": "the cup", "label": True},
        {"identifier": "dev-0-1-0", "images": ["c", "a.npz"], "sentence": "what cup", "label": "False"},
    ]
    ann = tmp_path / "nlvr2.jsonl"
    ann.write_text("\n".join(json.dumps(x) for x in lines))
    args = [
        "--task",
        "nlvr2",
        "--annotations",
        str(ann),
        "--features",
        str(tmp_path / "feats"),
        "--vocab",
        _vocab(tmp_path / "vocab.txt"),
    ]
    build_main([*args, "--out", str(tmp_path / "db")])
    dbs = DbCache(SETTINGS)
    txt, img = dbs.txt(TxtTokLmdb, str(tmp_path / "db" / "txt"), True), dbs.img(str(tmp_path / "db" / "img"))
    paired = Nlvr2Dataset(txt, img, paired=True)
    batch = paired.collate([paired[0], paired[1]])
    assert batch["input_ids"].shape[0] == 4 and batch["targets"].tolist() == [1, 0]
    assert torch.equal(batch["input_ids"][0], batch["input_ids"][1])
    assert set(batch["img_type_ids"][0].tolist()) == {1} and set(batch["img_type_ids"][1].tolist()) == {2}
    triplet = Nlvr2Dataset(txt, img, paired=False)
    item = triplet[0]["rows"][0]
    n0, n1 = img.name2nbb["a.npz"], img.name2nbb["b.npz"]
    assert item["img_type_ids"].tolist() == [1] * n0 + [2] * n1 and item["img_feat"].shape == (n0 + n1, 2048)
    assert triplet.lens[0] * 1 + txt.id2len["dev-0-0-0"] == paired.lens[0]
    meta = json.load(open(tmp_path / "db" / "txt" / "meta.json"))
    with TxtDbWriter(str(tmp_path / "bad"), meta) as writer:  # a db from elsewhere, with a one-image example
        writer.add("dev-9-0-0", [5, 6], ["a.npz"], target=1)
    with pytest.raises(DataError, match=r"bad.*NLVR2 example 'dev-9-0-0' needs two images in 'img_fname'"):
        Nlvr2Dataset(TxtTokLmdb(str(tmp_path / "bad")), img, paired=True)
    lines[0]["images"] = ["a"]
    ann.write_text("\n".join(json.dumps(x) for x in lines))
    with pytest.raises(DataError, match=r"nlvr2.jsonl line 1: field 'images' must hold exactly two image names"):
        build_main([*args, "--out", str(tmp_path / "db2")])


def test_learns_a_subset_of_the_bundled_set() -> None:
    """200 steps of paired-attn fit 48 bundled statements: accuracy >= 0.8 on them (chance 0.5)."""
    dbs = DbCache(SETTINGS)
    dataset = Nlvr2Dataset(
        dbs.txt(TxtTokLmdb, resolve_bundled("bundled:nlvr2/txt_train"), True),
        dbs.img(resolve_bundled("bundled:pool/img_det")),
        paired=True,
    )
    torch.manual_seed(0)
    net = MODELS["paired-attn"](tiny_config())
    get_task("nlvr2").prepare_model(net, {})
    losses = learn_subset(net, dataset, examples=48, steps=200, batch=8)
    batch = dataset.collate([dataset[i] for i in range(48)])
    with torch.no_grad():
        accuracy = float((net(batch, compute_loss=False)["scores"].argmax(1) == batch["targets"]).float().mean())
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert accuracy >= 0.8, accuracy
