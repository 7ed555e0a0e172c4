"""The packed encoder path: pack_batch builds contract 2 from a padded batch, and forward_packed equals the padded
forward on every valid token (outputs and gradients), for every attention backend available here."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from uniter_fast import Model, UniterConfig
from uniter_fast.model import attention
from uniter_fast.model.layout import joint_layout
from uniter_fast.model.packed import check_packed, pack_batch

CPU_BACKENDS = ["auto", "eager", "sdpa_loop", "sdpa_padded", "sdpa_nested"]


def padded_batch(txt_lens: list[int], num_bbs: list[int], vocab: int, img_dim: int = 2048) -> dict[str, Any]:
    """A contract-1 padded batch with random ids/features, MLM labels and MRM masks (features of masked regions
    zeroed as the collates do)."""
    t, n = torch.tensor(txt_lens), torch.tensor(num_bbs)
    size, max_txt, max_img = len(txt_lens), int(t.max()), int(n.max())
    txt_valid = torch.arange(max_txt)[None] < t[:, None]
    img_valid = torch.arange(max_img)[None] < n[:, None]
    input_ids = torch.randint(1, vocab, (size, max_txt)) * txt_valid
    chosen = txt_valid & (torch.rand(size, max_txt) < 0.3)
    txt_labels = torch.where(chosen, torch.randint(1, vocab, (size, max_txt)), -1)
    img_masks = img_valid & (torch.rand(size, max_img) < 0.3)
    img_feat = torch.randn(size, max_img, img_dim) * (img_valid & ~img_masks)[..., None]
    img_pos_feat = torch.rand(size, max_img, 7) * img_valid[..., None]
    attn_masks, gather_index = joint_layout(t, n)
    img_mask_tgt = torch.zeros_like(attn_masks, dtype=torch.bool)
    for i in range(size):
        img_mask_tgt[i, txt_lens[i] : txt_lens[i] + num_bbs[i]] = img_masks[i, : num_bbs[i]]
    return dict(
        input_ids=input_ids,
        position_ids=torch.arange(max_txt)[None],
        img_feat=img_feat,
        img_pos_feat=img_pos_feat,
        attn_masks=attn_masks,
        gather_index=gather_index,
        txt_lens=t,
        num_bbs=n,
        txt_labels=txt_labels,
        img_masks=img_masks,
        img_mask_tgt=img_mask_tgt,
    )


def padded_forward(model: Model, batch: dict[str, Any], all_layers: bool = False) -> Any:
    return model.forward_batch(batch, img_masks=batch["img_masks"], output_all_encoded_layers=all_layers)


def small_model(dtype: torch.dtype = torch.float32, dropout: float = 0.0, **overrides: Any) -> Model:
    config = UniterConfig.tiny(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **overrides)
    model = Model(config).to(dtype)
    with torch.no_grad():  # LayerNorm/bias at their init (1, 0) would hide mistakes in those paths
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


LENGTHS = [
    ([12], [37]),  # single example
    ([10, 60, 23, 41], [100, 10, 57, 12]),  # ragged, with a maximal-length row (60 text + 100 regions)
    ([60, 60, 60], [100, 100, 100]),  # every row maximal: no padding at all
    ([5, 3], [0, 4]),  # a text-only row inside an image-text batch
]


# --------------------------------------------------------------------------------------------------- pack_batch
@pytest.mark.parametrize("txt_lens,num_bbs", LENGTHS)
def test_pack_batch_layout(txt_lens: list[int], num_bbs: list[int]) -> None:
    batch = padded_batch(txt_lens, num_bbs, vocab=1000)
    packed = pack_batch(batch)
    starts = [0]
    for t, n in zip(txt_lens, num_bbs):
        starts.append(starts[-1] + t + n)
    assert packed["cu_seqlens"].dtype == torch.int32 and packed["cu_seqlens"].tolist() == starts
    assert packed["max_seqlen"] == max(t + n for t, n in zip(txt_lens, num_bbs))
    assert packed["cls_index"].tolist() == starts[:-1]
    # Scatter text and regions into a [T] slot table and compare with the padded rows, example by example.
    total = starts[-1]
    token_of = torch.full((total,), -1)
    token_of[packed["txt_index"]] = packed["txt_ids"]
    region_of = torch.full((total, 2048), float("nan"))
    region_of[packed["img_index"]] = packed["img_feat"]
    box_of = torch.full((total, 7), float("nan"))
    box_of[packed["img_index"]] = packed["img_pos_feat"]
    for i, (t, n) in enumerate(zip(txt_lens, num_bbs)):
        s = starts[i]
        assert token_of[s : s + t].tolist() == batch["input_ids"][i, :t].tolist()
        torch.testing.assert_close(region_of[s + t : s + t + n], batch["img_feat"][i, :n], rtol=0, atol=0)
        torch.testing.assert_close(box_of[s + t : s + t + n], batch["img_pos_feat"][i, :n], rtol=0, atol=0)
    assert packed["txt_position_ids"].tolist() == [j for t in txt_lens for j in range(t)]
    # MLM: packed positions of masked tokens, labels in txt_labels != -1 row-major order.
    labels = batch["txt_labels"]
    assert packed["mlm_labels"].tolist() == labels[labels != -1].tolist()
    assert token_of[packed["mlm_index"]].tolist() == batch["input_ids"][labels != -1].tolist()
    # MRM: packed positions in the order of img_mask_tgt flattened row-major (the order of feat_targets).
    rows, cols = batch["img_mask_tgt"].nonzero(as_tuple=True)
    assert packed["mrm_index"].tolist() == [starts[r] + c for r, c in zip(rows.tolist(), cols.tolist())]
    expected_masks = [bool(batch["img_masks"][i, j]) for i, n in enumerate(num_bbs) for j in range(n)]
    assert packed["img_masks"].tolist() == expected_masks


def test_pack_batch_rejects_bad_input() -> None:
    batch = padded_batch([4, 6], [3, 5], vocab=50)
    with pytest.raises(ValueError, match="missing 'txt_lens'"):
        pack_batch({k: v for k, v in batch.items() if k != "txt_lens"})
    with pytest.raises(ValueError, match="num_bbs must be an integer tensor of shape \\[2\\]"):
        pack_batch({**batch, "num_bbs": torch.tensor([3, 5, 1])})
    with pytest.raises(ValueError, match="txt_lens must lie in"):
        pack_batch({**batch, "txt_lens": torch.tensor([4, 7])})


def test_check_packed_rejects_inconsistent_input() -> None:
    packed = pack_batch(padded_batch([4, 6], [3, 5], vocab=50))
    with pytest.raises(ValueError, match="missing"):
        check_packed({k: v for k, v in packed.items() if k != "img_index"}, 2048, True)
    with pytest.raises(ValueError, match=r"packed\['img_pos_feat'\] must have shape \[8, 7\]"):
        check_packed({**packed, "img_pos_feat": packed["img_pos_feat"][:-1]}, 2048, True)
    with pytest.raises(ValueError, match="int32"):
        check_packed({**packed, "cu_seqlens": packed["cu_seqlens"].long()}, 2048, True)
    with pytest.raises(ValueError, match="from 0 to T = 18"):
        check_packed({**packed, "cu_seqlens": torch.tensor([0, 7, 19], dtype=torch.int32)}, 2048, True)
    with pytest.raises(ValueError, match="longest sequence 11"):
        check_packed({**packed, "max_seqlen": 12}, 2048, True)


# --------------------------------------------------------------------------------------------------- packed vs padded
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("txt_lens,num_bbs", LENGTHS)
@pytest.mark.parametrize("train", [False, True])
def test_packed_equals_padded_fp32(backend: str, txt_lens: list[int], num_bbs: list[int], train: bool) -> None:
    model = small_model().train(train)
    model.set_packed_attention_backend(backend)
    batch = padded_batch(txt_lens, num_bbs, vocab=model.config.vocab_size)
    valid = batch["attn_masks"].bool()

    padded_layers = padded_forward(model, batch, all_layers=True)
    packed_layers = model.forward_packed(pack_batch(batch), output_all_encoded_layers=True)
    assert len(packed_layers) == len(padded_layers) == model.config.num_hidden_layers
    for got, want in zip(packed_layers, padded_layers):
        assert got.shape == (valid.sum().item(), model.config.hidden_size)
        assert rel_err(got, want[valid]) < 1e-5
        torch.testing.assert_close(got, want[valid], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["auto", "eager", "sdpa_loop", "sdpa_nested"])
def test_packed_gradients_equal_padded(backend: str) -> None:
    model = small_model().train()
    model.set_packed_attention_backend(backend)
    batch = padded_batch([10, 60, 23], [100, 10, 57], vocab=model.config.vocab_size)
    valid = batch["attn_masks"].bool()
    weight = torch.randn(int(valid.sum()), model.config.hidden_size)

    (padded_forward(model, batch)[valid] * weight).sum().backward()
    padded_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (model.forward_packed(pack_batch(batch)) * weight).sum().backward()
    packed_grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    assert packed_grads.keys() == padded_grads.keys()
    assert "img_embeddings.mask_embedding.weight" in packed_grads
    for name, want in padded_grads.items():
        if name.endswith("key.bias"):  # mathematically zero (softmax is shift-invariant): only rounding noise
            assert packed_grads[name].abs().max() < 1e-6 and want.abs().max() < 1e-6
        else:
            assert rel_err(packed_grads[name], want) < 1e-5, name


@pytest.mark.parametrize("backend", ["auto", "sdpa_padded"])
def test_packed_equals_padded_bf16(backend: str) -> None:
    model = small_model(torch.bfloat16).eval()
    model.set_packed_attention_backend(backend)
    batch = padded_batch([10, 60, 23, 41], [100, 10, 57, 12], vocab=model.config.vocab_size)
    valid = batch["attn_masks"].bool()
    got = model.forward_packed(pack_batch(batch))
    want = padded_forward(model, batch)[valid]
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 1e-2
    # and both are close to the fp32 model with the same (bf16-rounded) weights
    reference = small_model().eval()
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    assert rel_err(got, padded_forward(reference, batch)[valid]) < 2e-2


def test_packed_under_autocast_picks_autocast_dtype(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under bf16 autocast the backend is chosen for bf16 q/k/v (what the kernels see), and packed == padded."""
    monkeypatch.setattr(attention, "_LOGGED_CHOICES", set())
    model = small_model().eval()
    batch = padded_batch([10, 60, 23], [100, 10, 57], vocab=model.config.vocab_size)
    with caplog.at_level(logging.INFO, logger="uniter_fast.model.attention"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model.forward_packed(pack_batch(batch))
            want = padded_forward(model, batch)[batch["attn_masks"].bool()]
    assert "cpu/torch.bfloat16" in caplog.records[0].getMessage()
    assert rel_err(got, want) < 2e-2


def test_heads_read_packed_positions() -> None:
    """Rows picked with mlm_index / mrm_index / cls_index are the padded rows the original heads read."""
    model = small_model().eval()
    batch = padded_batch([10, 60, 23], [100, 10, 57], vocab=model.config.vocab_size)
    packed = pack_batch(batch)
    out = model.forward_packed(packed)
    padded = padded_forward(model, batch)
    masked_txt = padded[:, : batch["input_ids"].size(1)][batch["txt_labels"] != -1]
    torch.testing.assert_close(out[packed["mlm_index"]], masked_txt, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out[packed["mrm_index"]], padded[batch["img_mask_tgt"]], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(model.pooler(out[packed["cls_index"]][:, None]), model.pooler(padded))


def test_packed_dropout_active_in_training() -> None:
    model = small_model(dropout=0.1).train()
    packed = pack_batch(padded_batch([10, 30], [20, 40], vocab=model.config.vocab_size))
    first, second = model.forward_packed(packed), model.forward_packed(packed)
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model.forward_packed(packed), model.forward_packed(packed), rtol=0, atol=0)


def test_set_packed_attention_backend_validates() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="one of"):
        model.set_packed_attention_backend("fastest")
    assert model.packed_attention_backend == "auto"
