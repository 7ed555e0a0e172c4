"""Pretraining init from original / BERT-style checkpoints (``load_checkpoint(..., strict=False)``, as pretrain.py),
and the consolidated fp32 export that Model.from_pretrained loads."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from uniter_fast import Model
from uniter_fast.checkpoint import load_checkpoint, save_pretrained
from uniter_fast.config import UniterConfig
from uniter_fast.pretraining.model import UniterForPretraining


def randomized(model: UniterForPretraining) -> UniterForPretraining:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


def test_original_checkpoint_loads_every_key(tmp_path) -> None:
    source = randomized(UniterForPretraining(UniterConfig.tiny()))
    path = os.path.join(tmp_path, "uniter-tiny.pt")
    torch.save({k: v.half() for k, v in source.state_dict().items()}, path)  # fp16, tied keys under both names
    model = UniterForPretraining(UniterConfig.tiny())
    report = load_checkpoint(model, path, strict=False)
    assert report.fresh == [] and report.skipped == []
    for key, value in source.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value.half().float(), msg=key)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight


def test_bert_checkpoint_renamed_and_image_parts_stay_random(tmp_path) -> None:
    source = randomized(UniterForPretraining(UniterConfig.tiny()))
    bert = {}
    for key, value in source.state_dict().items():
        if key.startswith(("uniter.img_embeddings", "feat_regress", "region_classifier", "itm_output")):
            continue
        name = key.replace("uniter.", "bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
        bert[name.replace("LayerNorm.bias", "LayerNorm.beta")] = value.clone()
    bert["cls.seq_relationship.weight"] = torch.randn(2, 64)
    bert["cls.seq_relationship.bias"] = torch.randn(2)
    path = os.path.join(tmp_path, "bert.bin")
    torch.save(bert, path)
    model = UniterForPretraining(UniterConfig.tiny())
    before = model.state_dict()["uniter.img_embeddings.img_linear.weight"].clone()
    report = load_checkpoint(model, path, strict=False)
    assert report.skipped == ["cls.seq_relationship.bias", "cls.seq_relationship.weight"]
    assert "uniter.img_embeddings.img_linear.weight" in report.fresh and "itm_output.weight" in report.fresh
    state = model.state_dict()
    for key in ("uniter.encoder.layer.1.output.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias"):
        torch.testing.assert_close(state[key], source.state_dict()[key])
    word = source.state_dict()["uniter.embeddings.word_embeddings.weight"]
    torch.testing.assert_close(state["uniter.embeddings.word_embeddings.weight"], word)
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    torch.testing.assert_close(state["uniter.img_embeddings.img_linear.weight"], before)


def test_bad_checkpoints_are_errors(tmp_path) -> None:
    model = UniterForPretraining(UniterConfig.tiny())
    path = os.path.join(tmp_path, "bad.pt")
    torch.save({"uniter.nonsense.weight": torch.randn(3)}, path)
    with pytest.raises(ValueError, match="unexpected \\['uniter.nonsense.weight'\\]"):
        load_checkpoint(model, path, strict=False)
    torch.save({**model.state_dict(), "itm_output.weight": torch.randn(3, 64)}, path)
    with pytest.raises(ValueError, match="itm_output.weight: model \\(2, 64\\), file \\(3, 64\\)"):
        load_checkpoint(model, path, strict=False)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_checkpoint(model, os.path.join(tmp_path, "missing.pt"), strict=False)


def test_export_loads_into_model_from_pretrained(tmp_path) -> None:
    model = randomized(UniterForPretraining(UniterConfig.tiny()))
    out = os.path.join(tmp_path, "export")
    save_pretrained(model, out, dtype=torch.float32)  # what the pretraining run exports
    stored = load_file(os.path.join(out, "model.safetensors"))
    assert set(stored) == set(model.state_dict())
    assert all(v.dtype == torch.float32 for v in stored.values())
    encoder = Model.from_pretrained(out)
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, model.uniter.state_dict()[key], msg=key)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
