"""The packed encoder path: check_packed guards contract 2, and forward_packed equals the padded forward on every
valid token (outputs and gradients), for every attention backend available here. pack_batch itself is tested with
the rest of the layouts in tests/test_layout.py."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from model_batches import LENGTHS, padded_batch

from uniter_fast import Model, UniterConfig, backends
from uniter_fast.layout import pack_batch
from uniter_fast.model.packed import check_packed

CPU_BACKENDS = ["auto", "reference", "sdpa_loop", "sdpa_padded", "sdpa_nested"]


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


@pytest.mark.parametrize("backend", ["auto", "reference", "sdpa_loop", "sdpa_nested"])
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
    monkeypatch.setattr(backends, "_LOGGED", set())
    model = small_model().eval()
    batch = padded_batch([10, 60, 23], [100, 10, 57], vocab=model.config.vocab_size)
    with caplog.at_level(logging.INFO, logger="uniter_fast.backends"):
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
    assert model.config.packed_attention_backend == "auto"
