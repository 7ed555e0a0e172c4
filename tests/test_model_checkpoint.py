"""Checkpoint I/O: original-layout ``.pt`` files (``uniter.``-prefixed, fp16, with heads) and our own directory."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from model_batches import random_batch

from uniter_fast import Model, UniterConfig
from uniter_fast.checkpoint import export_original_checkpoint

TXT_LENS, NUM_BBS = [6, 9, 4], [5, 3, 10]


def pretraining_heads(hidden: int, vocab: int) -> dict[str, torch.Tensor]:
    """Random tensors under the original pretraining-head names, as a released checkpoint carries them."""
    return {
        "cls.predictions.bias": torch.randn(vocab),
        "cls.predictions.transform.dense.weight": torch.randn(hidden, hidden),
        "cls.predictions.transform.dense.bias": torch.randn(hidden),
        "feat_regress.bias": torch.randn(2048),
        "region_classifier.net.3.weight": torch.randn(1601, hidden),
        "itm_output.weight": torch.randn(2, hidden),
    }


def test_original_layout_checkpoint_loads_with_identical_outputs(tmp_path, caplog) -> None:
    source = Model(UniterConfig.tiny()).eval()
    with torch.no_grad():  # the original file holds fp16 tensors: make the source model exactly representable
        for p in source.parameters():
            p.copy_(p.half().float())
    state = dict(source.state_dict())
    state.update(pretraining_heads(64, source.config.vocab_size))
    path = tmp_path / "uniter-tiny.pt"
    export_original_checkpoint(state, path)

    raw = torch.load(path, weights_only=True)
    assert all(k.startswith("uniter.") for k in raw if not k.startswith(("cls.", "feat_", "region_", "itm_")))
    assert raw["uniter.embeddings.word_embeddings.weight"].dtype == torch.float16

    with caplog.at_level(logging.INFO, logger="uniter_fast.checkpoint"):
        loaded = Model.from_pretrained(path, config=UniterConfig.tiny()).eval()
    assert "cls.predictions.bias" in caplog.text and "itm_output.weight" in caplog.text
    assert loaded.embeddings.word_embeddings.weight.dtype == torch.float32
    batch = random_batch(TXT_LENS, NUM_BBS, source.config.vocab_size)
    torch.testing.assert_close(loaded(**batch)[-1], source(**batch)[-1], rtol=0, atol=0)


def test_original_state_dict_loads_with_plain_load_state_dict() -> None:
    source = Model(UniterConfig.tiny())
    target = Model(UniterConfig.tiny())
    target.load_state_dict(source.state_dict())  # strict by default: the names are the original ones
    for (k, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k


def test_config_is_inferred_from_weights(tmp_path) -> None:
    source = Model(UniterConfig.tiny(num_hidden_layers=3))
    path = tmp_path / "bare.pt"
    torch.save(source.state_dict(), path)  # no prefix: a bare UniterModel state_dict
    loaded = Model.from_pretrained(path)
    assert loaded.config.num_hidden_layers == 3
    assert loaded.config.hidden_size == 64 and loaded.config.num_attention_heads == 1  # heads = H / 64


def test_unknown_and_missing_keys_are_errors_naming_them(tmp_path) -> None:
    source = Model(UniterConfig.tiny())
    state = {"uniter." + k: v for k, v in source.state_dict().items()}
    state["uniter.encoder.layer.0.attention.self.rotary.weight"] = torch.zeros(3)
    path = tmp_path / "unknown.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match="rotary.weight"):
        Model.from_pretrained(path, config=UniterConfig.tiny())

    del state["uniter.encoder.layer.0.attention.self.rotary.weight"]
    del state["uniter.img_embeddings.pos_linear.weight"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing encoder keys.*img_embeddings.pos_linear.weight"):
        Model.from_pretrained(path, config=UniterConfig.tiny())
    loaded = Model.from_pretrained(path, config=UniterConfig.tiny(), strict=False)  # explicit opt-in
    assert torch.equal(loaded.pooler.dense.weight, source.pooler.dense.weight)


def test_shape_mismatch_is_an_error(tmp_path) -> None:
    state = Model(UniterConfig.tiny()).state_dict()
    path = tmp_path / "m.pt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"shape mismatch.*model \(1000, 32\), file \(1000, 64\)"):
        Model.from_pretrained(path, config=UniterConfig.tiny(hidden_size=32, num_attention_heads=2))


def test_legacy_gamma_beta_names_are_renamed(tmp_path) -> None:
    source = Model(UniterConfig.tiny())
    state = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in source.state_dict().items()
    }
    path = tmp_path / "legacy.pt"
    torch.save(state, path)
    loaded = Model.from_pretrained(path, config=UniterConfig.tiny())
    assert torch.equal(loaded.embeddings.LayerNorm.weight, source.embeddings.LayerNorm.weight)


def test_save_pretrained_round_trip(tmp_path) -> None:
    source = Model(UniterConfig.tiny(attention_backend="eager")).eval()
    source.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "ckpt" / "README.md").read_text()  # the model card: provenance and the config
    assert "- source: Model.save_pretrained" in card and '"hidden_size": 64' in card
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["attention_backend"] == "eager"
    loaded = Model.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config == source.config
    batch = random_batch(TXT_LENS, NUM_BBS, source.config.vocab_size)
    torch.testing.assert_close(loaded(**batch)[-1], source(**batch)[-1], rtol=0, atol=0)


def test_from_pretrained_casts_to_requested_dtype(tmp_path) -> None:
    path = tmp_path / "m.pt"
    export_original_checkpoint(Model(UniterConfig.tiny()).state_dict(), path)
    loaded = Model.from_pretrained(path, config="tiny", dtype=torch.bfloat16)
    assert loaded.pooler.dense.weight.dtype == torch.bfloat16


def test_missing_checkpoint_paths_raise(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Model.from_pretrained(tmp_path / "nothing.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Model.from_pretrained(tmp_path / "empty")
