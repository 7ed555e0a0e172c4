"""Forward semantics of UniterModel (as ``model/model.py``): joint layout, masks, masked regions, padding, backends."""

from __future__ import annotations

import pytest
import torch
from model_batches import random_batch, select_row

from uniter_fast import Model, UniterConfig

TXT_LENS = [7, 3, 12, 5]
NUM_BBS = [4, 11, 2, 9]


def tiny_model(**overrides) -> Model:
    return Model(UniterConfig.tiny(**overrides)).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30)) if a.numel() else 0.0


def test_gather_index_packs_regions_after_each_rows_text() -> None:
    model = tiny_model()
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    joint = model.embed(
        batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"], batch["gather_index"]
    )
    txt = model._compute_txt_embeddings(batch["input_ids"], batch["position_ids"], None)
    img = model._compute_img_embeddings(batch["img_feat"], batch["img_pos_feat"], None, None)
    for i, (t, n) in enumerate(zip(TXT_LENS, NUM_BBS)):
        torch.testing.assert_close(joint[i, :t], txt[i, :t], rtol=0, atol=0)
        torch.testing.assert_close(joint[i, t : t + n], img[i, :n], rtol=0, atol=0)


def test_padded_rows_do_not_change_valid_outputs() -> None:
    """Each example alone (no padding) gives the same valid outputs as inside the padded batch."""
    model = tiny_model()
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    out = model(**batch, output_all_encoded_layers=False)
    for i, (t, n) in enumerate(zip(TXT_LENS, NUM_BBS)):
        alone = model(**select_row(batch, i, t, n), output_all_encoded_layers=False)
        assert rel_err(out[i, : t + n], alone[0]) < 1e-5


def test_attention_mask_hides_padding_content() -> None:
    """Changing what sits in padded text/region slots leaves every valid output unchanged."""
    model = tiny_model()
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    out = model(**batch, output_all_encoded_layers=False)
    noisy = dict(batch)
    noisy["input_ids"] = batch["input_ids"].clone()
    noisy["img_feat"] = batch["img_feat"].clone()
    for i, (t, n) in enumerate(zip(TXT_LENS, NUM_BBS)):
        noisy["input_ids"][i, t:] = torch.randint(1, model.config.vocab_size, (max(TXT_LENS) - t,))
        noisy["img_feat"][i, n:] = torch.randn(max(NUM_BBS) - n, 2048)
    out_noisy = model(**noisy, output_all_encoded_layers=False)
    for i, (t, n) in enumerate(zip(TXT_LENS, NUM_BBS)):
        torch.testing.assert_close(out_noisy[i, : t + n], out[i, : t + n], rtol=1e-5, atol=1e-5)
    # ... while a valid position does see its neighbours: changing a valid token changes the outputs.
    noisy["input_ids"][0, 1] = (batch["input_ids"][0, 1] % (model.config.vocab_size - 2)) + 1
    assert rel_err(model(**noisy, output_all_encoded_layers=False)[0, :1], out[0, :1]) > 1e-4


def test_masked_regions_get_mask_embedding_row_one() -> None:
    model = tiny_model()
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    img_masks = torch.zeros(len(TXT_LENS), max(NUM_BBS), dtype=torch.bool)
    img_masks[0, 1] = img_masks[1, 0] = img_masks[3, 8] = True
    feats = batch["img_feat"].masked_fill(img_masks[..., None], 0.0)  # the collate zeroes masked features
    with torch.no_grad():
        model.img_embeddings.mask_embedding.weight[0].normal_()  # the model must force row 0 back to zero
    got = model._compute_img_embeddings(feats, batch["img_pos_feat"], img_masks, None)
    assert torch.all(model.img_embeddings.mask_embedding.weight[0] == 0)
    expected_input = feats.clone()
    expected_input[img_masks] = model.img_embeddings.mask_embedding.weight[1].detach()
    expected = model._compute_img_embeddings(expected_input, batch["img_pos_feat"], None, None)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    unmasked = model._compute_img_embeddings(feats, batch["img_pos_feat"], None, None)
    assert rel_err(got[0, 1], unmasked[0, 1]) > 1e-3  # the masked row really changed
    torch.testing.assert_close(got[0, 0], unmasked[0, 0], rtol=0, atol=0)  # unmasked rows did not


def test_text_only_and_image_only_calls() -> None:
    model = tiny_model()
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    txt_mask = (batch["input_ids"] != 0).long()
    txt_out = model(batch["input_ids"], batch["position_ids"], None, None, txt_mask, output_all_encoded_layers=False)
    assert txt_out.shape == (4, max(TXT_LENS), 64)
    img_mask = torch.tensor([[1] * n + [0] * (max(NUM_BBS) - n) for n in NUM_BBS])
    img_out = model(None, None, batch["img_feat"], batch["img_pos_feat"], img_mask)
    assert isinstance(img_out, list) and len(img_out) == 2 and img_out[-1].shape == (4, max(NUM_BBS), 64)
    pooled = model.pooler(txt_out)
    assert pooled.shape == (4, 64) and bool((pooled.abs() <= 1).all())


@pytest.mark.parametrize("train", [False, True])
def test_eager_and_sdpa_backends_agree(train: bool) -> None:
    """Outputs and gradients of the two attention cores agree in fp32 (dropout off so both are deterministic)."""
    model = Model(UniterConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train(train)
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    probe = torch.randn(len(TXT_LENS), max(t + n for t, n in zip(TXT_LENS, NUM_BBS)), model.config.hidden_size)
    results = {}
    for backend in ("eager", "sdpa"):
        model.set_attention_backend(backend)
        model.zero_grad()
        layers = model(**batch)
        (layers[-1] * probe).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        results[backend] = ([x.detach() for x in layers], grads)
    for a, b in zip(results["eager"][0], results["sdpa"][0]):
        assert rel_err(b, a) < 1e-5
    for name, grad in results["eager"][1].items():
        # attention.self.key.bias has a mathematically zero gradient (softmax ignores a per-query shift): the small
        # absolute term covers its rounding noise
        assert float((results["sdpa"][1][name] - grad).norm()) <= 1e-4 * float(grad.norm()) + 1e-6, name


def test_output_all_layers_flag() -> None:
    model = tiny_model()
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    layers = model(**batch)
    last = model(**batch, output_all_encoded_layers=False)
    assert len(layers) == model.config.num_hidden_layers
    torch.testing.assert_close(layers[-1], last)


def test_bf16_model_runs_and_tracks_fp32() -> None:
    model = tiny_model()
    batch = random_batch(TXT_LENS, NUM_BBS, model.config.vocab_size)
    ref = model(**batch, output_all_encoded_layers=False)
    out = model.to(torch.bfloat16)(**batch, output_all_encoded_layers=False)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 3e-2
