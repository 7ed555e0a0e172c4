"""UniterForPretraining: original keys and tying, and each task loss against its formula in ``model/pretrain.py``."""

from __future__ import annotations

import math

import pytest
import torch

from tests.pretrain_batches import task_batch
from uniter_fast.config import UniterConfig
from uniter_fast.pretraining.model import UniterForPretraining, task_kind

HEAD_KEYS = [
    "cls.predictions.bias",
    "cls.predictions.transform.dense.weight",
    "cls.predictions.transform.dense.bias",
    "cls.predictions.transform.LayerNorm.weight",
    "cls.predictions.transform.LayerNorm.bias",
    "cls.predictions.decoder.weight",
    "feat_regress.weight",
    "feat_regress.bias",
    "feat_regress.net.0.weight",
    "feat_regress.net.0.bias",
    "feat_regress.net.2.weight",
    "feat_regress.net.2.bias",
    "region_classifier.net.0.weight",
    "region_classifier.net.0.bias",
    "region_classifier.net.2.weight",
    "region_classifier.net.2.bias",
    "region_classifier.net.3.weight",
    "region_classifier.net.3.bias",
    "itm_output.weight",
    "itm_output.bias",
]
SHAPES = [([6, 4, 9], [5, 3, 7]), ([3, 8], [10, 2])]


def tiny_model(fast: bool = False, **overrides) -> UniterForPretraining:
    config = UniterConfig.tiny(attention_backend="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = UniterForPretraining(config, fast=fast, **overrides).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorm affine params, so every term is exercised
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name or "net.2" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def encoder_output(model: UniterForPretraining, batch: dict, img_masks=None) -> torch.Tensor:
    return model.uniter(
        batch["input_ids"],
        batch["position_ids"],
        batch["img_feat"],
        batch["img_pos_feat"],
        batch["attn_masks"],
        batch["gather_index"],
        img_masks=img_masks,
        output_all_encoded_layers=False,
    ).double()


def linear(x: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    return x @ layer.weight.double().t() + layer.bias.double()


def transform(x: torch.Tensor, dense, norm) -> torch.Tensor:
    """Linear -> erf GELU -> LayerNorm, written out."""
    h = linear(x, dense)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    return (h - mean) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def log_softmax_rows(logits: torch.Tensor) -> torch.Tensor:
    top = logits.max(-1, keepdim=True).values
    return logits - top - torch.log(torch.exp(logits - top).sum(-1, keepdim=True))


def hand_ipot_dist(txt: torch.Tensor, img: torch.Tensor, txt_pad, img_pad, beta=0.5, iteration=50) -> torch.Tensor:
    """Per-pair IPOT distance written from the original ``model/ot.py``, one pair at a time on its unpadded part."""
    out = []
    for b in range(txt.size(0)):
        x = txt[b][~txt_pad[b]].double()
        y = img[b][~img_pad[b]].double()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-5)
        y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-5)
        cost = 1 - x @ y.t()  # [m, n]
        m, n = cost.shape
        sigma = torch.full((m,), 1.0 / m, dtype=torch.float64)
        plan = torch.ones(n, m, dtype=torch.float64)
        kernel = torch.exp(-cost.t() / beta)
        for _ in range(iteration):
            q = kernel * plan
            delta = 1.0 / (n * (q @ sigma))
            sigma = 1.0 / (m * (delta @ q))
            plan = delta[:, None] * q * sigma[None, :]
        out.append((cost * plan.t()).sum())
    return torch.stack(out)


def test_state_dict_keys_and_tying() -> None:
    model = UniterForPretraining(UniterConfig.tiny())
    keys = list(model.state_dict())
    assert [k for k in keys if not k.startswith("uniter.")] == HEAD_KEYS
    encoder_keys = 16 + 16 * model.config.num_hidden_layers + 2
    assert len(keys) == encoder_keys + len(HEAD_KEYS)
    params = dict(model.named_parameters())
    assert "cls.predictions.decoder.weight" not in params and "feat_regress.weight" not in params
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight
    assert model.region_classifier.output.weight.shape == (1601, 64)


def test_load_state_dict_keeps_tying_and_later_key_wins() -> None:
    source = UniterForPretraining(UniterConfig.tiny())
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["cls.predictions.decoder.weight"] = torch.randn_like(state["cls.predictions.decoder.weight"])
    model = UniterForPretraining(UniterConfig.tiny())
    model.load_state_dict(state)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.uniter.embeddings.word_embeddings.weight, state["cls.predictions.decoder.weight"])
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight


@pytest.mark.parametrize("txt_lens,num_bbs", SHAPES)
@pytest.mark.parametrize("fast", [False, True])
def test_mlm_loss_matches_formula(txt_lens, num_bbs, fast) -> None:
    model = tiny_model(fast)
    batch = task_batch("mlm", txt_lens, num_bbs, model.config.vocab_size, seed=len(txt_lens))
    loss = model(batch, "mlm_coco")["loss"]
    with torch.no_grad():
        seq = encoder_output(model, batch)
        head = model.cls.predictions
        terms = []
        for i, j in (batch["txt_labels"] != -1).nonzero().tolist():
            h = transform(seq[i, j], head.transform.dense, head.transform.LayerNorm)
            logits = h @ head.decoder.weight.double().t() + head.bias.double()
            label = int(batch["txt_labels"][i, j])
            terms.append(torch.logsumexp(logits, 0) - logits[label])
        expected = torch.stack(terms).mean()
    assert loss.dim() == 0
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("txt_lens,num_bbs", SHAPES)
@pytest.mark.parametrize("fast", [False, True])
def test_mrfr_loss_matches_formula(txt_lens, num_bbs, fast) -> None:
    model = tiny_model(fast)
    batch = task_batch("mrfr", txt_lens, num_bbs, model.config.vocab_size, seed=3)
    loss = model(batch, "mrfr")["loss"]
    with torch.no_grad():
        seq = encoder_output(model, batch, batch["img_masks"])
        head = model.feat_regress
        total, count = 0.0, 0
        for row, (i, j) in enumerate(batch["img_mask_tgt"].nonzero().tolist()):
            h = transform(seq[i, j], head.net[0], head.net[2])
            pred = h @ head.weight.double() + head.bias.double()
            total += ((pred - batch["feat_targets"][row].double()) ** 2).sum()
            count += pred.numel()
    torch.testing.assert_close(loss.double(), total / count, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("txt_lens,num_bbs", SHAPES)
@pytest.mark.parametrize("kind", ["mrc", "mrckl"])
@pytest.mark.parametrize("fast", [False, True])
def test_mrc_losses_match_formula(txt_lens, num_bbs, kind, fast) -> None:
    model = tiny_model(fast)
    batch = task_batch(kind, txt_lens, num_bbs, model.config.vocab_size, seed=5)
    soft = batch["label_targets"].clone()
    soft[0, 0] = 0.0  # one exact zero probability: KL's 0 * log 0 term must count as 0
    soft[0] /= soft[0].sum()
    batch["label_targets"] = soft
    soft[1, 0], soft[1, 5] = 0.9, 0.1 / 1.0  # background is the largest entry of row 1: never the hard target
    loss = model(batch, f"{kind}_vg")["loss"]
    with torch.no_grad():
        seq = encoder_output(model, batch, batch["img_masks"])
        head = model.region_classifier
        terms = []
        for row, (i, j) in enumerate(batch["img_mask_tgt"].nonzero().tolist()):
            h = transform(seq[i, j], head.net[0], head.net[2])
            logp = log_softmax_rows(linear(h, head.net[3]))
            p = batch["label_targets"][row].double()
            if kind == "mrc":
                target = int(p[1:].argmax()) + 1
                assert target != 0
                terms.append(-logp[target])
            else:
                terms.append(torch.where(p > 0, p * (torch.log(p.clamp_min(1e-300)) - logp), 0.0).sum() / p.numel())
        expected = torch.stack(terms).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("txt_lens,num_bbs", SHAPES)
@pytest.mark.parametrize("fast", [False, True])
def test_itm_and_ot_loss_match_formula(txt_lens, num_bbs, fast) -> None:
    model = tiny_model(fast)
    batch = task_batch("itm", txt_lens, num_bbs, model.config.vocab_size, seed=7)
    out = model(batch, "itm_coco")
    with torch.no_grad():
        seq = encoder_output(model, batch)
        pooled = torch.tanh(linear(seq[:, 0], model.uniter.pooler.dense))
        logits = linear(pooled, model.itm_output)
        targets = batch["targets"]
        itm = (torch.logsumexp(logits, 1) - logits[torch.arange(len(targets)), targets]).mean()
        lt = batch["input_ids"].size(1)
        txt = torch.zeros(len(targets), lt, seq.size(-1), dtype=torch.float64)
        img = torch.zeros(len(targets), batch["img_feat"].size(1), seq.size(-1), dtype=torch.float64)
        for i, (t, n) in enumerate(zip(batch["txt_lens"].tolist(), batch["num_bbs"].tolist())):
            txt[i, :t] = seq[i, :t]
            img[i, :n] = seq[i, t : t + n]
        dist = hand_ipot_dist(txt, img, batch["ot_inputs"]["txt_pad"], batch["ot_inputs"]["img_pad"])
        ot = (dist[targets == 1].sum() - dist[targets == 0].sum()) / len(targets)
    torch.testing.assert_close(out["itm_loss"].double(), itm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["ot_loss"].double(), ot, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"].double(), itm + 0.1 * ot, rtol=1e-5, atol=1e-6)


def test_itm_without_ot_is_plain_ce() -> None:
    model = tiny_model(itm_ot_lambda=0.0)
    batch = task_batch("itm", [5, 7], [4, 6], model.config.vocab_size)
    del batch["ot_inputs"]
    out = model(batch, "itm")
    assert set(out) == {"loss", "itm_loss"}
    torch.testing.assert_close(out["loss"], out["itm_loss"])


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrc", "mrckl", "itm"])
def test_fast_gradients_match_reference(task) -> None:
    ref, fast = tiny_model(False), tiny_model(True)
    fast.load_state_dict(ref.state_dict())
    batch = task_batch(task, [6, 3, 9], [5, 8, 2], ref.config.vocab_size, seed=11)
    ref(batch, task)["loss"].backward()
    fast(batch, task)["loss"].backward()
    for (name, p_ref), (_, p_fast) in zip(ref.named_parameters(), fast.named_parameters()):
        if p_ref.grad is None:
            assert p_fast.grad is None or not p_fast.grad.any(), name
            continue
        assert torch.isfinite(p_ref.grad).all(), name
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert ref.itm_output.weight.grad is not None or task != "itm"


def _fake_forward_packed(model: UniterForPretraining, batch: dict):
    """A stand-in ``forward_packed``: the padded forward, then its valid rows in packed order, so that the packed
    row selection (mlm_index, mrm_index, cls_index, txt/img_index) is tested against the padded one."""

    def forward_packed(packed: dict, check_values: bool = True) -> torch.Tensor:
        seq = model.uniter(
            batch["input_ids"],
            batch["position_ids"],
            batch["img_feat"],
            batch["img_pos_feat"],
            batch["attn_masks"],
            batch["gather_index"],
            img_masks=batch.get("img_masks"),
            output_all_encoded_layers=False,
        )
        rows = [seq[i, : t + n] for i, (t, n) in enumerate(zip(batch["txt_lens"].tolist(), batch["num_bbs"].tolist()))]
        out = torch.cat(rows)
        assert out.size(0) == int(packed["cu_seqlens"][-1])
        return out

    return forward_packed


@pytest.mark.parametrize("task", ["mlm", "mrfr", "mrckl", "itm"])
def test_packed_rows_match_padded_rows(task, monkeypatch) -> None:
    model = tiny_model(True)
    batch = task_batch(task, [7, 4, 5], [3, 9, 6], model.config.vocab_size, seed=13)
    padded = {k: v for k, v in batch.items() if k != "packed"}
    expected = model(padded, task, compute_loss=False)
    monkeypatch.setattr(model.uniter, "forward_packed", _fake_forward_packed(model, batch), raising=False)
    got = model(batch, task, compute_loss=False)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_outputs_without_loss_have_head_shapes() -> None:
    model = tiny_model()
    v = model.config.vocab_size
    mlm = model(task_batch("mlm", [5, 6], [4, 4], v), "mlm", compute_loss=False)
    assert mlm["scores"].shape == (mlm["labels"].numel(), v)
    mrfr = model(task_batch("mrfr", [5, 6], [4, 4], v), "mrfr", compute_loss=False)
    assert mrfr["prediction"].shape == mrfr["targets"].shape
    itm = model(task_batch("itm", [5, 6], [4, 4], v), "itm", compute_loss=False)
    assert itm["scores"].shape == (2, 2) and itm["ot_dist"].shape == (2,)


def test_bad_task_and_batch() -> None:
    with pytest.raises(ValueError, match="unknown task 'vqa_coco'"):
        task_kind("vqa_coco")
    with pytest.raises(TypeError, match="task must be a str"):
        task_kind(3)
    model = tiny_model()
    batch = task_batch("mlm", [5], [4], model.config.vocab_size)
    del batch["txt_labels"]
    with pytest.raises(ValueError, match="lacks the keys \\['txt_labels'\\]"):
        model(batch, "mlm")
